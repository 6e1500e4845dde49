"""ERM loss pieces (paper Eq. 3-7), usable from any training loop.

``erm_loss(model, x, y, config)`` is the ERM-path objective; the regularisers take ``G``
alone, so a loop that already computes its own CE can add them. Nothing here syncs with
the host: every function returns tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..surgery.mask import ERMMask, apply_channel_mask

__all__ = ["ERMConfig", "l1_hinge", "inner_product", "erm_loss", "find_mask", "is_erm_epoch"]


@dataclass
class ERMConfig:
    """Hyperparameters of ERM training (paper Eq. 7 and Algorithm 1).

    Loss on the ERM path: ``lambda1 * CE + lambda2 * L1-hinge(G) + lambda3 * inner(G)``
    (the paper) ``+ lambda4 * prohibit + permitted_weight * CE(permitted) + std_weight *
    CE(standard path)`` (issue 13; ``lambda4 = permitted_weight = std_weight = 0`` and
    ``erm_every=2`` give the paper's alternate training).

    Attributes:
        lambda1: weight of the ERM-path cross-entropy.
        lambda2: weight of the L1 hinge ``|| relu(||G_c||_1 - alpha / C) ||_p`` (per class
            row; with p=1 and every row over budget it equals the reference code's
            ``relu(||G||_1 - alpha)``).
        lambda3: weight of the inner-product term ``sum_{c1<c2} <G_c1, G_c2>``.
        target_density: the L1 budget as a fraction of ``C * K`` (``alpha = density*C*K``);
            ignored when ``alpha`` is given.
        alpha: the L1 budget of the whole matrix, directly.
        p: the norm over class rows of the hinge.
        erm_every: one ERM epoch every ``erm_every`` epochs (1 = every epoch after the
            warm-up, the default now that an ERM step also trains the standard path through
            ``std_weight``; 2 = the paper's alternate training, 3 = the reference code's
            "1 in 3").
        warmup_epochs: STD epochs before the first ERM epoch.
        projection: ``"row"`` (paper: each class row divided by its max) or ``"channel"``
            (reference code: each channel divided by its max over classes); then clip [0, 1].
        g_lr: learning rate of ``G``'s own optimiser (Adam: its step is about ``g_lr`` per
            entry whatever the loss scale, so ``G`` settles in a few epochs instead of the
            paper's hundreds).
        lambda4: weight of the prohibition term (not in the paper, issue 13): on the ERM
            path each sample's map is also multiplied by the *complement* of its class's
            row (channels with ``G[y] <= 0``, exactly what :func:`prohibition_accuracy`
            keeps) and ``-log(1 - p_y)`` of those logits is added, so the class may not be
            readable from channels outside its row. Same backbone pass, one extra head pass;
            0 turns it off (the paper's objective).
        permitted_weight: weight of the permitted term (not in the paper, issue 13): each
            sample's map is also multiplied by the complement of the row of a random
            *other* class, and the cross-entropy of its own label on those logits is added,
            so a class stays readable when another class is prohibited. Without it the
            permitted accuracy fell 3.1-7.9 points below STD on the models with many
            channels per class (efficientnet_b0, resnet50; docs/training.md). Same backbone
            pass.
        std_weight: weight of the standard path's cross-entropy (the unmasked map through
            the head) in every ERM step (not in the paper, issue 13). With it an ERM epoch
            trains both paths from one backbone pass, so no epoch is given up to the other
            path: alternating epochs cost the mobile families 1.1-11.6 points of STD accuracy
            against plain training; with the joint step STD stayed within -0.4 to +1.3
            points of plain on 7 models x 2 seeds (docs/training.md).
        prune_below: at the end of a run's last ERM epoch, entries of ``G`` below this are set
            to 0 (:meth:`ERMMask.prune_`; not in the paper, issue 13). Adam moves every entry
            by about ``g_lr`` a step, so entries of channels a class does not use drift just
            above 0 and prohibition would remove them too; at K = 1280 that was 183 of a
            class's 394 channels, and pruning them at 0.1 raised the permitted accuracy 3.6
            points. Off by default (0 keeps every positive entry, the paper): on resnet50
            (K = 2048) the same prune let the prohibited class keep 15% instead of 1.9%, so
            check ``prohibition_accuracy`` before relying on it.
    """

    lambda1: float = 1.0
    lambda2: float = 3e-4
    lambda3: float = 1.5e-4
    target_density: float = 0.1
    alpha: float | None = None
    p: float = 1.0
    erm_every: int = 1
    warmup_epochs: int = 1
    projection: str = "row"
    g_lr: float = 0.05
    lambda4: float = 1.0
    permitted_weight: float = 1.0
    std_weight: float = 1.0
    prune_below: float = 0.0

    def __post_init__(self) -> None:
        if self.erm_every < 1:
            raise ValueError(f"erm_every must be >= 1, got {self.erm_every}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0.0 < self.target_density <= 1.0:
            raise ValueError(f"target_density must be in (0, 1], got {self.target_density}")
        if self.projection not in ("row", "channel"):
            raise ValueError(f"projection must be 'row' or 'channel', got {self.projection!r}")
        if self.p <= 0:
            raise ValueError(f"p must be > 0, got {self.p}")
        for name in ("lambda4", "permitted_weight", "std_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.prune_below < 1.0:
            raise ValueError(f"prune_below must be in [0, 1), got {self.prune_below}")

    @classmethod
    def retrofit(cls, **overrides: Any) -> ERMConfig:
        """The config for an ERM fine-tune of an already-trained model (issue 14): every
        epoch on the ERM path (``warmup_epochs=0, erm_every=1``), since the weights need no
        warm-up (each ERM step still trains the standard path through ``std_weight``). Use it with a
        smaller ``lr`` than training from scratch (e.g. 0.01)::

            model = erm_surgery.attach(trained_model)
            erm_surgery.train(model, data, epochs=4, lr=0.01, config=ERMConfig.retrofit())

        Measured in benchmarks/results/retrofit.md.
        """
        return cls(**{"warmup_epochs": 0, "erm_every": 1, **overrides})

    def budget(self, num_classes: int, num_channels: int) -> float:
        """``alpha``: the L1 budget of the whole ``G``."""
        if self.alpha is not None:
            return float(self.alpha)
        return self.target_density * num_classes * num_channels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_erm_epoch(epoch: int, config: ERMConfig) -> bool:
    """Whether 0-based ``epoch`` takes the ERM path under ``config``'s schedule."""
    if epoch < config.warmup_epochs:
        return False
    return (epoch - config.warmup_epochs) % config.erm_every == config.erm_every - 1


def l1_hinge(G: torch.Tensor, alpha: float, p: float = 1.0) -> torch.Tensor:
    """``|| relu(||G_c||_1 - alpha / C) ||_p`` over class rows ``c``."""
    over = F.relu(G.abs().sum(dim=1) - alpha / G.shape[0])
    if p == 1:
        return over.sum()
    return over.norm(p=p)


def inner_product(G: torch.Tensor) -> torch.Tensor:
    """``sum_{c1 < c2} <G_c1, G_c2>`` in O(C*K): half of ``||sum_c G_c||^2 - sum ||G_c||^2``."""
    total = G.sum(dim=0)
    return 0.5 * (total.pow(2).sum() - G.pow(2).sum())


def _attached(model: nn.Module) -> nn.Module:
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and not hasattr(model, "erm"):
            model = getattr(model, attr)
    return model


def find_mask(model: nn.Module) -> ERMMask:
    """The ``ERMMask`` of an attached model, also through DDP, Accelerate or torch.compile."""
    mask = getattr(_attached(model), "erm", None)
    if not isinstance(mask, ERMMask):
        raise TypeError("the model has no ERM mask: call erm_surgery.attach(model) first")
    return mask


Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def erm_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: ERMConfig | None = None,
    *,
    criterion: Criterion | None = None,
    return_terms: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ERM-path objective for one batch (one forward pass).

    ``model`` is an attached model, possibly wrapped (DDP, ``accelerator.prepare``,
    ``torch.compile``). ``y`` holds class ids ``(N,)`` or soft targets ``(N, C)`` (timm's
    ``Mixup`` / CutMix, label smoothing): a soft target's mask is the label-weighted mix of
    ``G``'s rows. ``criterion(logits, y)`` replaces the cross-entropy (e.g. timm's
    ``SoftTargetCrossEntropy`` or ``LabelSmoothingCrossEntropy``); the default,
    ``F.cross_entropy``, takes both kinds of target. Returns the scalar loss, or
    ``(loss, terms)`` with the detached ``ce``, ``l1``, ``inner``, ``prohibit``,
    ``permitted`` and ``std`` parts (unweighted) and the ERM-path ``logits``.

    With a model whose head reads only the feature map, the backbone runs once, unmasked,
    through ``model`` (so DDP sees the call); the map is then multiplied by the sample's
    mask, by its complement (``lambda4``), by the complement of another class's row
    (``permitted_weight``) and left as it is (``std_weight``), and all go through the head
    as one batch. A model whose head reads more than the map gets the ERM path and, for
    ``std_weight``, a second pass on the standard path; the prohibited and permitted terms
    would each need another backbone pass and are skipped.
    """
    config = config or ERMConfig()
    criterion = criterion or F.cross_entropy
    mask = find_mask(model)
    G = mask.G
    inner_model = _attached(model)
    zero = torch.zeros((), device=G.device)
    prohibit, permitted, std = zero, zero, zero
    n = x.shape[0]
    wants_head = config.lambda4 > 0 or config.permitted_weight > 0 or config.std_weight > 0
    if wants_head and getattr(inner_model, "has_head_graph", False):
        # one backbone pass; every masked copy of the map goes through the (cheap) head as
        # one batch, in the order masked, prohibited, permitted, unmasked
        feats = model(x, return_features=True)
        rows = mask.weights(y, n)
        dim = inner_model.surgery.channel_dim
        maps = [apply_channel_mask(feats, rows, dim)]
        if config.lambda4 > 0:
            maps.append(apply_channel_mask(feats, (rows <= 0).to(feats.dtype), dim))
        if config.permitted_weight > 0:
            other_row, y_other = _another_class(G, y)
            maps.append(apply_channel_mask(feats, (other_row <= 0).to(feats.dtype), dim))
        if config.std_weight > 0:
            maps.append(feats)
        outputs = list(inner_model.forward_head(torch.cat(maps)).split(n))
        logits = outputs.pop(0)
        if config.lambda4 > 0:
            prohibit = _prohibition_term(outputs.pop(0), y)
        if config.permitted_weight > 0:
            permitted = criterion(outputs.pop(0), y_other)
        if config.std_weight > 0:
            std = criterion(outputs.pop(0), y)
    else:
        logits = model(x, labels=y)
        if config.std_weight > 0:
            # the head reads more than the map: the standard path needs its own pass
            std = criterion(model(x), y)
    ce = criterion(logits, y)
    l1 = l1_hinge(G, config.budget(*G.shape), config.p)
    inner = inner_product(G)
    loss = (config.lambda1 * ce + config.lambda2 * l1 + config.lambda3 * inner
            + config.lambda4 * prohibit + config.permitted_weight * permitted
            + config.std_weight * std)
    if not return_terms:
        return loss
    terms = {"ce": ce.detach(), "l1": l1.detach(), "inner": inner.detach(),
             "prohibit": prohibit.detach(), "permitted": permitted.detach(),
             "std": std.detach(), "logits": logits.detach()}
    return loss, terms


def _another_class(G: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the row of ``G`` of a random class other than its own (its top class for
    soft targets), and the target with that class's share removed: the class the sample
    must still be recognised as when that other class is prohibited."""
    C = G.shape[0]
    hard = y.argmax(dim=1) if y.is_floating_point() else y
    other = (hard + torch.randint(1, C, hard.shape, device=hard.device)) % C
    if not y.is_floating_point():
        return G[other], y
    target = y.scatter(1, other[:, None], 0.0)
    return G[other], target / target.sum(dim=1, keepdim=True).clamp_min(1e-12)


def _prohibition_term(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``-log(1 - p_y)`` of the logits read from the channels outside the sample's mask:
    the class must not survive its prohibition. Soft targets weight it per class."""
    log_p = F.log_softmax(logits.float(), dim=1)
    gone = -torch.log1p(-log_p.exp().clamp_max(1 - 1e-6))  # (N, C): -log(1 - p_c)
    if y.is_floating_point():
        return (gone * y.float()).sum(dim=1).mean()
    return gone.gather(1, y[:, None]).mean()
