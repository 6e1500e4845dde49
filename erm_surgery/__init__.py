"""erm-surgery: class-level machine unlearning for timm and torchvision CNNs."""

from . import (
    methods,  # noqa: E402,F401  (registers the methods beyond KTP)
    metrics,
)
from .checkpoint import load, read_metadata, save
from .errors import CheckpointError, ERMError, SurgeryError, UnlearningError
from .evaluation import EvalConfig, UnlearningReport, evaluate  # noqa: E402
from .losses import ERMConfig, erm_loss, inner_product, is_erm_epoch, l1_hinge
from .mask import ERMMask
from .prohibition import ProhibitionResult, prohibition_accuracy
from .surgery import ERMModel, SurgeryInfo, attach, detach, is_attached, unwrap
from .training import EpochStats, ERMTrainer, TrainResult, make_accelerator, train
from .unlearning import (
    KTPConfig,
    UnlearningInfo,
    available_methods,
    ktp,
    register_method,
    unlearn,
    unlearn_checkpoint,
)

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
    "unlearn",
    "unlearn_checkpoint",
    "ktp",
    "KTPConfig",
    "UnlearningInfo",
    "available_methods",
    "register_method",
    "evaluate",
    "EvalConfig",
    "UnlearningReport",
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
