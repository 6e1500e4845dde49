"""ERM training (paper Algorithm 1, with issue 13's joint steps) and its pieces.

- :mod:`.losses`: :class:`ERMConfig`, :func:`erm_loss` and the regularisers, usable from
  any training loop;
- :mod:`.trainer`: :func:`train` / :class:`ERMTrainer` on Accelerate;
- :mod:`.optim`: the shared optimisation :class:`Recipe`, optimiser and cosine schedule;
- :mod:`.g_metrics`: CSI, L1-density and friends of ``G``;
- :mod:`.precision`: the convolutions oneDNN trains wrongly (or slowly) in bfloat16 on a CPU.
"""

from . import g_metrics
from .losses import ERMConfig, erm_loss, find_mask, inner_product, is_erm_epoch, l1_hinge
from .optim import Recipe, cosine_schedule, make_optimizer
from .trainer import EpochStats, ERMTrainer, TrainResult, make_accelerator, std_accuracy, train

__all__ = ["train", "ERMTrainer", "TrainResult", "EpochStats", "make_accelerator",
           "std_accuracy", "ERMConfig", "erm_loss", "find_mask", "inner_product",
           "is_erm_epoch", "l1_hinge", "Recipe", "cosine_schedule", "make_optimizer",
           "g_metrics"]
