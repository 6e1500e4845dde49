"""SSD: selective synaptic dampening, training-free.

Foster, Schoepf and Brintrup, "Fast Machine Unlearning Without Retraining Through Selective
Synaptic Dampening", AAAI 2024. The diagonal importance of each weight is estimated on the
forget data (``[]_D_f``) and on all the training data (``[]_D``); a weight whose forget
importance exceeds ``alpha`` times its overall importance is specific to the forget data,
and is multiplied by ``beta = min(lambda * []_D / []_D_f, 1)`` (never grown). No gradient
step, no retain fine-tuning: two gradient passes over the data, then one multiplication.

As in the authors' code (``ParameterPerturber.calc_importance`` / ``modify_weight``): the
importance is the squared gradient of a *minibatch's* mean cross-entropy (the true labels),
summed over minibatches and divided by their number, in eval mode; "all the data" is
retain plus forget samples; every trainable parameter (BatchNorm included) may be
dampened; their full-class defaults are ``alpha = 10``, ``lambda = 1``. The minibatch
squared gradient is not the per-sample Fisher diagonal (``fisher`` computes that): the
importance depends on ``batch_size``, which is why it is a field here.
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
from torch.utils.data import DataLoader, Dataset, Subset

from ...surgery import unwrap
from ...unlearning.registry import register_method
from ...unlearning.request import device_name, mark_forgotten, parse_request
from .common import BaselineInfo

__all__ = ["SSDConfig", "SSDInfo", "ssd", "batch_importance"]


@dataclass
class SSDConfig:
    """Settings of selective synaptic dampening (defaults: the authors' full-class ones
    for CNNs; the trade-off ``alpha`` sets is measured in docs/methods.md).

    Attributes:
        alpha: selection threshold: a weight is dampened when its forget importance
            exceeds ``alpha`` times its importance on all the data.
        dampening: ``lambda``: a selected weight is multiplied by
            ``min(dampening * importance_all / importance_forget, 1)``.
        batch_size: minibatch size of the importance estimates.
        max_samples: samples of all the data the overall importance is estimated on (a
            seeded subset; the forget samples always all count); None = all.
        seed: draws that subset.
        show_progress: tqdm bar.
    """

    alpha: float = 10.0
    dampening: float = 1.0
    batch_size: int = 64
    max_samples: int | None = None
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be > 0 and finite, got {self.alpha}")
        if not (self.dampening > 0 and math.isfinite(self.dampening)):
            raise ValueError(f"dampening must be > 0 and finite, got {self.dampening}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {self.max_samples}")


@dataclass(kw_only=True)
class SSDInfo(BaselineInfo):
    """What :func:`ssd` did (``samples``: the samples the overall importance saw;
    ``epochs``: 0, nothing is trained).

    Attributes:
        alpha, dampening: the settings used.
        forget_samples: samples the forget importance saw.
        dampened_weights: weights multiplied by a factor below 1.
        dampened_fraction: their fraction of the trainable weights.
        mean_factor: mean factor of the dampened weights (1 = unchanged, 0 = zeroed).
    """

    alpha: float = math.nan
    dampening: float = math.nan
    forget_samples: int = 0
    dampened_weights: int = 0
    dampened_fraction: float = math.nan
    mean_factor: float = math.nan


def batch_importance(net: nn.Module, data: Dataset, *, batch_size: int,
                     device: torch.device, show_progress: bool = False,
                     desc: str = "importance") -> dict[str, torch.Tensor]:
    """``{name: importance}`` for every parameter of ``net`` that requires grad: the mean
    over minibatches of the squared gradient of the minibatch's mean cross-entropy (SSD's
    estimate), in eval mode; ``net`` is left as it was."""
    from tqdm.auto import tqdm

    was_training = net.training
    net.eval()
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    imp = {n: torch.zeros_like(p) for n, p in named}
    batches = 0
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    for x, y in tqdm(loader, desc=desc, disable=not show_progress, leave=False):
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(net(x).float(), y)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        for (n, _), g in zip(named, grads, strict=True):
            if g is not None:
                imp[n] += g.pow(2)
        batches += 1
    for v in imp.values():
        v /= max(batches, 1)
    net.train(was_training)
    return imp


@register_method("ssd", config=SSDConfig, info=SSDInfo, group="training-free",
                 summary="dampen the weights important to the forget data only, no "
                         "training (Foster et al. 2024)")
def ssd(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: SSDConfig,
    accelerator: Any = None,
) -> tuple[nn.Module, SSDInfo]:
    """Selective synaptic dampening (Foster et al., AAAI 2024). See the module docstring.

    Runs on ``accelerator.device`` when given (one process), else where the model is.
    ``model`` is not modified. Cost: one gradient pass over the forget data and one over
    all the data (or ``max_samples`` of it); no training.
    """
    cfg = config
    req = parse_request(model, classes, data, need_forget=True)
    out = copy.deepcopy(model)
    if accelerator is not None:
        out.to(accelerator.device)
    net = unwrap(out)
    device = next(net.parameters()).device
    everything = sorted(req.retain_idx + req.forget_idx)
    if cfg.max_samples is not None and len(everything) > cfg.max_samples:
        gen = torch.Generator().manual_seed(cfg.seed)
        retain = req.retain_idx
        room = max(0, cfg.max_samples - len(req.forget_idx))
        pick = torch.randperm(len(retain), generator=gen)[:room].tolist()
        everything = sorted(req.forget_idx + [retain[i] for i in pick])
    forget_imp = batch_importance(net, req.forget_set(), batch_size=cfg.batch_size,
                                  device=device, show_progress=cfg.show_progress,
                                  desc="SSD forget importance")
    all_imp = batch_importance(net, Subset(req.dataset, everything),
                               batch_size=cfg.batch_size, device=device,
                               show_progress=cfg.show_progress, desc="SSD importance")
    params = dict(net.named_parameters())
    dampened = total = 0
    factor_sum = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for name, f_imp in forget_imp.items():
            o_imp = all_imp[name]
            chosen = f_imp > cfg.alpha * o_imp
            # where chosen, f_imp > 0, so the division is finite
            factor = (cfg.dampening * o_imp / f_imp.where(chosen, torch.ones_like(f_imp))
                      ).clamp(max=1.0)
            factor = torch.where(chosen, factor, torch.ones_like(factor))
            params[name].mul_(factor.to(params[name].dtype))
            below = factor < 1
            dampened += int(below.sum())
            factor_sum += factor[below].double().sum()
            total += factor.numel()
    out.eval()
    mark_forgotten(out, req.forget)
    info = SSDInfo(method="ssd", forget_classes=req.forget, device=device_name(device),
                   samples=len(everything), epochs=0, alpha=cfg.alpha, dampening=cfg.dampening,
                   forget_samples=len(req.forget_idx), dampened_weights=dampened,
                   dampened_fraction=dampened / max(total, 1),
                   mean_factor=float(factor_sum) / dampened if dampened else 1.0)
    return out, info
