"""Bad Teacher: distil a competent teacher on the retain data and an incompetent one on the
forget data.

Chundawat, Tarun, Mandal and Kankanhalli, "Can Bad Teaching Induce Forgetting? Unlearning
in Deep Networks Using an Incompetent Teacher", AAAI 2023. The student starts as a copy of
the trained model. Its target on a retain sample is the trained model's softened output
(the competent teacher), on a forget sample the output of a randomly initialised network
of the same architecture (the incompetent teacher); the loss is the KL divergence to that
target. The student is trained on all forget samples and a random part of the retain data.

As in the authors' code (``blindspot_unlearner``, reused by the SSD authors): the
incompetent teacher is a freshly initialised model of the same architecture (here every
module's ``reset_parameters()`` on a copy, seeded), a sample's teacher is chosen by whether
it is a forget sample, KL temperature 1, Adam, 1 epoch over the forget samples plus 30% of
the retain samples. Their ``F.kl_div`` averages over batch *and* classes (a 1/C scale,
which Adam hardly sees); this KL averages over the batch. Their learning rate is 1e-4 at
batch 256 on CIFAR-sized data; on a few hundred samples that is two steps, hence our
defaults (docs/methods.md). Both teachers run frozen, in eval mode, without gradients.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ...training.optim import Recipe
from ...unlearning.registry import register_method
from ...unlearning.request import mark_forgotten, parse_request, reinitialised
from ._steps import StepRun, distill_kl, frozen_teacher, steps_per_epoch
from .common import BaselineInfo

__all__ = ["BadTeacherConfig", "BadTeacherInfo", "bad_teacher"]


@dataclass(kw_only=True)
class BadTeacherConfig(Recipe):
    """Settings of Bad Teacher (the fields of :class:`~erm_surgery.training.optim.Recipe`,
    then its own; ``epochs`` are over the forget samples plus the retain part, ``seed``
    also draws that part and initialises the incompetent teacher).

    Attributes:
        retain_fraction: fraction of the retain samples distilled from the competent
            teacher (a seeded draw; the authors' 0.3).
        temperature: KL temperature (the authors' 1).
    """

    epochs: int = 3
    lr: float = 2e-3
    optimizer: str = "adam"
    retain_fraction: float = 0.3
    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.retain_fraction <= 1:
            raise ValueError(f"retain_fraction must be in (0, 1], got {self.retain_fraction}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0 and finite, got {self.temperature}")


@dataclass(kw_only=True)
class BadTeacherInfo(BaselineInfo):
    """What :func:`bad_teacher` did (``samples``: forget samples plus the retain part).

    Attributes:
        retain_samples: retain samples distilled from the competent teacher.
        forget_samples: forget samples distilled from the incompetent one.
        final_loss: KL of the last batch.
    """

    retain_samples: int = 0
    forget_samples: int = 0
    final_loss: float = math.nan


@register_method("bad_teacher", config=BadTeacherConfig, info=BadTeacherInfo,
                 group="distillation",
                 summary="distil a random teacher on forget, the original on retain "
                         "(Chundawat et al. 2023)")
def bad_teacher(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: BadTeacherConfig,
    accelerator: Any = None,
) -> tuple[nn.Module, BadTeacherInfo]:
    """Bad Teacher (Chundawat et al., AAAI 2023): KL to a random network on the forget
    samples, to the trained model on part of the retain data. See the module docstring.

    ``model`` is not modified. Cost: ``epochs`` passes over the forget samples and
    ``retain_fraction`` of the retain samples, each step with two teacher forward passes.
    """
    cfg = config
    req = parse_request(model, classes, data, need_forget=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_retain = max(1, round(cfg.retain_fraction * len(req.retain_idx)))
    pick = torch.randperm(len(req.retain_idx), generator=gen)[:n_retain].tolist()
    used = sorted(req.forget_idx + [req.retain_idx[i] for i in pick])
    mixed = Subset(req.dataset, used)
    forget_t = torch.as_tensor(req.forget, dtype=torch.long)
    total = steps_per_epoch(mixed, cfg.batch_size) * cfg.epochs
    with StepRun(copy.deepcopy(model), cfg, total_steps=total, accelerator=accelerator,
                 desc="Bad Teacher") as run:
        good = frozen_teacher(model, run.device)
        bad, _ = reinitialised(model, cfg.seed + 1)
        bad = frozen_teacher(bad, run.device)
        is_forget_of = forget_t.to(run.device)
        loader = run.loader(mixed)  # one loader: its generator reshuffles every epoch
        for _ in range(cfg.epochs):
            for x, y in loader:
                with torch.no_grad():
                    is_forget = torch.isin(y, is_forget_of).unsqueeze(1)
                    target = torch.where(is_forget, bad(x), good(x))
                run.step(distill_kl(run.model(x), target, cfg.temperature))
    loop = run.result()
    mark_forgotten(loop.model, req.forget)
    info = BadTeacherInfo(method="bad_teacher", forget_classes=req.forget, device=loop.device,
                          samples=len(used), epochs=cfg.epochs, retain_samples=n_retain,
                          forget_samples=len(req.forget_idx), final_loss=loop.final_loss)
    return loop.model, info
