"""SalUn: random-label fine-tuning restricted to the weights salient for the forget data.

Fan, Liu, Zhang, Wei, Wong and Liu, "SalUn: Empowering Machine Unlearning via Gradient-based
Weight Saliency in Both Image Classification and Generation", ICLR 2024. Two steps:

1. **Saliency**: the gradient of the forget loss, summed over the forget set, in eval
   mode; a weight is *salient* when its ``|gradient|`` is among the top ``saliency_ratio``
   of all trainable weights (one global ranking across layers, as the authors' mask
   script does; the example run of their README uses the 50% mask).
2. **Random labels on the salient weights**: fine-tune on the forget samples with random
   labels and on the retain samples with their own; the gradient of every other weight is
   zeroed and, after each optimiser step, those weights are put back to their starting
   values and their momentum cleared (the reference code does the same, so weight decay
   and momentum move only the salient weights).

Where this differs from the reference code: the random labels are drawn from the retained
classes (theirs from all C classes, the true one included), and forget and retain
samples are mixed in one shuffled stream (their CIFAR-10 loop runs the forget pass, then
the retain pass, in each epoch); the schedule is the library's cosine.
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
from ...training.optim import Recipe
from ...unlearning.registry import register_method
from ...unlearning.request import mark_forgotten, parse_request
from ._steps import StepRun, steps_per_epoch
from .common import BaselineInfo

__all__ = ["SalUnConfig", "SalUnInfo", "salun", "saliency_mask"]


@dataclass(kw_only=True)
class SalUnConfig(Recipe):
    """Settings of SalUn (the fields of :class:`~erm_surgery.training.optim.Recipe`, then
    its own; ``epochs`` are over all data, ``seed`` also draws the random labels).

    Attributes:
        saliency_ratio: fraction of the trainable weights that are salient and trained
            (0.5: the mask of the authors' example run).
    """

    epochs: int = 2
    lr: float = 0.02
    saliency_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.saliency_ratio <= 1:
            raise ValueError(f"saliency_ratio must be in (0, 1], got {self.saliency_ratio}")


@dataclass(kw_only=True)
class SalUnInfo(BaselineInfo):
    """What :func:`salun` did.

    Attributes:
        saliency_ratio: the fraction asked for.
        salient_weights: weights that were trained (the rest ended where they started).
        total_weights: trainable weights ranked.
        relabelled_samples: forget samples fine-tuned with random labels.
        final_loss: loss of the last batch.
    """

    saliency_ratio: float = math.nan
    salient_weights: int = 0
    total_weights: int = 0
    relabelled_samples: int = 0
    final_loss: float = math.nan


def saliency_mask(net: nn.Module, forget: Dataset, ratio: float, *, batch_size: int,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """``{parameter name: bool mask}`` of the salient weights of ``net`` (every parameter
    that requires grad): the top ``ratio`` of ``|sum over forget batches of the gradient
    of the mean cross-entropy|``, ranked across all layers at once. ``net`` is read in eval
    mode and left as it was (its gradients included)."""
    was_training = net.training
    net.eval()  # BatchNorm on running statistics: the saliency of the trained model
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) for _, p in named]
    for x, y in DataLoader(forget, batch_size=batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(net(x).float(), y)
        for g, d in zip(grads, torch.autograd.grad(loss, [p for _, p in named],
                                                   allow_unused=True), strict=True):
            if d is not None:
                g += d
    net.train(was_training)
    flat = torch.cat([g.abs().flatten() for g in grads])
    keep = max(1, round(ratio * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, keep, sorted=False).indices] = True  # exactly `keep`, ties cut
    masks, start = {}, 0
    for (name, p), g in zip(named, grads, strict=True):
        masks[name] = chosen[start:start + g.numel()].view_as(p)
        start += g.numel()
    return masks


@register_method("salun", config=SalUnConfig, info=SalUnInfo, group="baseline",
                 summary="random labels on the weights salient for the forget data "
                         "(Fan et al. 2024)")
def salun(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: SalUnConfig,
    accelerator: Any = None,
) -> tuple[nn.Module, SalUnInfo]:
    """SalUn (Fan et al., ICLR 2024): a saliency mask from the forget-loss gradient, then
    random-label fine-tuning of the salient weights only. See the module docstring.

    ``model`` is not modified. Cost: one gradient pass over the forget set, then
    ``epochs`` passes over all data.
    """
    cfg = config
    req = parse_request(model, classes, data, need_forget=True)
    student = copy.deepcopy(model)
    everything = Subset(req.dataset, sorted(req.retain_idx + req.forget_idx))
    pool = torch.as_tensor(req.retain_classes, dtype=torch.long)
    forget_t = torch.as_tensor(req.forget, dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    total = steps_per_epoch(everything, cfg.batch_size) * cfg.epochs
    net = unwrap(student)
    state: dict[str, Any] = {}

    def keep_frozen(run: StepRun) -> None:
        # the non-salient weights go back to where they started; weight decay and
        # momentum would otherwise move them
        with torch.no_grad():
            opt_state = run.optimizer.optimizer.state
            for p, m, start in state["frozen"]:
                p.copy_(torch.where(m, p, start))
                buf = opt_state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.mul_(m)

    with StepRun(student, cfg, total_steps=total, accelerator=accelerator, desc="SalUn",
                 after_step=keep_frozen) as run:
        masks = saliency_mask(net, req.forget_set(), cfg.saliency_ratio,
                              batch_size=cfg.batch_size, device=run.device)
        params = dict(net.named_parameters())
        state["frozen"] = [(params[n], m, params[n].detach().clone()) for n, m in masks.items()]
        hooks = [params[n].register_hook(lambda g, m=m: g * m) for n, m in masks.items()]
        try:
            loader = run.loader(everything)
            for _ in range(cfg.epochs):
                for x, y in loader:
                    # drawn on the CPU from a seeded generator: runs repeat on any device
                    draw = pool[torch.randint(len(pool), (y.shape[0],), generator=gen)]
                    y = torch.where(torch.isin(y, forget_t.to(y.device)), draw.to(y.device), y)
                    run.step(F.cross_entropy(run.model(x), y))
        finally:
            for h in hooks:
                h.remove()
    loop = run.result()
    mark_forgotten(loop.model, req.forget)
    salient = sum(int(m.sum()) for m in masks.values())
    info = SalUnInfo(method="salun", forget_classes=req.forget, device=loop.device,
                     samples=len(everything), epochs=cfg.epochs,
                     saliency_ratio=cfg.saliency_ratio, salient_weights=salient,
                     total_weights=sum(m.numel() for m in masks.values()),
                     relabelled_samples=len(req.forget_idx), final_loss=loop.final_loss)
    return loop.model, info
