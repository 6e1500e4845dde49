"""Knowledge retention (KR): a fresh linear probe on the frozen pooled features.

Zeroing a class's logits (or its classifier row) gives 0% forget accuracy while the
features still separate the class perfectly. The probe exposes that: a new linear head
is trained on the frozen features of the FULL training set, forget classes included, and
its accuracy on the forget classes' test samples is reported. High = the knowledge is
still in the features; a model retrained without the class scores much lower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .accuracy import class_set_accuracy, per_class_accuracy

__all__ = ["ProbeResult", "linear_probe"]


@dataclass
class ProbeResult:
    """Accuracies of the probe (fractions in [0, 1]).

    Attributes:
        forget_acc: accuracy on the forget classes' test samples (the KR number).
        retain_acc: accuracy on the retain classes' test samples (sanity check: it should
            be close to the model's own retain accuracy).
        train_acc: accuracy on the training features it was fitted on.
        per_class_test: test accuracy of each class (NaN without samples).
        epochs: epochs it was trained for (``epochs``, or more to reach ``min_steps``).
    """

    forget_acc: float
    retain_acc: float
    train_acc: float
    per_class_test: list[float]
    epochs: int


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    forget_classes: Sequence[int],
    num_classes: int,
    *,
    epochs: int = 20,
    min_steps: int = 200,
    lr: float = 1e-2,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> ProbeResult:
    """Fit multinomial logistic regression on ``train_features``; score it on the test set.

    Features are standardised with the training mean and std (so one learning rate fits
    every architecture), the head starts at zero (the problem is convex, so a fixed start
    plus a seeded sample order makes the result deterministic) and is trained with Adam
    for ``epochs`` passes, extended to at least ``min_steps`` minibatch steps: ten epochs
    of a few hundred samples are a handful of steps, too few to fit even separable data.
    """
    device = torch.device(device) if device is not None else train_features.device
    xtr = train_features.detach().float().to(device)
    ytr = train_labels.detach().long().to(device)
    mean = xtr.mean(dim=0, keepdim=True)
    std = xtr.std(dim=0, keepdim=True).nan_to_num(1.0).clamp_min(1e-6)
    xtr = (xtr - mean) / std
    xte = (test_features.detach().float().to(device) - mean) / std

    weight = torch.zeros(num_classes, xtr.shape[1], device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = xtr.shape[0]
    steps_per_epoch = -(-n // batch_size)
    run_epochs = max(epochs, -(-min_steps // steps_per_epoch))
    with torch.enable_grad():
        for _ in range(run_epochs):
            order = torch.randperm(n, generator=gen).to(device)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                loss = F.cross_entropy(F.linear(xtr[idx], weight, bias), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    with torch.no_grad():
        pred_tr = F.linear(xtr, weight, bias).argmax(1).cpu()
        pred_te = F.linear(xte, weight, bias).argmax(1).cpu()
    test_labels = test_labels.detach().long().cpu()
    retain = [c for c in range(num_classes) if c not in set(forget_classes)]
    return ProbeResult(
        forget_acc=class_set_accuracy(pred_te, test_labels, forget_classes),
        retain_acc=class_set_accuracy(pred_te, test_labels, retain),
        train_acc=float((pred_tr == ytr.cpu()).double().mean()),
        per_class_test=per_class_accuracy(pred_te, test_labels, num_classes).tolist(),
        epochs=run_epochs,
    )
