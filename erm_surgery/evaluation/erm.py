"""Diagnostics of the ERM mask ``G`` of an attached model (ERM-KTP paper, section 5.2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..training import g_metrics as M

__all__ = ["ERMDiagnostics", "erm_diagnostics"]


@dataclass
class ERMDiagnostics:
    """Quality of ``G`` (C x K) and what it records about forgetting.

    Attributes:
        csi: cosine similarity index, sum over ordered pairs of row cosines (0 = disjoint
            channel sets per class).
        l1_density: mean entry of ``G``.
        ones_per_row: mean number of channels per class with mask value > 0.5.
        zero_rows: classes whose row of ``G`` is all zero (what GKT leaves behind).
        forgotten: classes flagged in ``model.erm.forgotten``.
        forget_rows_zero: every forget class's row is zero (the model records the request).
        shape: ``(C, K)``.
        G: the matrix itself (CPU float32), kept for the heatmap and left out of
            ``to_dict`` (a 200 x 2048 matrix does not belong in a JSON summary).
    """

    csi: float
    l1_density: float
    ones_per_row: float
    zero_rows: list[int]
    forgotten: list[int]
    forget_rows_zero: bool
    shape: tuple[int, int]
    G: torch.Tensor = field(repr=False, compare=False)


def erm_diagnostics(model: nn.Module, forget_classes: Sequence[int] = ()) -> ERMDiagnostics | None:
    """Diagnostics of ``model.erm`` (duck-typed: ``G`` and ``forgotten``); None without one."""
    erm = getattr(model, "erm", None)
    G = getattr(erm, "G", None)
    if not isinstance(G, torch.Tensor) or G.dim() != 2:
        return None
    G = G.detach().float().cpu()
    forgotten = getattr(erm, "forgotten", None)
    flagged = (torch.nonzero(forgotten.detach().cpu()).flatten().tolist()
               if isinstance(forgotten, torch.Tensor) else [])
    zero = M.zero_rows(G)
    return ERMDiagnostics(
        csi=float(M.csi(G)),
        l1_density=float(M.l1_density(G)),
        ones_per_row=float(M.ones_per_row(G)),
        zero_rows=torch.nonzero(zero).flatten().tolist(),
        forgotten=flagged,
        forget_rows_zero=bool(all(bool(zero[c]) for c in forget_classes if c < len(zero))),
        shape=(int(G.shape[0]), int(G.shape[1])),
        G=G,
    )
