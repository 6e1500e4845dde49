"""Exceptions raised by erm-surgery.

Every error is a ``ValueError`` subclass so that code which already guards model
loading with ``except ValueError`` keeps working, and each message names the
problem and the fix.
"""

from __future__ import annotations

__all__ = ["ERMError", "SurgeryError", "CheckpointError", "UnlearningError"]


class ERMError(ValueError):
    """Base class of every erm-surgery error."""


class SurgeryError(ERMError):
    """The model cannot be traced, or no conv feature map / classifier was found."""


class CheckpointError(ERMError):
    """A checkpoint is missing, truncated, or does not match the model."""


class UnlearningError(ERMError):
    """An unlearning request is invalid (unknown, duplicate or already forgotten classes...)."""
