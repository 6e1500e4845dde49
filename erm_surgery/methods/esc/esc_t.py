"""ESC-T (Lee et al., CVPR 2025): ESC with a mask learned on the singular vectors.

Shares ESC's preparation (one feature pass over the forget samples), projection module,
info and checkpoint restorer (:mod:`.esc`); only the mask training is its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ...errors import UnlearningError
from ...surgery import trace_model
from ...unlearning.registry import register_method
from .esc import NO_ZERO_GUARANTEE, ESCInfo, _finish, _Prepared, _restore
from .graph import SubspaceProjection, tail_graph

__all__ = ["ESCTConfig", "esc_t"]


@dataclass
class ESCTConfig:
    """Hyperparameters of ESC-T (the reference code's defaults unless noted).

    Attributes:
        threshold: mask entries above it become 1, the others 0 (paper: 0.7).
        lr: step size of the plain gradient step on the mask. The reference code uses
            1e-3 with 5,000 forget samples (about 4,000 steps in 50 epochs); with a few
            hundred samples (tens of steps per 50 epochs) 1e-3 leaves the mask at 1 and
            nothing is forgotten, so the default is the measured 0.1 (docs/methods.md).
        epochs: at most this many passes over the forget samples (reference: 50); training
            stops early after the first epoch at whose end no forget sample is correct.
        batch_size: forget samples per mask update (reference: 64).
        seed: order of the forget samples.
    """

    threshold: float = 0.7
    lr: float = 0.1
    epochs: int = 50
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.threshold) < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if not float(self.lr) > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")


def _masked_map(x: torch.Tensor, basis: torch.Tensor, dim: int) -> torch.Tensor:
    moved = dim not in (-1, x.dim() - 1)
    if moved:
        x = x.movedim(dim, -1)
    out = (x @ basis) @ basis.T
    return out.movedim(-1, dim) if moved else out


def _hits(tail: nn.Module, raw: torch.Tensor, labels: torch.Tensor, basis: torch.Tensor,
          dim: int, batch_size: int) -> int:
    with torch.no_grad():
        return sum(int((tail(_masked_map(raw[i:i + batch_size], basis, dim)).argmax(1)
                        == labels[i:i + batch_size]).sum())
                   for i in range(0, len(labels), batch_size))


@register_method("esc_t", config=ESCTConfig, info=ESCInfo, group="training-free",
                 restore=_restore,
                 summary="ESC with a mask learned on the singular vectors (Lee et al. 2025)")
def esc_t(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: ESCTConfig,
    accelerator: Any = None,
) -> tuple[nn.Module, ESCInfo]:
    """ESC-T (Lee et al., CVPR 2025): ESC with a learned mask on the singular vectors.

    ``U`` is the full ``D x D`` left-singular basis of the forget features (with fewer
    samples than features, completed by the SVD to an orthonormal basis), so the initial
    mask ``M = 1`` gives ``(U o M)(U o M)^T = I``: training starts from the unchanged model,
    and the mask can reach every direction, including ones the few forget samples do not
    span. ``M`` is trained on the forget samples only, by plain gradient steps on
    ``-CE`` over the still-correctly-classified ones, clamped to [0, 1], stopping at the end
    of the first epoch with no correct forget sample; then binarised at ``threshold``.

    Only ``M`` is trained, the network is frozen in eval mode, so the forget features are
    extracted once and the steps run through the head alone (seconds, not minutes).
    Arguments and return as :func:`esc`; ``info`` adds the forget-train accuracy at several
    thresholds. No guarantee of 0% forget accuracy.
    """
    cfg = config
    prep = _Prepared(model, classes, data, accelerator, 256)
    tail = tail_graph(trace_model(prep.base, training=False), prep.head)
    if tail is None:
        raise UnlearningError("ESC-T needs a head that reads only the pooled features; this "
                              "model's output also depends on earlier tensors")
    tail.eval()
    for p in tail.parameters():  # gradients are taken w.r.t. the mask only
        p.requires_grad_(False)
    U, S, _ = torch.linalg.svd(prep.matrix, full_matrices=True)  # D x D
    raw, labels = prep.raw.float(), prep.labels
    mask = torch.ones_like(U)
    gen = torch.Generator().manual_seed(cfg.seed)
    epochs_run, stopped = 0, False
    for _ in range(cfg.epochs):
        epochs_run += 1
        order = torch.randperm(len(labels), generator=gen).to(labels.device)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            m = mask.detach().requires_grad_(True)
            logits = tail(_masked_map(raw[idx], U * m, prep.dim))
            correct = logits.argmax(1) == labels[idx]
            if not bool(correct.any()):
                continue
            loss = -F.cross_entropy(logits[correct], labels[idx][correct])
            (grad,) = torch.autograd.grad(loss, m)
            mask = (mask - cfg.lr * grad).clamp_(0.0, 1.0)
        if _hits(tail, raw, labels, U * mask, prep.dim, 256) == 0:
            stopped = True
            break
    for p in tail.parameters():
        p.requires_grad_(True)

    n = len(labels)
    by_threshold = {f"{t:g}": _hits(tail, raw, labels, U * (mask > t), prep.dim, 256) / n
                    for t in sorted({0.5, 0.6, 0.7, 0.8, 0.9, 0.95, float(cfg.threshold)})}
    keep = (mask > cfg.threshold).to(U.dtype)
    basis = U * keep
    kept_energy = float(((prep.matrix.T @ basis @ basis.T) ** 2).sum()
                        / (prep.matrix ** 2).sum().clamp_min(1e-12))
    module = SubspaceProjection(basis, mode="keep", dim=prep.dim,
                                num_classes=prep.num_classes)
    rank = int(torch.linalg.matrix_rank(basis @ basis.T))
    info = ESCInfo(
        method="esc_t", forget_classes=prep.forget, head=prep.head, num_features=prep.D,
        removed_directions=prep.D - rank, p=None, samples=n,
        energy_removed=max(0.0, 1.0 - kept_energy),
        singular_values=[float(s) for s in S[:16]],
        notes=[NO_ZERO_GUARANTEE.replace("ESC does", "ESC-T does")],
        threshold=float(cfg.threshold), epochs_run=epochs_run, stopped_early=stopped,
        mask_kept_fraction=float(keep.mean()),
        forget_train_accuracy=_hits(tail, raw, labels, basis, prep.dim, 256) / n,
        forget_accuracy_by_threshold=by_threshold)
    return _finish(model, prep, module, info), info
