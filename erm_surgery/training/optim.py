"""The optimisation recipe every training loop of the library shares.

:class:`Recipe` holds the run settings (epochs, learning rate, batch size, weight decay,
optimiser, seed) that KTP, the fine-tuning baselines, Amnesiac's repair, EC and SISA
all have; their configs subclass it and change only the defaults. The optimiser and the
schedule are built here once: fused kernels where PyTorch has them, cosine to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = ["Recipe", "make_optimizer", "cosine_schedule"]

OPTIMIZERS = ("sgd", "adam")


def make_optimizer(cls: type[torch.optim.Optimizer], params: list[torch.Tensor],
                   **kwargs: Any) -> torch.optim.Optimizer:
    """``cls(params, fused=True, **kwargs)`` where PyTorch has a fused kernel for the
    parameters (CPU and CUDA float tensors), else ``cls(params, **kwargs)``.

    One kernel for all parameters instead of a Python loop over them: measured 3.7x faster
    Adam and 3.4x faster SGD steps for timm's ``test_resnet`` on one CPU thread.
    """
    try:
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for these parameters
        return cls(params, **kwargs)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay of every group's learning rate from its value to 0 over
    ``total_steps`` optimiser steps (held at 0 after that), after an optional linear warmup
    from 0 over the first ``warmup_steps`` (KTP's large-batch recipe uses one)."""
    total = max(1, total_steps)
    warmup = min(warmup_steps, total - 1) if total > 1 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        done = min(step - warmup, total - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(kw_only=True)
class Recipe:
    """Run settings of an optimisation loop (subclasses change the defaults).

    Attributes:
        epochs: passes over the method's data.
        lr: learning rate (cosine schedule to 0 over the run).
        batch_size: minibatch size.
        weight_decay: the optimiser's weight decay.
        optimizer: ``"sgd"`` (momentum ``momentum``, nesterov) or ``"adam"``.
        momentum: SGD momentum (0 = plain SGD).
        seed: data order and the method's random draws.
        show_progress: tqdm bar on the main process.
    """

    epochs: int = 1
    lr: float = 0.01
    batch_size: int = 64
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    momentum: float = 0.9
    seed: int = 0
    show_progress: bool = True

    #: the fewest epochs a subclass accepts (Amnesiac's repair may be 0 epochs)
    min_epochs: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.epochs < self.min_epochs:
            raise ValueError(f"epochs must be >= {self.min_epochs}, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0 and finite, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be >= 0 and finite, got {self.weight_decay}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {self.momentum}")

    def build_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """The optimiser this recipe names, over ``params``."""
        if self.optimizer == "adam":
            return make_optimizer(torch.optim.Adam, params, lr=self.lr,
                                  weight_decay=self.weight_decay)
        return make_optimizer(torch.optim.SGD, params, lr=self.lr, momentum=self.momentum,
                              nesterov=self.momentum > 0, weight_decay=self.weight_decay)
