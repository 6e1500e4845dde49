"""Checkpoints of attached models: one safetensors file with JSON metadata in its header.

The file holds ``model.*`` (the architecture's state dict) and ``erm.*`` (``G`` and the
forgotten-class flags); the header metadata records the library version, where the mask
sits (feature node, head, C, K) and which classes have been forgotten. Loading attaches a
fresh copy of ``base_model`` at the recorded place and checks every key and shape before a
single tensor is copied, so a bad file never leaves a half-loaded model behind.

Writes replace the file the user means: a symlink's target (the link stays), with the old
file's mode and owner. Writers of one file are serialised by an advisory lock
(``fcntl.flock`` on ``.NAME.lock`` beside it, see :func:`file_lock`), and the metadata
holds a sha256 digest of the tensors that :func:`load` verifies.

(Over 400 lines on purpose: the erasure promise is kept on disk here, in one place —
atomic replacement, links, modes, the lock, the digest and the metadata checks — so that
every writer, the library's and the command line's, goes through the same code.)
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, SurgeryError, warn_user
from .surgery import ERMModel, attach

try:
    import fcntl
except ImportError:  # Windows: writes stay atomic, but are not serialised
    fcntl = None  # type: ignore[assignment]

__all__ = ["save", "load", "read_metadata", "atomic_write", "file_lock", "other_links",
           "tensor_digest", "register_restorer", "FORMAT"]

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


def _real(path: str | os.PathLike) -> Path:
    """``path`` with every symlink resolved: the file a write must replace."""
    return Path(os.path.realpath(path))


#: per thread: the real paths whose lock this thread holds, with a nesting count
_HELD = threading.local()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the write lock of ``path``; yields the real path (symlinks resolved).

    An advisory ``fcntl.flock`` on ``.NAME.lock`` beside the real file: every
    :func:`atomic_write` (so :func:`save`) takes it, and ``unlearn_checkpoint`` holds it
    from reading the teacher to the rename, so concurrent requests on one file apply one
    after the other. Re-entrant in one thread; the lock file is removed on release. The
    operating system drops the lock of a killed process. No-op where ``fcntl`` is missing.
    """
    target = _real(path)
    counts: dict[Path, int] = _HELD.__dict__.setdefault("counts", {})
    if counts.get(target) or fcntl is None:
        counts[target] = counts.get(target, 0) + 1
        try:
            yield target
        finally:
            counts[target] -= 1
        return
    lock = target.with_name(f".{target.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            try:
                now = os.stat(lock)
                current = (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)  # the holder before us removed this lock file: lock the new one
    counts[target] = 1
    try:
        yield target
    finally:
        del counts[target]
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still locked: a waiter on this inode sees it and retries
        os.close(fd)


def other_links(path: str | os.PathLike) -> int:
    """How many other hard links share the (real) file at ``path``: 0 for a plain file or
    a missing one. Those names keep the old contents when ``path`` is replaced."""
    try:
        return os.stat(_real(path)).st_nlink - 1
    except FileNotFoundError:
        return 0


def _remove_stale_temps(target: Path) -> None:
    """Remove temp files of :func:`atomic_write` for ``target`` (``.NAME.XXXXXXXX.tmp``)
    left by a killed writer. Called under the lock, so no live writer owns one."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")
    folder = glob.escape(str(target.parent))
    for tmp in glob.glob(os.path.join(folder, glob.escape(f".{target.name}.") + "*.tmp")):
        if pattern.fullmatch(os.path.basename(tmp)) and not os.path.islink(tmp):
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _copy_mode_and_owner(tmp: str, old: os.stat_result | None) -> None:
    """Give ``tmp`` the mode (and owner/group where allowed) of the file it replaces, or
    the mode a plain open() would give a new file."""
    if old is None:
        # mkstemp creates the file private (0600); give it the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        return
    mine = os.stat(tmp)
    if (mine.st_uid, mine.st_gid) != (old.st_uid, old.st_gid):
        try:
            os.chown(tmp, old.st_uid, old.st_gid)
        except OSError:  # not root: the group at least, if we are a member
            with contextlib.suppress(OSError):
                os.chown(tmp, -1, old.st_gid)
    os.chmod(tmp, stat.S_IMODE(old.st_mode))  # after chown, which may clear set-id bits


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` in one step.

    The temp file lives in the destination folder (a rename across file systems is not
    atomic); on any error it is removed and ``path`` is left as it was. A symlink is
    followed: its target is replaced and the link kept. The new file keeps the mode (and,
    where allowed, the owner and group) of the file it replaces. The write holds
    :func:`file_lock`, under which temp files a killed writer left are removed. A file
    with other hard links gets a ``UserWarning``: those names keep the old contents.
    Returns ``path`` as given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path) as target:
        if target.is_dir():
            raise IsADirectoryError(f"{path} is a folder; pass a file path to write")
        _remove_stale_temps(target)
        try:
            old: os.stat_result | None = os.stat(target)
        except FileNotFoundError:
            old = None
        if old is not None and old.st_nlink > 1:
            warn_user(f"{path} has {old.st_nlink - 1} other hard link(s): only this name gets "
                      "the new file, the other names still hold the old contents (after "
                      "unlearning: the teacher). Delete them too (find / -samefile "
                      f"{path}) if the old model must be gone")
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            write(tmp)
            with open(tmp, "rb+") as fh:  # on disk before the rename makes it visible
                os.fsync(fh.fileno())
            _copy_mode_and_owner(tmp, old)
            os.replace(tmp, target)
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


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """``"sha256:<hex>"`` over the tensors' names, dtypes, shapes and bytes, in sorted key
    order: what :func:`save` records and :func:`load` verifies."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        head = f"{key}\0{t.dtype}\0{tuple(t.shape)}\0{len(raw)}\0"
        digest.update(head.encode())
        digest.update(memoryview(raw) if len(raw) else b"")
    return "sha256:" + digest.hexdigest()


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
    history). The metadata also records a sha256 digest of the tensors, which
    :func:`load` verifies. A symlink's target is replaced (the link stays), an existing
    file keeps its mode, and concurrent writers take turns (see :func:`atomic_write`).
    Returns the path written (as given).
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
    info = _metadata(model, extra)
    info["tensor_digest"] = tensor_digest(tensors)  # verified by load()
    meta = {_META_KEY: json.dumps(info)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without loading any tensor.

    Raises ``CheckpointError`` (naming the file) for a missing or unreadable file and for
    metadata that is not JSON, not an object, or lacks a field ``load`` needs.
    """
    return _read(path, tensors=False)[0]


def _read(path: str | os.PathLike, *, tensors: bool
          ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata (checked) and, with ``tensors=True``, every tensor, from one open of
    the file: a rename by a concurrent writer cannot pair one file's metadata with
    another's tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    found: dict[str, torch.Tensor] = {}
    failed: Exception | None = None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            if tensors and raw is not None:
                try:
                    found = {k: f.get_tensor(k) for k in f.keys()}
                except Exception as err:
                    failed = err
    except Exception as err:  # safetensors raises its own error type for bad headers
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated or "
            "not written by erm_surgery.save()"
        ) from err
    if failed is not None:
        raise CheckpointError(f"cannot read the tensors of {path} ({failed}); the file may "
                              "be truncated") from failed
    return _parse_metadata(path, raw), found


def _parse_metadata(path: Path, raw: str | None) -> dict[str, Any]:
    if raw is None:
        raise CheckpointError(f"{path} has no erm-surgery metadata; it was not written by "
                              "erm_surgery.save()")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} has corrupted metadata: not JSON ({err}); the file is "
                              "corrupted or was modified after erm_surgery.save()") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has corrupted metadata: a JSON {type(meta).__name__}, "
                              "not an object; the file is corrupted or was modified after "
                              "erm_surgery.save()")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}; this version reads "
                              f"{FORMAT!r}")
    problem = _metadata_problem(meta)
    if problem:
        raise CheckpointError(f"{path} has malformed metadata: {problem}; the file is "
                              "corrupted or was modified after erm_surgery.save()")
    return meta


#: the ``surgery`` fields load() reads, with their types
_SURGERY_FIELDS = {"feature_node": str, "head": str, "num_classes": int, "num_channels": int}


def _metadata_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the structure of ``meta`` (None when nothing)."""
    info = meta.get("surgery")
    if not isinstance(info, dict):
        return ("no 'surgery' object (where the mask sits)" if info is None
                else f"'surgery' is a {type(info).__name__}, not an object")
    for name, kind in _SURGERY_FIELDS.items():
        if name not in info:
            return f"'surgery' has no field {name!r}"
        value = info[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"'surgery.{name}' is {value!r}, not a {kind.__name__}"
    forgotten = meta.get("forgotten_classes")
    if not isinstance(forgotten, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in forgotten):
        return f"'forgotten_classes' is {forgotten!r}, not a list of class ids"
    if not isinstance(meta.get("extra", {}), dict | None):
        return f"'extra' is a {type(meta['extra']).__name__}, not an object"
    digest = meta.get("tensor_digest")
    if digest is not None and not (isinstance(digest, str) and digest.startswith("sha256:")):
        return f"'tensor_digest' is {digest!r}, not 'sha256:<hex>'"
    return None


def _check_forgotten(path: str | os.PathLike, meta: dict[str, Any],
                     tensors: dict[str, torch.Tensor]) -> None:
    """The metadata's ``forgotten_classes`` are the ``erm.forgotten`` tensor's classes; in
    a file without a digest, their rows of ``G`` are zero too (a digest-verified file holds
    exactly the model that was saved)."""
    flags, G = tensors.get("erm.forgotten"), tensors.get("erm.G")
    if flags is None or G is None:
        return  # the key check in load() names the missing tensors
    in_tensor = torch.nonzero(flags.reshape(-1).bool()).flatten().tolist()
    listed = sorted(meta["forgotten_classes"])
    if in_tensor != listed:
        raise CheckpointError(
            f"{path} is corrupted or was modified after it was saved: its metadata lists "
            f"forgotten classes {listed} but its erm.forgotten tensor marks {in_tensor}")
    if meta.get("tensor_digest") is None and in_tensor and G.dim() == 2 and (
            G.shape[0] > max(in_tensor)):
        live = [c for c in in_tensor if bool(G[c].ne(0).any())]
        if live:
            raise CheckpointError(
                f"{path} is corrupted or was modified after it was saved: forgotten classes "
                f"{live} have non-zero rows of G")


def load(path: str | os.PathLike, base_model: nn.Module) -> ERMModel:
    """Attach ``base_model`` where the checkpoint says and load the saved weights.

    ``base_model`` is a plain instance of the same architecture (e.g.
    ``timm.create_model("resnet18", num_classes=10)``); it is copied, never modified.
    Results of methods that add modules (ESC's projections) are rebuilt by the
    restorers those methods registered. The model comes back on ``base_model``'s device.
    Raises ``CheckpointError`` for a
    missing, truncated or mismatched file, malformed metadata, tensors that do not match
    the recorded digest (files saved before digests were recorded load unchecked), and a
    file whose metadata and ``erm.forgotten`` disagree about the forgotten classes.
    """
    meta, tensors = _read(path, tensors=True)
    info = meta["surgery"]
    recorded = meta.get("tensor_digest")
    if recorded is not None and tensor_digest(tensors) != recorded:
        raise CheckpointError(f"{path} is corrupted or was modified after it was saved: its "
                              "tensors do not match the sha256 digest recorded by "
                              "erm_surgery.save(); nothing was loaded")
    _check_forgotten(path, meta, tensors)
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
