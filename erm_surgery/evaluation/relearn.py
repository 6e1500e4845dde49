"""Relearn time: how fast fine-tuning on the full training set brings a forgotten class back.

A model that merely hides a class (its head row zeroed, its logits masked) recovers it in
a fraction of an epoch, because the features are intact; a model that really lost it
relearns about as slowly as one retrained without the class (ERM-KTP paper, Table 6).
The model is deep-copied: the one passed in is never trained.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import as_dataset
from ..surgery import model_device
from .features import logits_of, ordered_loader, progress
from .models import split_batch

__all__ = ["RelearnResult", "relearn", "forget_accuracy"]


@dataclass
class RelearnResult:
    """Outcome of the fine-tuning.

    Attributes:
        epochs_to_threshold: first epoch after which forget-class test accuracy reached
            ``threshold`` (0 = already there), None if the budget ran out first.
        curve: forget-class test accuracy before fine-tuning (index 0) and after each epoch;
            it stops at the epoch that reached the threshold.
        threshold: the accuracy that counts as relearned.
        budget: maximum epochs allowed.
        seconds: wall time of the fine-tuning and its evaluations.
    """

    epochs_to_threshold: int | None
    curve: list[float]
    threshold: float
    budget: int
    seconds: float


@torch.no_grad()
def forget_accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Accuracy of ``model`` (switched to eval mode) on ``loader``; NaN when it is empty."""
    model.eval()
    device = model_device(model)
    correct = total = 0
    for batch in loader:
        x, y = split_batch(batch)
        pred = logits_of(model(x.to(device, non_blocking=True))).argmax(dim=1).cpu()
        correct += int((pred == y.reshape(-1).cpu()).sum())
        total += int(y.numel())
    return correct / total if total else math.nan


def _train_loader(data: Dataset | DataLoader, batch_size: int, seed: int) -> DataLoader:
    # a seeded shuffle so that two runs, and the model vs the retrained model, see the
    # same sample order; a user's collate_fn and workers are kept
    base = data if isinstance(data, DataLoader) else None
    return DataLoader(
        as_dataset(data),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=base.num_workers if base is not None else 0,
        collate_fn=base.collate_fn if base is not None else None,
        pin_memory=base.pin_memory if base is not None else False,
    )


def relearn(
    model: nn.Module,
    train_data: Dataset | DataLoader,
    forget_test_data: Dataset | DataLoader,
    *,
    epochs: int = 5,
    lr: float = 1e-2,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    threshold: float = 0.5,
    batch_size: int = 256,
    eval_batch_size: int = 256,
    seed: int = 0,
    show_progress: bool = False,
    desc: str = "relearn",
) -> RelearnResult:
    """Fine-tune a copy of ``model`` with SGD; measure forget-class test accuracy per epoch.

    ``forget_test_data`` holds only forget-class test samples. Every parameter of the copy
    is trained (an unlearning method may have frozen some; relearning may use them all).
    """
    start = time.perf_counter()
    work = copy.deepcopy(model)
    for p in work.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    eval_loader = ordered_loader(forget_test_data, eval_batch_size)
    curve = [forget_accuracy(work, eval_loader)]
    reached: int | None = 0 if curve[0] >= threshold else None
    device = model_device(work)
    params = [p for p in work.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    loader = _train_loader(train_data, batch_size, seed)
    epoch = 0
    while reached is None and epoch < epochs:
        epoch += 1
        work.train()
        with torch.enable_grad():
            for batch in progress(loader, f"{desc} epoch {epoch}", show_progress):
                x, y = split_batch(batch)
                y = y.reshape(-1).long().to(device, non_blocking=True)
                out = logits_of(work(x.to(device, non_blocking=True)))
                loss = F.cross_entropy(out.float(), y, reduction="none")
                # a label whose logit is hard-masked to -inf gives an infinite loss that no
                # gradient can lower; average the finite ones (no host sync on GPUs)
                finite = torch.isfinite(loss)
                loss = torch.where(finite, loss, 0.0).sum() / finite.sum().clamp_min(1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        curve.append(forget_accuracy(work, eval_loader))
        if curve[-1] >= threshold:
            reached = epoch
    del work, opt
    return RelearnResult(reached, curve, threshold, epochs, time.perf_counter() - start)

