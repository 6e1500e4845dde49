"""l1-sparse: fine-tune on the retain data with an l1 penalty on the weights.

Jia, Liu, Ram, Yao, Liu, Liu, Sharma and Liu, "Model Sparsity Can Simplify Machine
Unlearning", NeurIPS 2023 ("sparsity-aware unlearning"). The loss of a retain minibatch is
``CE + alpha_e * ||theta||_1`` over every trainable weight; sparsity pushes weights the
retain data does not need (those that served the forget classes) to zero, so fine-tuning
forgets faster than plain ``finetune``.

As in the authors' code (``FT_l1``): the penalty is the l1 norm of all trainable
parameters (BatchNorm and biases included), and its weight decays linearly per epoch,
``alpha_e = l1_alpha * (1 - e / epochs)`` for epoch ``e = 0 .. epochs - 1``, so the last
epochs mostly repair accuracy. The schedule of the learning rate is the library's cosine
(theirs: the training script's, 10 epochs).
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
from ._steps import StepRun, steps_per_epoch
from .common import BaselineInfo

__all__ = ["L1SparseConfig", "L1SparseInfo", "l1_sparse"]


@dataclass(kw_only=True)
class L1SparseConfig(Recipe):
    """Settings of l1-sparse unlearning (the fields of
    :class:`~erm_surgery.training.optim.Recipe`, then its own; ``epochs`` are over the
    retain data).

    Attributes:
        l1_alpha: weight of the l1 penalty in the first epoch (decays linearly to
            ``l1_alpha / epochs`` in the last); the paper searches 5e-5 to 5e-4 over 10
            epochs; 2e-3 for 3 epochs took the digits teacher's forget classes to 0%
            (docs/methods.md).
    """

    epochs: int = 3
    lr: float = 0.1
    l1_alpha: float = 2e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.l1_alpha >= 0 and math.isfinite(self.l1_alpha)):
            raise ValueError(f"l1_alpha must be >= 0 and finite, got {self.l1_alpha}")


@dataclass(kw_only=True)
class L1SparseInfo(BaselineInfo):
    """What :func:`l1_sparse` did.

    Attributes:
        l1_alpha: the penalty weight of the first epoch.
        l1_norm_before, l1_norm_after: ``||theta||_1`` of the trainable weights.
        near_zero_fraction: fraction of trainable weights with ``|w| < 1e-3`` afterwards.
        final_loss: loss (cross-entropy + penalty) of the last batch.
    """

    l1_alpha: float = math.nan
    l1_norm_before: float = math.nan
    l1_norm_after: float = math.nan
    near_zero_fraction: float = math.nan
    final_loss: float = math.nan


def _l1(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([p.abs().sum() for p in params]).sum()


@register_method("l1_sparse", config=L1SparseConfig, info=L1SparseInfo, group="baseline",
                 summary="fine-tune on the retain data with an l1 penalty (Jia et al. 2023)")
def l1_sparse(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: L1SparseConfig,
    accelerator: Any = None,
) -> tuple[nn.Module, L1SparseInfo]:
    """l1-sparse unlearning (Jia et al., NeurIPS 2023): fine-tune a copy on the retain data
    with a linearly decaying l1 penalty on its weights. See the module docstring.

    ``model`` is not modified. Cost: ``epochs`` passes over the retain data.
    """
    cfg = config
    req = parse_request(model, classes, data)
    retain = req.retain_set()
    total = steps_per_epoch(retain, cfg.batch_size) * cfg.epochs
    with StepRun(copy.deepcopy(model), cfg, total_steps=total, accelerator=accelerator,
                 desc="l1-sparse") as run:
        params = run.params
        with torch.no_grad():
            before = float(_l1(params))
        loader = run.loader(retain)
        for epoch in range(cfg.epochs):
            alpha = cfg.l1_alpha * (1 - epoch / cfg.epochs)
            for x, y in loader:
                loss = F.cross_entropy(run.model(x), y)
                if alpha > 0:
                    loss = loss + alpha * _l1(params)
                run.step(loss)
        with torch.no_grad():
            after = float(_l1(params))
            small = sum(int((p.abs() < 1e-3).sum()) for p in params)
            count = sum(p.numel() for p in params)
    loop = run.result()
    mark_forgotten(loop.model, req.forget)
    info = L1SparseInfo(method="l1_sparse", forget_classes=req.forget, device=loop.device,
                        samples=len(req.retain_idx), epochs=cfg.epochs, l1_alpha=cfg.l1_alpha,
                        l1_norm_before=before, l1_norm_after=after,
                        near_zero_fraction=small / max(count, 1), final_loss=loop.final_loss)
    return loop.model, info
