"""Algorithm 3 on a file: load, unlearn, and replace the checkpoint atomically."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import file_lock, load, read_metadata, save
from ..errors import UnlearningError
from ..surgery import ERMModel
from .registry import get_method, unlearn

__all__ = ["unlearn_checkpoint", "record_unlearning"]


def record_unlearning(extra: dict[str, Any], info: Any, **fields: Any) -> dict[str, Any]:
    """``extra`` metadata with one more request recorded: ``unlearning`` is the newest,
    ``unlearning_history`` lists every request so far (``fields`` are added to the entry,
    e.g. the source file). The library and the command line both record through here."""
    entry = info.to_dict() if hasattr(info, "to_dict") else {"method": str(info)}
    out = dict(extra)
    out["unlearning_history"] = [*extra.get("unlearning_history", []), {**entry, **fields}]
    out["unlearning"] = entry
    return out


def unlearn_checkpoint(
    path: str | os.PathLike,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    base_model: nn.Module,
    **kwargs: Any,
) -> Any:
    """Algorithm 3 on a file: load, unlearn, and atomically replace the checkpoint.

    The new checkpoint is written to a temp file and renamed over ``path``, so no copy of
    the teacher is left behind and a crash leaves the old file whole. A symlink's target is
    replaced (the link stays) with its mode kept; a file with other hard links gets a
    ``UserWarning``, since those names still hold the teacher. The file's write lock
    (:func:`erm_surgery.checkpoint.file_lock`) is held from reading the teacher to the
    rename, so concurrent requests on one file apply one after the other, each on the
    result of the one before. ``kwargs`` go to
    :func:`unlearn` (``method=``, config overrides). Returns the method's info. Methods
    whose result ``erm_surgery.load`` cannot rebuild (``MethodSpec.reloadable``) are
    refused before the file is touched.
    """
    spec = get_method(kwargs.get("method", "ktp"))
    if not spec.reloadable:
        raise UnlearningError(
            f"method {spec.name!r} returns a model that erm_surgery.load() cannot rebuild "
            f"from the base model; {path} was left as it was. Unlearn in memory and save "
            "the result yourself, or use a reloadable method such as ktp")
    read_metadata(path)  # a missing or bad file: its error before taking the lock
    with file_lock(path):  # a concurrent request waits, then reads our result
        extra = dict(read_metadata(path).get("extra") or {})
        teacher = load(path, base_model)
        student = unlearn(teacher, classes, data, **kwargs)
        if not isinstance(student, ERMModel):  # a spec that claims reloadable but is not
            raise UnlearningError(f"method {spec.name!r} returned a plain "
                                  f"{type(student).__name__}; {path} was left as it was")
        del teacher
        info = student.__dict__["unlearning_info"]
        save(student, Path(path), extra=record_unlearning(extra, info))
    return info
