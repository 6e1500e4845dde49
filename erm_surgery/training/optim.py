"""The optimisation recipe every training loop of the library shares.

:class:`Recipe` holds the run settings (epochs, learning rate, batch size, weight decay,
optimiser, seed) that KTP, the fine-tuning baselines, Amnesiac's repair, EC and SISA
all have; their configs subclass it and change only the defaults. The optimiser and the
schedule are built here once: fused kernels where PyTorch has them, cosine to 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["DefaultOptimizer", "Recipe", "cosine_schedule", "default_optimizer",
           "make_optimizer"]

OPTIMIZERS = ("sgd", "adam", "adamw")


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


@dataclass(frozen=True)
class DefaultOptimizer:
    """The weights' optimiser :func:`erm_surgery.train` builds when none is passed.

    Attributes:
        name: ``"sgd"`` (momentum 0.9, nesterov) or ``"adamw"``.
        lr: its learning rate when ``train(lr=None)``.
        weight_decay: its weight decay when ``train(weight_decay=None)``.
        reason: why this model gets it (logged, and kept in ``TrainResult.optimizer``).
    """

    name: str
    lr: float
    weight_decay: float
    reason: str

    def build(self, params: list[torch.Tensor], lr: float | None = None,
              weight_decay: float | None = None) -> torch.optim.Optimizer:
        """The optimiser over ``params`` (built by :meth:`Recipe.build_optimizer`);
        ``lr`` / ``weight_decay`` override the defaults."""
        return Recipe(optimizer=self.name, lr=self.lr if lr is None else lr,
                      weight_decay=self.weight_decay if weight_decay is None
                      else weight_decay).build_optimizer(params)


def _layer_norm_only(model: nn.Module) -> bool:
    """Normalised by LayerNorm (timm's LayerNorm2d included) and by no BatchNorm."""
    mods = list(model.modules())
    return (any(isinstance(m, nn.LayerNorm) for m in mods)
            and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods))


#: the default optimisers of train(), first match wins; add a rule for a new family here.
#: SGD at lr 0.05 is the recipe every BatchNorm CNN in benchmarks/ was measured with. A
#: LayerNorm-only CNN (ConvNeXt) is trained with AdamW by its authors and by timm, and
#: SGD collapses it here: convnext_atto on 4,000 MNIST digits, 10 epochs, plain training
#: 0.233 test accuracy with SGD at 0.05 against 0.952 with AdamW at 2e-3 (docs/training.md).
DEFAULT_OPTIMIZERS: list[tuple[Callable[[nn.Module], bool], DefaultOptimizer]] = [
    (_layer_norm_only, DefaultOptimizer(
        "adamw", 2e-3, 0.05, "the model normalises with LayerNorm only (ConvNeXt-like): "
        "AdamW, the optimiser such models are trained with")),
]
FALLBACK_OPTIMIZER = DefaultOptimizer("sgd", 0.05, 5e-4,
                                      "a BatchNorm CNN: SGD with nesterov momentum")


def default_optimizer(model: nn.Module) -> DefaultOptimizer:
    """The optimiser :func:`erm_surgery.train` uses for ``model`` when none is passed:
    the first rule of :data:`DEFAULT_OPTIMIZERS` that matches, else SGD."""
    for matches, choice in DEFAULT_OPTIMIZERS:
        if matches(model):
            return choice
    return FALLBACK_OPTIMIZER


@dataclass(kw_only=True)
class Recipe:
    """Run settings of an optimisation loop (subclasses change the defaults).

    Attributes:
        epochs: passes over the method's data.
        lr: learning rate (cosine schedule to 0 over the run).
        batch_size: minibatch size.
        weight_decay: the optimiser's weight decay.
        optimizer: ``"sgd"`` (momentum ``momentum``, nesterov), ``"adam"`` or ``"adamw"``;
            ``"auto"`` (only where a subclass allows it: ``auto_optimizer``) = the model
            family's optimiser :func:`erm_surgery.train` would pick
            (:func:`default_optimizer`), with its ``lr`` / ``weight_decay`` where those are
            None (:meth:`resolved`).
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
    #: whether ``optimizer="auto"`` (and ``lr`` / ``weight_decay`` None) is accepted
    auto_optimizer: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.epochs < self.min_epochs:
            raise ValueError(f"epochs must be >= {self.min_epochs}, got {self.epochs}")
        auto = self.optimizer == "auto"
        if self.optimizer not in OPTIMIZERS and not auto:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if auto and not self.auto_optimizer:
            raise ValueError(f"optimizer='auto' is not available for {type(self).__name__}; "
                             f"use one of {OPTIMIZERS}")
        if self.lr is None and not auto:
            raise ValueError(f"lr=None takes the 'auto' optimiser's value; with "
                             f"optimizer={self.optimizer!r} pass lr=")
        if self.weight_decay is None and not auto:
            self.weight_decay = 5e-4  # the recipes' usual value
        # None (with "auto") = the resolved optimiser's own value
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0 and finite, got {self.lr}")
        if self.weight_decay is not None and not (
                self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be >= 0 and finite, got {self.weight_decay}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {self.momentum}")

    def resolved(self, model: nn.Module) -> Recipe:
        """This recipe with ``optimizer="auto"`` replaced by ``model``'s family default
        (:func:`default_optimizer`) and its ``lr`` / ``weight_decay`` where those are None;
        a recipe without ``"auto"`` as it is."""
        if self.optimizer != "auto":
            return self
        choice = default_optimizer(model)
        return replace(self, optimizer=choice.name,
                       lr=choice.lr if self.lr is None else self.lr,
                       weight_decay=(choice.weight_decay if self.weight_decay is None
                                     else self.weight_decay))

    def build_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """The optimiser this recipe names, over ``params`` (``"auto"``: call
        :meth:`resolved` first)."""
        if self.optimizer == "auto":
            raise ValueError("optimizer='auto' needs the model: build from "
                             "recipe.resolved(model)")
        if self.optimizer == "adamw":
            return make_optimizer(torch.optim.AdamW, params, lr=self.lr,
                                  weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            return make_optimizer(torch.optim.Adam, params, lr=self.lr,
                                  weight_decay=self.weight_decay)
        return make_optimizer(torch.optim.SGD, params, lr=self.lr, momentum=self.momentum,
                              nesterov=self.momentum > 0, weight_decay=self.weight_decay)
