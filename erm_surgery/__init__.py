"""erm-surgery: class-level machine unlearning for timm and torchvision CNNs.

The user API is here; the packages hold the rest (docs/architecture.md):
``surgery`` (attach/detach, the fx tracer), ``training`` (ERM losses and trainer),
``unlearning`` (the method registry, request checks, checkpoint rewriting), ``methods``
(KTP, ESC, EC and the baselines), ``evaluation`` (the evidence of forgetting), ``cli``.
"""

from . import methods  # noqa: F401  (registers every unlearning method)
from .checkpoint import load, read_metadata, save
from .errors import (
    CheckpointError,
    ERMError,
    EvaluationError,
    SurgeryError,
    TrainingError,
    UnlearningError,
)
from .evaluation import EvalConfig, UnlearningReport, evaluate
from .methods.ktp import KTPConfig, KTPInfo
from .surgery import ERMModel, attach, detach, is_attached, param_groups, unwrap
from .training import ERMConfig, TrainResult, erm_loss, make_accelerator, train
from .training.prohibition import ProhibitionResult, prohibition_accuracy
from .unlearning import (
    MethodInfo,
    MethodSpec,
    available_methods,
    get_method,
    register_method,
    unlearn,
    unlearn_checkpoint,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # surgery
    "attach", "detach", "unwrap", "is_attached", "ERMModel", "param_groups",
    # training
    "train", "TrainResult", "ERMConfig", "erm_loss", "make_accelerator",
    # unlearning
    "unlearn", "unlearn_checkpoint", "available_methods", "register_method", "get_method",
    "MethodSpec", "MethodInfo", "KTPConfig", "KTPInfo",
    # evaluation
    "evaluate", "EvalConfig", "UnlearningReport", "prohibition_accuracy", "ProhibitionResult",
    # files
    "save", "load", "read_metadata",
    # errors
    "ERMError", "SurgeryError", "TrainingError", "CheckpointError", "UnlearningError",
    "EvaluationError",
]
