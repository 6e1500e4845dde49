"""EC: Erase at the Core (Lee, Kim and Kim, "Erase at the Core: Representation Unlearning
for Machine Unlearning").

Methods that only drive the forget logits down ("superficial forgetting") leave the
intermediate representations almost as they were. EC fine-tunes a copy of the model with
an objective applied at several depths: auxiliary heads (global pool + linear) are
attached with torch.fx to intermediate blocks (the stage outputs), and at each of them,
and at the model's own head,

- a contrastive unlearning loss on the forget samples (InfoNCE on L2-normalised pooled
  activations: toward the retain samples, away from the same forget class), and
- cross-entropy on the retain samples (deep supervision),

weighted so that deeper points count more. The auxiliary heads are dropped afterwards:
the returned model has exactly the original's parameters (names and shapes).

Registered methods:

- ``"ec"``: EC alone, on any traceable classifier (plain or attached). No guarantee of 0%
  forget accuracy (``info.guarantees_zero_forget_accuracy = False``).
- ``"ktp_ec"``: KTP, then EC fine-tuning of KTP's student with its head frozen, so KTP's
  FKT head (forget rows zero, bias -1e4) keeps forget accuracy at 0% while EC reshapes the
  backbone. The plug-in route for any other method is :class:`ECPlugin`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ...data import shuffled_loader
from ...errors import UnlearningError
from ...surgery import unwrap
from ...training.optim import Recipe, cosine_schedule
from ...training.precision import refuse_cpu_bfloat16_hazards
from ...unlearning.registry import register_method
from ...unlearning.request import (
    MethodInfo,
    check_forget_classes,
    classifier_of,
    seeded_rng,
    split_data,
)
from ..ktp import KTPConfig, ktp
from .plugin import ECLosses, ECPlugin, contrastive_unlearning_loss

__all__ = ["ECConfig", "ECInfo", "KTPECConfig", "ec", "ktp_ec",
           "ec_finetune", "contrastive_unlearning_loss"]


@dataclass(kw_only=True)
class ECConfig(Recipe):
    """Hyperparameters of EC.

    The fields of :class:`~erm_surgery.training.optim.Recipe` (``epochs``: passes over the
    retain data, every step also drawing a forget batch; ``batch_size``: retain samples
    per step; SGD with nesterov momentum, cosine to 0; ``seed`` also initialises the
    auxiliary heads), and:

    Attributes:
        forget_batch_size: forget samples per step (concatenated with the retain batch:
            one forward, shared BatchNorm statistics).
        temperature: of the contrastive unlearning loss.
        contrastive_weight: weight of the contrastive term at every point.
        ce_weight: weight of the retain cross-entropy at every point.
        layers: supervision points (fx node names or module names such as ``"layer2"``);
            None = the stage outputs (timm ``feature_info``, else the last activation at
            each resolution), without the deepest.
        num_aux_layers: with ``layers=None``, how many intermediate stages (the deepest
            ones) get an auxiliary head.
        layer_weights: per point, shallow to deep with the final head last; None =
            ``i / L`` for point ``i`` of ``L``.
        deep_supervision: cross-entropy through the auxiliary heads too.
        train_head: also fine-tune the classifier (``ktp_ec`` freezes it, to keep KTP's
            prohibited head exactly).
    """

    epochs: int = 2
    lr: float = 0.01
    batch_size: int = 64
    forget_batch_size: int = 32
    temperature: float = 0.2
    contrastive_weight: float = 1.0
    ce_weight: float = 1.0
    layers: Sequence[str] | None = None
    num_aux_layers: int = 3
    layer_weights: Sequence[float] | None = None
    deep_supervision: bool = True
    train_head: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.forget_batch_size < 2:
            raise ValueError("forget_batch_size must be >= 2 (the contrastive loss "
                             "compares forget samples with each other)")
        if not self.temperature > 0:
            raise ValueError("temperature must be > 0")
        if self.num_aux_layers < 0:
            raise ValueError(f"num_aux_layers must be >= 0, got {self.num_aux_layers}")
        if isinstance(self.layers, str):
            self.layers = [self.layers]


@dataclass
class KTPECConfig:
    """``ktp_ec``: KTP's config, then EC's (head frozen by default, see the module doc)."""

    ktp: KTPConfig = field(default_factory=KTPConfig)
    ec: ECConfig = field(default_factory=lambda: ECConfig(train_head=False))


@dataclass(kw_only=True)
class ECInfo(MethodInfo):
    """What one EC request did (also set on the model as ``unlearning_info``).

    Attributes:
        method: ``"ec"`` or ``"ktp_ec"``.
        forget_classes: the class ids.
        layers: fx node names of the auxiliary supervision points, shallow to deep.
        layer_weights: their weights, then the final head's.
        epochs, steps: fine-tuning length.
        retain_samples, forget_samples: data used.
        final_loss, final_ce, final_contrastive: mean over the last epoch's steps.
        seconds: wall time of the call (for ``ktp_ec``, KTP included).
        guarantees_zero_forget_accuracy: False for EC; True for ``ktp_ec`` with the head
            frozen (KTP's forget rows are constant ``-1e4`` logits).
        notes: caveats.
        base_info: ``ktp_ec``: KTP's info as a dict.
    """

    layers: list[str]
    layer_weights: list[float]
    epochs: int
    steps: int
    retain_samples: int
    forget_samples: int
    final_loss: float
    final_ce: float
    final_contrastive: float
    guarantees_zero_forget_accuracy: bool = False
    notes: list[str] = field(default_factory=list)
    base_info: dict[str, Any] | None = None


_NO_GUARANTEE = ("EC does not guarantee 0% forget accuracy: it fine-tunes the network with a "
                 "contrastive unlearning loss and an unchanged set of classes; check forget "
                 "accuracy with erm_surgery.evaluate(). Logits are not masked.")


def _cycle(loader: Iterable[Any]) -> Iterable[Any]:
    while True:  # a fresh pass each time (itertools.cycle would replay one shuffle)
        yield from loader


def ec_finetune(
    model: nn.Module,
    forget: Sequence[int],
    data: Dataset | DataLoader,
    config: ECConfig,
    accelerator: Any = None,
) -> ECInfo:
    """EC fine-tuning of ``model`` **in place** (validated ``forget`` ids); returns the info.

    This is the loop ``ec`` and ``ktp_ec`` share; call it on a copy. It runs under its own
    RNG seeded with ``config.seed`` (auxiliary heads, dropout): the caller's is untouched.
    """
    with seeded_rng(config.seed):
        return _ec_finetune(model, forget, data, config, accelerator)


def _ec_finetune(model: nn.Module, forget: Sequence[int], data: Dataset | DataLoader,
                 config: ECConfig, accelerator: Any) -> ECInfo:
    from tqdm.auto import tqdm

    from ...training import make_accelerator

    acc = accelerator or make_accelerator()
    split = split_data(model, list(forget), data, need_forget=True)
    dataset, forget_idx, retain_idx = split.dataset, split.forget_idx, split.retain_idx
    model.to(acc.device)
    example = next(iter(DataLoader(Subset(dataset, forget_idx[:1] + retain_idx[:1]),
                                   batch_size=2)))[0].to(acc.device)
    refuse_cpu_bfloat16_hazards(unwrap(model), example, acc, UnlearningError, "EC")
    plugin = ECPlugin(model, forget, example=example, layers=config.layers,
                      num_aux_layers=config.num_aux_layers, layer_weights=config.layer_weights,
                      temperature=config.temperature,
                      contrastive_weight=config.contrastive_weight,
                      ce_weight=config.ce_weight, deep_supervision=config.deep_supervision)

    base = unwrap(model)
    head_params = set() if config.train_head else {
        id(p) for p in classifier_of(model)[1].parameters()}
    frozen = [p for p in base.parameters() if id(p) in head_params and p.requires_grad]
    for p in frozen:  # unused parameters would stall DDP
        p.requires_grad_(False)
    params = [p for p in base.parameters() if p.requires_grad] + plugin.parameters()
    opt = config.build_optimizer(params)
    retain_loader = shuffled_loader(Subset(dataset, retain_idx), config.batch_size,
                                    seed=config.seed)
    forget_loader = shuffled_loader(Subset(dataset, forget_idx),
                                    min(config.forget_batch_size, len(forget_idx)),
                                    seed=config.seed + 1)
    total = max(1, len(retain_loader) * config.epochs)
    sched = cosine_schedule(opt, total)

    mode = base.training
    net, opt, retain_loader, forget_loader, sched = acc.prepare(
        plugin.network, opt, retain_loader, forget_loader, sched)
    net.train()
    forget_iter = iter(_cycle(forget_loader))
    progress = tqdm(total=total, desc="EC", unit="batch", dynamic_ncols=True,
                    disable=not (config.show_progress and acc.is_main_process))
    last: list[ECLosses] = []
    steps = 0
    try:
        for _ in range(config.epochs):
            last = []
            for xr, yr in retain_loader:
                xf, yf = next(forget_iter)
                x, y = torch.cat([xr, xf]), torch.cat([yr, yf])
                is_forget = torch.zeros(len(y), dtype=torch.bool, device=y.device)
                is_forget[len(yr):] = True
                outputs = net(x)
                loss, parts = plugin.loss(outputs, y, is_forget)
                acc.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                last.append(parts)
                steps += 1
                progress.update(1)
    finally:
        progress.close()
        for p in frozen:
            p.requires_grad_(True)
        base.train(mode)
    # one host sync for the whole run: the per-step parts stayed on the device
    means = (torch.stack([torch.stack([p.total, p.ce, p.contrastive]) for p in last]).mean(0)
             .tolist() if last else [0.0, 0.0, 0.0])
    return ECInfo(
        method="ec", forget_classes=list(forget), layers=list(plugin.layers),
        layer_weights=list(plugin.layer_weights), epochs=config.epochs, steps=steps,
        retain_samples=len(retain_idx), forget_samples=len(forget_idx),
        final_loss=means[0], final_ce=means[1], final_contrastive=means[2],
        notes=[_NO_GUARANTEE])


@register_method("ec", config=ECConfig, info=ECInfo, group="fine-tuning",
                 summary="Erase at the Core: multi-layer contrastive unlearning with deep "
                         "supervision")
def ec(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: ECConfig,
    accelerator: Any = None,
) -> tuple[nn.Module, ECInfo]:
    """Erase at the Core: multi-layer contrastive unlearning with deep supervision.

    Args:
        model: a classifier fx can trace (timm / torchvision CNN, or an attached model);
            never modified: a deep copy is fine-tuned and returned.
        classes: class ids to forget.
        data: training data of ``(image, label)`` (retain and forget classes).
        config: :class:`ECConfig` (through :func:`erm_surgery.unlearn`, keyword overrides
            such as ``epochs=3`` apply on top).
        accelerator: an ``accelerate.Accelerator`` (default :func:`make_accelerator`).

    Returns:
        ``(new_model, info)``: the same kind of model as ``model`` (attached stays
        attached, ``G`` unchanged), with exactly its parameter names, in eval mode.
        ``info.guarantees_zero_forget_accuracy`` is False.
    """
    forget = check_forget_classes(model, classes, require_attached=False)
    student = copy.deepcopy(model)
    info = ec_finetune(student, forget, data, config, accelerator)
    student.eval()
    return student, info


@register_method("ktp_ec", config=KTPECConfig, info=ECInfo, needs_attached=True,
                 group="ktp", summary="KTP, then EC fine-tuning of its student (head frozen)")
def ktp_ec(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: KTPECConfig,
    accelerator: Any = None,
    student: nn.Module | None = None,
) -> tuple[nn.Module, ECInfo]:
    """KTP (ERM-KTP paper) followed by EC fine-tuning of its student (EC as a plug-in).

    ``model`` must be attached and ERM-trained (KTP's requirement). With the default
    ``KTPECConfig().ec.train_head = False`` the student's head stays exactly KTP's, so
    forget accuracy stays 0% (``info.guarantees_zero_forget_accuracy``) while EC moves the
    intermediate representations away from the teacher's. ``config.ktp`` and
    ``config.ec`` are the two methods' configs; ``student=`` goes to KTP.
    """
    forget = check_forget_classes(model, classes, require_attached=True)
    cfg = config
    ec_cfg = cfg.ec
    s, kinfo = ktp(model, forget, data, config=cfg.ktp, accelerator=accelerator,
                   student=student)
    # the classes are now recorded as forgotten in G: the retain split leaves them out,
    # and the forget split still finds their samples by label
    info = ec_finetune(s, forget, data, ec_cfg, accelerator)
    s.eval()
    info.method = "ktp_ec"
    info.base_info = kinfo.to_dict()
    info.guarantees_zero_forget_accuracy = not ec_cfg.train_head
    if not ec_cfg.train_head:
        info.notes = ["the head is KTP's, frozen during EC: the forget classes' logits are "
                      f"the constant {cfg.ktp.forget_bias:g}, so their accuracy is 0%"]
    return s, info
