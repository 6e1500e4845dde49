"""Atomic file writes for reports: thin wrappers of :func:`erm_surgery.checkpoint.atomic_write`
(a crash mid-save never leaves a truncated file behind)."""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import atomic_write

__all__ = ["atomic_write_bytes", "atomic_write_text"]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then rename)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))
