"""erm-surgery: class-level machine unlearning for timm and torchvision CNNs."""

from . import metrics
from .checkpoint import load, read_metadata, save
from .errors import CheckpointError, ERMError, SurgeryError, UnlearningError
from .losses import ERMConfig, erm_loss, inner_product, is_erm_epoch, l1_hinge
from .mask import ERMMask
from .prohibition import ProhibitionResult, prohibition_accuracy
from .surgery import ERMModel, SurgeryInfo, attach, detach, is_attached, unwrap
from .training import EpochStats, ERMTrainer, TrainResult, make_accelerator, train

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "attach",
    "detach",
    "save",
    "load",
    "read_metadata",
    "unwrap",
    "is_attached",
    "train",
    "ERMTrainer",
    "ERMConfig",
    "TrainResult",
    "EpochStats",
    "make_accelerator",
    "erm_loss",
    "l1_hinge",
    "inner_product",
    "is_erm_epoch",
    "prohibition_accuracy",
    "ProhibitionResult",
    "metrics",
    "ERMModel",
    "ERMMask",
    "SurgeryInfo",
    "ERMError",
    "SurgeryError",
    "CheckpointError",
    "UnlearningError",
]
