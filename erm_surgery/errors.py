"""Exceptions raised by erm-surgery.

Every error is a ``ValueError`` subclass so that code which already guards model
loading with ``except ValueError`` keeps working, and each message names the
problem and the fix.
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["ERMError", "SurgeryError", "CheckpointError", "UnlearningError", "EvaluationError",
           "TrainingError", "warn_user"]


class ERMError(ValueError):
    """Base class of every erm-surgery error."""


class SurgeryError(ERMError):
    """The model cannot be traced, or no conv feature map / classifier was found."""


class CheckpointError(ERMError):
    """A checkpoint is missing, truncated, or does not match the model."""


class UnlearningError(ERMError):
    """An unlearning request is invalid (unknown, duplicate or already forgotten classes...)."""


class EvaluationError(ERMError):
    """Invalid evaluation input (models, data, forget classes, metric names, config)."""


class TrainingError(ERMError):
    """Invalid training data (labels that are not class ids ``0..C-1``, empty data), or a
    run whose loss became NaN / Inf (the message names the epoch and steps)."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside erm-surgery: the user's line
    that called the library, however many layers (registry, method, loop) lie between."""
    level, frame = 2, sys._getframe(1)  # level 2 = the caller of warn_user
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            _PACKAGE_DIR):
        level += 1
        frame = frame.f_back
    warnings.warn(message, category, stacklevel=level)
