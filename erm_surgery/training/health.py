"""The ERM health summary :func:`erm_surgery.train` ends with: how well ``G`` separates
the classes (prohibited / permitted accuracy, paper Table 2), CSI and density."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..surgery import ERMModel
from . import g_metrics as metrics
from .prohibition import prohibition_accuracy

__all__ = ["ERMHealth", "erm_health", "WEAK_PROHIBITION"]

#: prohibited-class accuracy above which ``G`` is said to separate the classes weakly
WEAK_PROHIBITION = 0.05



@dataclass
class ERMHealth:
    """How well the trained ``G`` separates classes (:attr:`TrainResult.health`).

    ``prohibited`` / ``permitted``: mean accuracy of a class's ``val_data`` samples with the
    channels of its row (``G > 0``) prohibited, and of the other classes under that mask
    (paper Table 2; ``None`` without ``val_data`` or when the head reads more than the
    feature map). Under several processes it is the main process's share of ``val_data``.
    """

    prohibited: float | None
    permitted: float | None
    csi: float
    density: float
    channels_per_class: float

    @property
    def weak(self) -> bool:
        return self.prohibited is not None and self.prohibited > WEAK_PROHIBITION

    def __str__(self) -> str:
        pro = "-" if self.prohibited is None else f"{self.prohibited:.3f}"
        per = "-" if self.permitted is None else f"{self.permitted:.3f}"
        return (f"ERM health: prohibited {pro} (target <= {WEAK_PROHIBITION}), permitted "
                f"{per}, CSI {self.csi:.2f}, density {self.density:.3f}, "
                f"{self.channels_per_class:.1f} channels/class")


def erm_health(model: ERMModel, val_data: Any = None) -> ERMHealth:
    """:class:`ERMHealth` of an attached model (one feature pass over ``val_data``)."""
    G = model.erm.G
    prohibited = permitted = None
    if val_data is not None and model.has_head_graph:
        table = prohibition_accuracy(model, val_data)
        prohibited, permitted = table.mean_prohibited, table.mean_permitted
    return ERMHealth(prohibited=prohibited, permitted=permitted, csi=float(metrics.csi(G)),
                     density=float(metrics.l1_density(G)),
                     channels_per_class=float((G.detach() > 0).sum(1).float().mean()))


