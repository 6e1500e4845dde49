"""Fine-tuning baselines: fine-tune on the retain data, random labels, NegGrad.

All three start from a copy of the trained model and run a few epochs of SGD
(:func:`~erm_surgery.methods.baselines.common.sgd_loop`); they differ in the data and the
loss. They are cheap, and they are *output-level* unlearning: the ERM-KTP paper (section
5.4, Fig. 2) shows fine-tune and random-label models relearn the forgotten classes about
twice as fast as a retrained model, because the features still carry them.
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

from ...training.optim import Recipe
from ...unlearning.registry import register_method
from ...unlearning.request import mark_forgotten, parse_request
from .common import BaselineInfo, sgd_loop

__all__ = ["FinetuneConfig", "FinetuneInfo", "finetune", "RandomLabelsConfig",
           "RandomLabelsInfo", "random_labels", "NegGradConfig", "NegGradInfo", "neggrad"]


# ----------------------------------------------------------------------- fine-tune


@dataclass(kw_only=True)
class FinetuneConfig(Recipe):
    """Fine-tune on the retain data with a larger learning rate than training ended with.

    The fields of :class:`~erm_surgery.training.optim.Recipe`. ``lr``: training ends at a
    learning rate near 0 (cosine) and starts at 0.05 (``train``'s default); on MNIST-5k 0.02
    and 0.05 for 2 epochs left the forget classes at 90% and 20% test accuracy, 0.1 took them to 0%
    (docs/baselines.md). Forgetting sets in after a number of *steps*: on a smaller dataset
    give it more epochs.
    """

    epochs: int = 2
    lr: float = 0.1


@dataclass(kw_only=True)
class FinetuneInfo(BaselineInfo):
    """What :func:`finetune` did (``final_loss``: cross-entropy of the last batch)."""

    lr: float = 0.0
    final_loss: float = math.nan


@register_method("finetune", config=FinetuneConfig, info=FinetuneInfo,
                 summary="fine-tune on the retain data (Golatkar et al. 2020)")
def finetune(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: FinetuneConfig,
    accelerator: Any = None,
) -> tuple[nn.Module, FinetuneInfo]:
    """Fine-tune a copy of ``model`` on the retain data (catastrophic forgetting does the rest).

    The baseline "Fine-tune" of the ERM-KTP paper (section 5.4) and of Golatkar et al.,
    "Eternal Sunshine of the Spotless Net", CVPR 2020. ``model`` is not modified. Cost:
    ``epochs`` passes over the retain data.
    """
    cfg = config
    req = parse_request(model, classes, data)
    loop = sgd_loop(copy.deepcopy(model), req.retain_set(), cfg, accelerator=accelerator,
                    desc="fine-tune")
    mark_forgotten(loop.model, req.forget)
    info = FinetuneInfo(method="finetune", forget_classes=req.forget, device=loop.device,
                        samples=len(req.retain_idx), epochs=cfg.epochs, lr=cfg.lr,
                        final_loss=loop.final_loss)
    return loop.model, info


# ----------------------------------------------------------------------- random labels


@dataclass(kw_only=True)
class RandomLabelsConfig(Recipe):
    """Fine-tune on all data with the forget samples' labels drawn at random.

    The fields of :class:`~erm_surgery.training.optim.Recipe` (one epoch took the forget
    classes to 0% on MNIST-5k; ``seed`` also draws the random labels).
    """

    epochs: int = 1
    lr: float = 0.01


@dataclass(kw_only=True)
class RandomLabelsInfo(BaselineInfo):
    """What :func:`random_labels` did.

    Attributes:
        relabelled_samples: forget samples that got random labels (fresh ones every time
            they are drawn).
        label_pool: the classes the random labels are drawn from (the retained ones).
        final_loss: loss of the last batch.
    """

    relabelled_samples: int = 0
    label_pool: list[int] | None = None
    final_loss: float = math.nan


@register_method("random_labels", config=RandomLabelsConfig, info=RandomLabelsInfo,
                 summary="fine-tune with the forget samples relabelled at random "
                         "(Graves et al. 2021)")
def random_labels(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: RandomLabelsConfig,
    accelerator: Any = None,
) -> tuple[nn.Module, RandomLabelsInfo]:
    """Random labels: fine-tune a copy on all data, each forget sample labelled with a
    random *retained* class, redrawn every time it is seen.

    Graves et al., "Amnesiac Machine Learning", AAAI 2021 (their "unlearning" by
    relabelling); "RL" in the ERM-KTP paper (section 5.4). Labels come from the retained
    classes only: a label of another forget class would teach that class. ``model`` is
    not modified. Cost: ``epochs`` passes over all data.
    """
    cfg = config
    req = parse_request(model, classes, data, need_forget=True)
    pool = torch.as_tensor(req.retain_classes, dtype=torch.long)
    forget_t = torch.as_tensor(req.forget, dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    def relabelled_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # drawn on the CPU from a seeded generator, so runs repeat on any device
        draw = pool[torch.randint(len(pool), (y.shape[0],), generator=gen)].to(y.device)
        y = torch.where(torch.isin(y, forget_t.to(y.device)), draw, y)
        return F.cross_entropy(logits, y)

    everything = Subset(req.dataset, sorted(req.retain_idx + req.forget_idx))
    loop = sgd_loop(copy.deepcopy(model), everything, cfg, accelerator=accelerator,
                    loss_fn=relabelled_ce, desc="random labels")
    mark_forgotten(loop.model, req.forget)
    info = RandomLabelsInfo(method="random_labels", forget_classes=req.forget, device=loop.device,
                            samples=len(everything), epochs=cfg.epochs,
                            relabelled_samples=len(req.forget_idx),
                            label_pool=pool.tolist(), final_loss=loop.final_loss)
    return loop.model, info


# ----------------------------------------------------------------------- NegGrad


@dataclass(kw_only=True)
class NegGradConfig(Recipe):
    """Gradient ascent on the forget samples, descent on the retain samples.

    The loss of a minibatch of all data is
    ``mean CE(retain samples) - forget_weight * mean min(CE(forget samples), ascent_bound)``.
    The cap bounds the ascent: a forget sample whose loss already exceeds ``ascent_bound``
    gets no gradient, so its logits are not pushed to infinity (plain NegGrad diverges).

    Attributes (besides those of :class:`~erm_surgery.training.optim.Recipe`; ``epochs``
    are over all data):
        forget_weight: weight of the ascent term.
        ascent_bound: per-sample cap of the forget loss; ``None`` = ``2 * ln(C)``, twice the
            loss of a uniform prediction (the true class then has probability ``1/C^2``).
    """

    epochs: int = 2
    lr: float = 0.01
    forget_weight: float = 1.0
    ascent_bound: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.forget_weight < 0:
            raise ValueError(f"forget_weight must be >= 0, got {self.forget_weight}")
        if self.ascent_bound is not None and not self.ascent_bound > 0:
            raise ValueError(f"ascent_bound must be > 0, got {self.ascent_bound}")


@dataclass(kw_only=True)
class NegGradInfo(BaselineInfo):
    """What :func:`neggrad` did.

    Attributes:
        ascent_bound: the per-sample cap used.
        forget_samples: forget samples ascended on.
        final_loss: combined loss of the last batch.
    """

    ascent_bound: float = math.nan
    forget_samples: int = 0
    final_loss: float = math.nan


@register_method("neggrad", config=NegGradConfig, info=NegGradInfo,
                 summary="descent on retain, bounded ascent on forget (Kurmanji et al. 2023)")
def neggrad(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: NegGradConfig,
    accelerator: Any = None,
) -> tuple[nn.Module, NegGradInfo]:
    """NegGrad+: descend on the retain samples and (bounded) ascend on the forget samples.

    Golatkar et al., CVPR 2020 (NegGrad, ascent only); Kurmanji et al., "Towards Unbounded
    Machine Unlearning", NeurIPS 2023 (NegGrad+, with the retain term). Each minibatch
    mixes retain and forget samples in their data proportion. ``model`` is not modified.
    Cost: ``epochs`` passes over all data.
    """
    cfg = config
    req = parse_request(model, classes, data, need_forget=True)
    bound = cfg.ascent_bound if cfg.ascent_bound is not None else 2 * math.log(req.num_classes)
    forget_t = torch.as_tensor(req.forget, dtype=torch.long)

    def ascent_descent(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, y, reduction="none")
        is_forget = torch.isin(y, forget_t.to(y.device)).to(ce.dtype)
        keep = 1 - is_forget
        # masked means, no host sync; an absent group contributes 0
        descent = (ce * keep).sum() / keep.sum().clamp_min(1)
        ascent = (ce.clamp(max=bound) * is_forget).sum() / is_forget.sum().clamp_min(1)
        return descent - cfg.forget_weight * ascent

    everything = Subset(req.dataset, sorted(req.retain_idx + req.forget_idx))
    loop = sgd_loop(copy.deepcopy(model), everything, cfg, accelerator=accelerator,
                    loss_fn=ascent_descent, desc="NegGrad")
    mark_forgotten(loop.model, req.forget)
    info = NegGradInfo(method="neggrad", forget_classes=req.forget, device=loop.device,
                       samples=len(everything), epochs=cfg.epochs, ascent_bound=bound,
                       forget_samples=len(req.forget_idx), final_loss=loop.final_loss)
    return loop.model, info
