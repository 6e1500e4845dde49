"""erm-surgery: class-level machine unlearning for timm and torchvision CNNs."""

from .checkpoint import load, read_metadata, save
from .errors import CheckpointError, ERMError, SurgeryError, UnlearningError
from .mask import ERMMask
from .surgery import ERMModel, SurgeryInfo, attach, detach, is_attached, unwrap

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
    "ERMModel",
    "ERMMask",
    "SurgeryInfo",
    "ERMError",
    "SurgeryError",
    "CheckpointError",
    "UnlearningError",
]
