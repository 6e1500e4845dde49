"""Boundary Shrink: relabel each forget sample with its nearest wrong class, found by an
adversarial step, and fine-tune on the forget data alone.

Chen, Gao, Liu, Peng and Zhou, "Boundary Unlearning: Rapid Forgetting of Deep Networks via
Shifting the Decision Boundary", CVPR 2023. For a forget sample ``x`` of class ``y`` the
frozen original model gives an adversarial neighbour ``x' = x + bound * sign(grad_x
CE(f(x), y))`` (one FGSM step); the class the original predicts for ``x'`` is the class
whose region is nearest, and the student is fine-tuned to predict it on ``x``. The
decision boundary of the forgotten class shrinks onto its neighbours; no retain data is
used.

As in the authors' code (a Dropbox archive; read through copies of it in public
repositories and the SalUn repository's version, ``boundary_sh.py``): one FGSM step
with ``bound = 0.1``, the neighbour's label is taken from the original model (a frozen
copy in eval mode) and recomputed for every minibatch, the student trains on forget
minibatches only, in train mode, with SGD and momentum 0.9 (their learning rate 1e-5 for
10 epochs on CIFAR; ours larger, for few steps: docs/methods.md). Differences: ``bound`` is
in the units of the model's input (theirs is in [0, 1] pixels, then clamped to [0, 1] and
rounded to 1/255; the library does not know a model's input range), and by default the
neighbour is the nearest *retained* class (``neighbours="retained"``): the authors' plain
argmax (``neighbours="any"``) keeps the true label when the step does not leave the
class, and may pick another class of the same request.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ...training.optim import Recipe
from ...unlearning.registry import register_method
from ...unlearning.request import mark_forgotten, parse_request
from ._steps import StepRun, frozen_teacher, steps_per_epoch
from .common import BaselineInfo

__all__ = ["BoundaryShrinkConfig", "BoundaryShrinkInfo", "boundary_shrink",
           "nearest_wrong_labels"]

_NEIGHBOURS = ("retained", "any")


@dataclass(kw_only=True)
class BoundaryShrinkConfig(Recipe):
    """Settings of Boundary Shrink (the fields of
    :class:`~erm_surgery.training.optim.Recipe`, then its own; ``epochs`` are over the
    forget samples).

    Attributes:
        bound: size of the FGSM step, in the units of the model's input.
        neighbours: ``"retained"``: the label is the retained class the original scores
            highest on the adversarial neighbour; ``"any"``: the plain argmax (the
            authors' code; may be the true class when the step is too small).
    """

    epochs: int = 5
    lr: float = 0.01
    weight_decay: float = 0.0
    bound: float = 0.1
    neighbours: str = "retained"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.bound > 0 and math.isfinite(self.bound)):
            raise ValueError(f"bound must be > 0 and finite, got {self.bound}")
        if self.neighbours not in _NEIGHBOURS:
            raise ValueError(f"neighbours must be one of {_NEIGHBOURS}, got "
                             f"{self.neighbours!r}")


@dataclass(kw_only=True)
class BoundaryShrinkInfo(BaselineInfo):
    """What :func:`boundary_shrink` did (``samples``: the forget samples).

    Attributes:
        bound: the FGSM step used.
        neighbours: the label rule used.
        kept_true_label: fraction of the neighbour labels (over all steps) that were the
            sample's own class (always 0 with ``neighbours="retained"``).
        final_loss: cross-entropy of the last batch.
    """

    bound: float = math.nan
    neighbours: str = "retained"
    kept_true_label: float = math.nan
    final_loss: float = math.nan


def nearest_wrong_labels(original: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         bound: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The class ``original`` predicts for the FGSM neighbour ``x + bound * sign(grad_x
    CE)`` of each sample; restricted to the classes where ``allowed`` (a bool vector of
    length C) is True when given. ``original`` must not require grad (a frozen copy)."""
    with torch.enable_grad():
        probe = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(original(probe).float(), y)
        (grad,) = torch.autograd.grad(loss, probe)
    with torch.no_grad():
        logits = original(x + bound * grad.sign()).float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        return logits.argmax(dim=1)


@register_method("boundary_shrink", config=BoundaryShrinkConfig, info=BoundaryShrinkInfo,
                 group="baseline",
                 summary="fine-tune forget samples towards their nearest wrong class "
                         "(Chen et al. 2023)")
def boundary_shrink(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: BoundaryShrinkConfig,
    accelerator: Any = None,
) -> tuple[nn.Module, BoundaryShrinkInfo]:
    """Boundary Shrink (Chen et al., CVPR 2023): fine-tune a copy on the forget samples,
    each labelled with the class of its FGSM neighbour under the original. See the module
    docstring.

    ``model`` is not modified. Cost: ``epochs`` passes over the forget samples, each step
    with a forward and backward pass of the original (the FGSM step) and one more forward.
    """
    cfg = config
    req = parse_request(model, classes, data, need_forget=True)
    forget = req.forget_set()
    total = steps_per_epoch(forget, cfg.batch_size) * cfg.epochs
    kept = torch.zeros((), dtype=torch.long)
    seen = 0
    with StepRun(copy.deepcopy(model), cfg, total_steps=total, accelerator=accelerator,
                 desc="Boundary Shrink") as run:
        original = frozen_teacher(model, run.device)
        allowed = None
        if cfg.neighbours == "retained":
            allowed = torch.zeros(req.num_classes, dtype=torch.bool, device=run.device)
            allowed[torch.as_tensor(req.retain_classes, dtype=torch.long)] = True
        kept = kept.to(run.device)
        loader = run.loader(forget)
        for _ in range(cfg.epochs):
            for x, y in loader:
                target = nearest_wrong_labels(original, x, y, cfg.bound, allowed)
                kept += (target == y).sum()
                seen += y.shape[0]
                run.step(F.cross_entropy(run.model(x), target))
    loop = run.result()
    mark_forgotten(loop.model, req.forget)
    info = BoundaryShrinkInfo(
        method="boundary_shrink", forget_classes=req.forget, device=loop.device,
        samples=len(req.forget_idx), epochs=cfg.epochs, bound=cfg.bound,
        neighbours=cfg.neighbours, kept_true_label=int(kept) / max(seen, 1),
        final_loss=loop.final_loss)
    return loop.model, info
