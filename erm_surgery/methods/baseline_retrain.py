"""Retrain from scratch on the retain data: the gold standard of exact unlearning.

The model never sees the forget classes, so nothing about them can remain; every other
method is judged against it (ERM-KTP paper section 5.4, "Rfs"; Bourtoule et al., "Machine
Unlearning", IEEE S&P 2021, section 2, the naive baseline SISA improves on).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import UnlearningError
from ..losses import ERMConfig
from ..surgery import ERMModel, attach, unwrap
from .baseline_common import (
    BaselineInfo,
    check_config,
    device_name,
    mark_forgotten,
    parse_request,
    reinitialised,
    sgd_loop,
)

__all__ = ["RetrainConfig", "RetrainInfo", "retrain"]


@dataclass
class RetrainConfig:
    """The original training recipe, repeated on the retain data.

    The model cannot tell how it was trained: set these to the original run's values
    (the defaults are :func:`erm_surgery.train`'s).

    Attributes:
        epochs: training epochs (the original budget).
        batch_size: minibatch size.
        lr: SGD learning rate (nesterov momentum 0.9, cosine to 0 over the run).
        weight_decay: SGD weight decay.
        erm_config: for an attached model, the :class:`ERMConfig` it is trained with by
            :func:`erm_surgery.train` (``None`` = ``ERMConfig()``, ERM alternate training;
            ``ERMConfig(erm_every=10**6, warmup_epochs=0)`` = plain STD training). Unused
            for a plain model, which gets the STD recipe in an Accelerate loop.
        seed: seeds the re-initialisation and the data order.
        show_progress: tqdm bar on the main process.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    erm_config: ERMConfig | None = None
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or not self.lr > 0:
            raise ValueError("batch_size must be >= 1 and lr > 0")


@dataclass
class RetrainInfo(BaselineInfo):
    """What :func:`retrain` did.

    Attributes:
        trainer: ``"erm_surgery.train"`` (attached model) or ``"sgd"`` (plain model).
        final_train_accuracy: training accuracy of the last epoch (attached models only;
            None otherwise).
        not_reinitialised: parameters no ``reset_parameters`` reached (still the original's
            values); pass ``fresh_model=`` when this is not empty.
    """

    trainer: str = "sgd"
    final_train_accuracy: float | None = None
    not_reinitialised: list[str] = field(default_factory=list)


def _from_fresh_model(model: nn.Module, fresh_model: nn.Module) -> nn.Module:
    """``fresh_model`` prepared like ``model``: attached at the same place when ``model`` is,
    with its forgotten classes; an error when the architectures differ."""
    if not isinstance(fresh_model, nn.Module) or isinstance(fresh_model, ERMModel):
        raise UnlearningError("fresh_model= must be a plain (not attached) nn.Module of the "
                              f"model's architecture, got {type(fresh_model).__name__}")
    theirs = {n: tuple(p.shape) for n, p in unwrap(model).named_parameters()}
    ours = {n: tuple(p.shape) for n, p in fresh_model.named_parameters()}
    if theirs != ours:
        raise UnlearningError("fresh_model= does not have the model's architecture (its "
                              "parameter names or shapes differ)")
    if not isinstance(model, ERMModel):
        return copy.deepcopy(fresh_model).to(next(model.parameters()).device)
    fresh = attach(fresh_model, feature_node=model.surgery.feature_node,
                   head=model.surgery.head)
    fresh.to(model.erm.G.device)
    with torch.no_grad():
        fresh.erm.forgotten.copy_(model.erm.forgotten)
        fresh.erm.G[fresh.erm.forgotten] = 0
    return fresh


def retrain(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: RetrainConfig | None = None,
    accelerator: Any = None,
    fresh_model: nn.Module | None = None,
) -> tuple[nn.Module, RetrainInfo]:
    """Retrain a re-initialised copy of ``model`` from scratch on the retain data.

    The copy has every module's ``reset_parameters()`` called (KTP's fresh-student rule).
    That is PyTorch's default initialisation, not always the architecture's own: timm's
    ResNet zero-initialises the last BatchNorm of each block. ``fresh_model=`` (a newly
    built plain model of the same architecture, e.g. ``timm.create_model(...)``) is
    trained instead, for the exact original recipe. An attached model is trained with
    :func:`erm_surgery.train` (``config.erm_config``), so the result can be asked to forget
    again with KTP; a plain model with the same SGD recipe in a plain Accelerate loop.
    Classes an attached model already forgot are left out of the data too. ``model`` is
    not modified. Cost: a whole training run.
    """
    cfg = check_config(config, RetrainConfig, "retrain")
    req = parse_request(model, classes, data)
    start = time.perf_counter()
    if fresh_model is None:
        fresh, same = reinitialised(model, cfg.seed)
    else:
        fresh, same = _from_fresh_model(model, fresh_model), []
    final_acc = None
    if isinstance(fresh, ERMModel):
        from ..training import train

        result = train(fresh, req.retain_set(), epochs=cfg.epochs,
                       config=cfg.erm_config or ERMConfig(), accelerator=accelerator,
                       batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       seed=cfg.seed, show_progress=cfg.show_progress)
        fresh = result.model
        final_acc = result.history[-1].train_accuracy
        device = device_name(fresh.erm.G.device)
        trainer = "erm_surgery.train"
    else:
        loop = sgd_loop(fresh, req.retain_set(), epochs=cfg.epochs, lr=cfg.lr,
                        batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                        seed=cfg.seed, accelerator=accelerator,
                        show_progress=cfg.show_progress, desc="retrain")
        fresh, device, trainer = loop.model, loop.device, "sgd"
    fresh.eval()
    mark_forgotten(fresh, req.forget)
    info = RetrainInfo(method="retrain", forget_classes=req.forget,
                       seconds=time.perf_counter() - start, device=device,
                       samples=len(req.retain_idx), epochs=cfg.epochs, trainer=trainer,
                       final_train_accuracy=final_acc, not_reinitialised=same)
    fresh.__dict__["unlearning_info"] = info
    return fresh, info
