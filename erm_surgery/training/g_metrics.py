"""Quality metrics of the class-by-channel matrix ``G`` (ERM-KTP paper, section 5.2).

All functions take ``G`` of shape ``(C, K)`` and return a 0-d tensor (no host sync),
so they can be logged from a training loop without slowing it down.
"""

from __future__ import annotations

import torch

__all__ = ["csi", "l1_density", "ones_per_row", "zero_rows"]


def csi(G: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine Similarity Index: sum over ordered pairs ``c1 != c2`` of ``cos(G_c1, G_c2)``.

    0 means every class uses channels no other class uses (the paper reports ~0.0 after
    training); ``C * (C - 1)`` means all rows point the same way. Zero rows (forgotten
    classes) contribute 0.
    """
    G = G.detach().float()
    rows = G / G.norm(dim=1, keepdim=True).clamp_min(eps)
    sim = rows @ rows.T
    return sim.sum() - sim.diagonal().sum()


def l1_density(G: torch.Tensor) -> torch.Tensor:
    """``||G||_1 / (C * K)``: the mean entry of ``G`` (entries are in [0, 1])."""
    G = G.detach().float()
    return G.abs().sum() / G.numel()


def ones_per_row(G: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Mean number of channels per class whose mask value exceeds ``threshold``."""
    G = G.detach()
    return (G > threshold).sum(dim=1).float().mean()


def zero_rows(G: torch.Tensor) -> torch.Tensor:
    """Boolean vector of length C: True where the row of ``G`` is entirely zero."""
    return (G.detach() == 0).all(dim=1)
