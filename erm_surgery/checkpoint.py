"""Checkpoints of attached models: one safetensors file with JSON metadata in its header.

The file holds ``model.*`` (the architecture's state dict) and ``erm.*`` (``G`` and the
forgotten-class flags); the header metadata records the library version, where the mask
sits (feature node, head, C, K) and which classes have been forgotten. Loading attaches a
fresh copy of ``base_model`` at the recorded place and checks every key and shape before a
single tensor is copied, so a bad file never leaves a half-loaded model behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, SurgeryError
from .surgery import ERMModel, attach

__all__ = ["save", "load", "read_metadata", "atomic_write", "register_restorer", "FORMAT"]

FORMAT = "erm-surgery/1"
_META_KEY = "erm_surgery"

#: ``restore(base_model, state_dict) -> module``: rebuilds modules a method added to the
#: architecture (ESC's projections) so the saved tensors fit; returns ``base_model`` itself
#: when the state dict holds none of its tensors. Filled by ``register_method(restore=...)``.
_RESTORERS: dict[str, Callable[[nn.Module, dict[str, torch.Tensor]], nn.Module]] = {}


def register_restorer(name: str,
                      restore: Callable[[nn.Module, dict[str, torch.Tensor]], nn.Module]) -> None:
    """Let :func:`load` rebuild the results of method ``name`` (see ``_RESTORERS``). A
    function shared by several methods (ESC and ESC-T) runs once per load."""
    if all(fn is not restore for fn in _RESTORERS.values()):
        _RESTORERS[name] = restore


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` in one step.

    The temp file lives in the destination folder (a rename across file systems is not
    atomic); on any error it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:  # on disk before the rename makes it visible
            os.fsync(fh.fileno())
        # mkstemp creates the file private (0600); give it the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return type(model).__module__ + "." + type(model).__qualname__


def _metadata(model: ERMModel, extra: dict[str, Any] | None) -> dict[str, Any]:
    from . import __version__

    return {
        "format": FORMAT,
        "library_version": __version__,
        "architecture": _architecture(model.model),
        "surgery": model.surgery.to_dict(),
        "forgotten_classes": model.erm.forgotten_classes,
        "extra": extra or {},
    }


def save(model: ERMModel, path: str | os.PathLike, *,
         extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``path`` (safetensors + JSON metadata), atomically.

    ``extra`` is any JSON-serialisable dict stored with the metadata (e.g. training
    history). Returns the path written.
    """
    from safetensors.torch import save_file

    if not isinstance(model, ERMModel):
        raise TypeError(f"save() takes a model returned by attach(), got {type(model).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for prefix, module in (("model.", model.model), ("erm.", model.erm)):
        for key, value in module.state_dict().items():
            t = value.detach().cpu().contiguous()
            # safetensors refuses tensors that share storage (tied weights): store a copy
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen and t.numel():
                t = t.clone()
            seen[ptr] = key
            tensors[prefix + key] = t
    meta = {_META_KEY: json.dumps(_metadata(model, extra))}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without loading any tensor."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
    except Exception as err:  # safetensors raises its own error type for bad headers
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated or "
            "not written by erm_surgery.save()"
        ) from err
    if raw is None:
        raise CheckpointError(f"{path} has no erm-surgery metadata; it was not written by "
                              "erm_surgery.save()")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}; this version reads "
                              f"{FORMAT!r}")
    return meta


def load(path: str | os.PathLike, base_model: nn.Module) -> ERMModel:
    """Attach ``base_model`` where the checkpoint says and load the saved weights.

    ``base_model`` is a plain instance of the same architecture (e.g.
    ``timm.create_model("resnet18", num_classes=10)``); it is copied, never modified.
    Results of methods that add modules (ESC's projections) are rebuilt by the
    restorers those methods registered. The model comes back on ``base_model``'s device.
    Raises ``CheckpointError`` for a
    missing, truncated or mismatched file.
    """
    from safetensors.torch import load_file

    meta = read_metadata(path)
    info = meta["surgery"]
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as err:
        raise CheckpointError(f"cannot read the tensors of {path} ({err}); the file may be "
                              "truncated") from err
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    base = base_model
    for name, restore in _RESTORERS.items():  # modules a method added (ESC's projections)
        try:
            base = restore(base, state)
        except Exception as err:  # a mismatch anywhere: one clear message, nothing loaded
            raise CheckpointError(f"{path} holds tensors of method {name!r} that do not fit "
                                  f"the base model: {type(err).__name__}: {err}") from err
    try:
        model = attach(base, feature_node=info["feature_node"], head=info["head"])
    except SurgeryError as err:
        raise CheckpointError(f"{path} does not fit the base model: {err}") from err
    if (model.surgery.num_classes, model.surgery.num_channels) != (
            info["num_classes"], info["num_channels"]):
        raise CheckpointError(
            f"{path} was saved for C={info['num_classes']} classes x K={info['num_channels']} "
            f"channels, but the base model gives C={model.surgery.num_classes}, "
            f"K={model.surgery.num_channels}; build the base model with the same "
            "architecture and num_classes"
        )
    expected = {f"model.{k}": v for k, v in model.model.state_dict().items()}
    expected.update({f"erm.{k}": v for k, v in model.erm.state_dict().items()})
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors)
                   if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path} does not match the base model ({meta.get('architecture')} expected): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, wrong shape {wrong[:5]}"
        )
    model.model.load_state_dict(state)
    model.erm.load_state_dict({k[len("erm."):]: v for k, v in tensors.items()
                               if k.startswith("erm.")})
    return model
