"""Retrain from scratch on the retain data: the gold standard of exact unlearning.

The model never sees the forget classes, so nothing about them can remain; every other
method is judged against it (ERM-KTP paper section 5.4, "Rfs"; Bourtoule et al., "Machine
Unlearning", IEEE S&P 2021, section 2, the naive baseline SISA improves on).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ...errors import UnlearningError
from ...surgery import ERMModel, attach, unwrap
from ...training.losses import ERMConfig
from ...training.optim import Recipe
from ...unlearning.registry import register_method
from ...unlearning.request import device_name, mark_forgotten, parse_request, reinitialised
from .common import BaselineInfo, sgd_loop

__all__ = ["RetrainConfig", "RetrainInfo", "retrain"]


@dataclass(kw_only=True)
class RetrainConfig(Recipe):
    """The original training recipe, repeated on the retain data.

    The model cannot tell how it was trained: set these to the original run's values
    (the defaults are :func:`erm_surgery.train`'s: the model family's optimiser, SGD at lr
    0.05 with nesterov momentum 0.9 for BatchNorm CNNs and AdamW at 2e-3 for LayerNorm-only
    ones such as ConvNeXt, cosine to 0, batch 128, 10 epochs; ``seed`` also seeds the
    re-initialisation).

    Attributes (besides :class:`~erm_surgery.training.optim.Recipe`'s):
        erm_config: for an attached model, the :class:`ERMConfig` it is trained with by
            :func:`erm_surgery.train` (``None`` = ``ERMConfig()``, ERM training;
            ``ERMConfig(erm_every=10**6, warmup_epochs=0)`` = plain STD training). Unused
            for a plain model, which gets the STD recipe in an Accelerate loop.
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "auto"
    lr: float | None = None
    weight_decay: float | None = None
    erm_config: ERMConfig | None = None

    auto_optimizer: ClassVar[bool] = True


@dataclass(kw_only=True)
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


@register_method("retrain", config=RetrainConfig, info=RetrainInfo,
                 summary="re-initialise and train on the retain data (exact; the reference)")
def retrain(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: RetrainConfig,
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
    req = parse_request(model, classes, data)
    cfg = config.resolved(unwrap(model))  # "auto": the optimiser train() would pick
    if fresh_model is None:
        fresh, same = reinitialised(model, cfg.seed)
    else:
        fresh, same = _from_fresh_model(model, fresh_model), []
    final_acc = None
    if isinstance(fresh, ERMModel):
        from ...training import train

        # the recipe's optimiser ("auto" resolved to train()'s family default): cosine to 0
        params = [p for p in fresh.model.parameters() if p.requires_grad]
        with warnings.catch_warnings():  # leaving the forget classes out is the point here
            warnings.filterwarnings("ignore", message=r"classes .* have no training samples")
            result = train(fresh, req.retain_set(), epochs=cfg.epochs,
                           config=cfg.erm_config or ERMConfig(), accelerator=accelerator,
                           optimizer=cfg.build_optimizer(params), batch_size=cfg.batch_size,
                           seed=cfg.seed, show_progress=cfg.show_progress)
        fresh = result.model
        final_acc = result.history[-1].train_accuracy
        device = device_name(fresh.erm.G.device)
        trainer = "erm_surgery.train"
    else:
        loop = sgd_loop(fresh, req.retain_set(), cfg, accelerator=accelerator,
                        desc="retrain")
        fresh, device, trainer = loop.model, loop.device, "sgd"
    fresh.eval()
    mark_forgotten(fresh, req.forget)
    info = RetrainInfo(method="retrain", forget_classes=req.forget, device=device,
                       samples=len(req.retain_idx), epochs=cfg.epochs, trainer=trainer,
                       final_train_accuracy=final_acc, not_reinitialised=same)
    return fresh, info
