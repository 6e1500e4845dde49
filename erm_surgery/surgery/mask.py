"""The ERM mask: a learnable class-by-channel matrix ``G`` (ERM-KTP paper, section 4.1)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["ERMMask", "apply_channel_mask", "check_labels"]


def apply_channel_mask(
    features: torch.Tensor, weights: torch.Tensor | None, channel_dim: int = 1
) -> torch.Tensor:
    """Multiply a 4-D feature map by per-sample channel weights.

    This is the op the surgery inserts after the feature node. ``weights`` is ``None`` on
    the STD path, and the map is returned untouched (so the plain forward stays
    bit-identical); otherwise it is ``(N, K)`` (one row of ``G`` per sample) or ``(K,)``
    (one mask for the whole batch), broadcast over the spatial dimensions.
    """
    if weights is None:
        return features
    w = weights.to(dtype=features.dtype)
    if w.dim() == 1:
        w = w.unsqueeze(0)
    shape = [w.shape[0], 1, 1, 1]
    shape[channel_dim] = w.shape[1]
    return features * w.reshape(shape)


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_labels(labels: torch.Tensor, batch: int, num_classes: int) -> torch.Tensor:
    """The labels of the ERM path, checked: class ids ``(N,)`` come back as int64, soft
    targets ``(N, C)`` (mixup, CutMix, label smoothing) as they are.

    The range of class ids is checked without a host sync where that would cost one: under
    ``torch.compile`` (no graph break) and on accelerators it is a device-side assert; in
    eager mode on the CPU it is a plain check with a readable message.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point():
        if labels.shape != (batch, num_classes):
            raise ValueError(
                f"float labels are soft targets and must have shape ({batch}, {num_classes}) "
                f"(one probability row per sample, e.g. from timm's Mixup), got "
                f"{tuple(labels.shape)}; pass class ids as an integer tensor of shape ({batch},)")
        return labels
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"labels must be integer class ids or float soft targets, got "
                        f"{labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), one per sample, got "
                         f"{tuple(labels.shape)}")
    if torch.compiler.is_compiling() or labels.device.type != "cpu":
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(),
                            "labels out of range for the ERM mask")
    elif batch and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be class ids in 0..{num_classes - 1}, got values "
                         f"{int(labels.min())}..{int(labels.max())}")
    return labels.long()


class ERMMask(nn.Module):
    """Owns ``G`` (``num_classes x num_channels``, entries in [0, 1], rows with max 1).

    ``G[c, k]`` says how much class ``c`` may use channel ``k`` of the feature map on the
    ERM path. ``forgotten`` (a bool buffer, saved with the weights) records the classes
    removed by unlearning; their rows stay zero through every projection.
    """

    def __init__(self, num_classes: int, num_channels: int, init: float = 0.5) -> None:
        super().__init__()
        if num_classes < 2 or num_channels < 1:
            raise ValueError(
                f"an ERM mask needs >= 2 classes and >= 1 channel, got C={num_classes}, "
                f"K={num_channels}"
            )
        if not 0.0 < init <= 1.0:
            raise ValueError(f"init must be in (0, 1], got {init}")
        self.G = nn.Parameter(torch.full((num_classes, num_channels), float(init)))
        self.register_buffer("forgotten", torch.zeros(num_classes, dtype=torch.bool))

    @property
    def num_classes(self) -> int:
        return self.G.shape[0]

    @property
    def num_channels(self) -> int:
        return self.G.shape[1]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_channels={self.num_channels}"

    @property
    def forgotten_classes(self) -> list[int]:
        """Class ids removed by unlearning, ascending."""
        return torch.nonzero(self.forgotten).flatten().tolist()

    def weights(self, labels: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """The ``(N, K)`` channel weights of the ERM path for ``labels``.

        ``labels`` are class ids ``(N,)`` (the rows ``G[labels]``) or soft targets ``(N, C)``
        such as timm's ``Mixup`` / CutMix / label smoothing give (the label-weighted mix of
        rows, ``labels @ G``: a mixed image may use the channels of both its classes). They
        are checked first (:func:`check_labels`); ``batch`` is the expected ``N``.
        """
        labels = check_labels(labels, labels.shape[0] if batch is None else batch,
                              self.num_classes)
        if labels.is_floating_point():
            return labels.to(self.G.dtype) @ self.G
        return self.G[labels]

    @torch.no_grad()
    def project_(self, mode: str = "row", eps: float = 1e-12) -> ERMMask:
        """Projected-gradient step: normalise, then clip ``G`` to [0, 1], in place.

        ``mode="row"`` divides each class row by its max (the paper, ``||G_c||_inf = 1``);
        ``mode="channel"`` divides each channel column by its max over classes (the reference
        code). Rows that are all <= 0 and forgotten rows end as zeros.
        """
        G = self.G.data
        if mode == "row":
            scale = G.amax(dim=1, keepdim=True)
        elif mode == "channel":
            scale = G.amax(dim=0, keepdim=True)
        else:
            raise ValueError(f"projection mode must be 'row' or 'channel', got {mode!r}")
        # a non-positive max would flip signs or divide by zero; such rows clip to 0 anyway
        G.div_(scale.clamp_min(eps)).clamp_(0.0, 1.0)
        G[self.forgotten] = 0.0
        return self

    @torch.no_grad()
    def prune_(self, below: float) -> ERMMask:
        """Set the entries of ``G`` that are ``< below`` to 0, in place (issue 13).

        Each ERM step moves every entry by about ``g_lr`` (Adam), whatever its gradient's
        size, so a channel a class does not use keeps drifting near 0 instead of settling
        there. Prohibition removes every channel with ``G > 0``, so those small entries make a
        class look as if it used far more channels than it does (efficientnet_b0, K = 1280:
        394 channels per class, 183 of them below 0.1; with those pruned the prohibited
        accuracy stays 0.0 and the permitted accuracy rises from 0.606 to 0.642, the STD
        accuracy being 0.644). It can also remove a class's real channels: on resnet50
        (K = 2048) the prohibited accuracy rose from 1.9% to 15% after ``prune_(0.1)``, so
        measure :func:`~erm_surgery.training.prohibition.prohibition_accuracy` after it.
        :class:`~erm_surgery.training.ERMTrainer` calls this at the end of a run's last ERM
        epoch when ``ERMConfig.prune_below > 0`` (default 0: off).
        """
        if not 0.0 <= below < 1.0:
            raise ValueError(f"below must be in [0, 1), got {below}")
        G = self.G.data
        G.masked_fill_(G < below, 0.0)
        return self

    @torch.no_grad()
    def keep_mask(self, classes: Iterable[int], threshold: float = 0.0) -> torch.Tensor:
        """``Gbar`` of the paper (Eq. 9/10): bool ``(K,)``, True where a channel is kept.

        A channel is prohibited when any class in ``classes`` uses it, i.e. has
        ``G[c, k] > threshold``. ``threshold=0`` is the reference code's rule (any use
        prohibits); the paper defines only the values 0 and 1.
        """
        idx = torch.as_tensor(list(classes), dtype=torch.long, device=self.G.device)
        used = (self.G[idx] > threshold).any(dim=0)
        return ~used
