"""Building models by name and reading / writing the command line's checkpoints.

A checkpoint written by the command line is an ordinary ``erm_surgery.save`` file whose
``extra`` metadata says how to rebuild the base model (``model_spec``) and which data it
was trained on (``data``), so ``erm-surgery unlearn`` and ``evaluate`` need only its path.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import CLIError, UsageError

__all__ = ["ModelSpec", "check_model_name", "build_model", "read_checkpoint",
           "load_checkpoint", "save_checkpoint", "SPEC_KEY", "DATA_KEY"]

#: ``extra`` keys of a command-line checkpoint.
SPEC_KEY = "model_spec"
DATA_KEY = "data"
_TV_PREFIX = "tv:"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the plain base model of a checkpoint.

    Attributes:
        model: a timm model name (``resnet18``) or a torchvision builder (``tv:resnet18``).
        num_classes: C, the width of the classifier.
        in_chans: input channels (1 for MNIST, 3 for colour images).
        image_size: side of the square images the model was trained on.
    """

    model: str
    num_classes: int
    in_chans: int
    image_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_extra(cls, extra: dict[str, Any], path: str | os.PathLike) -> ModelSpec:
        spec = extra.get(SPEC_KEY)
        if not isinstance(spec, dict):
            raise CLIError(
                f"{path} does not say which architecture it holds (no extra['{SPEC_KEY}']); "
                "it was not written by erm-surgery train. Re-save it from Python with "
                f"erm_surgery.save(model, path, extra={{'{SPEC_KEY}': {{'model': 'resnet18', "
                "'num_classes': 10, 'in_chans': 3, 'image_size': 32}})")
        try:
            return cls(model=str(spec["model"]), num_classes=int(spec["num_classes"]),
                       in_chans=int(spec["in_chans"]), image_size=int(spec["image_size"]))
        except (KeyError, TypeError, ValueError) as err:
            raise CLIError(f"{path} has an incomplete extra['{SPEC_KEY}'] ({spec}): "
                           f"{err}") from err


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def check_model_name(name: str) -> None:
    """Raise :class:`UsageError` unless ``name`` is a timm model or ``tv:<torchvision>``."""
    if name.startswith(_TV_PREFIX):
        import torchvision

        builder = name[len(_TV_PREFIX):]
        known = torchvision.models.list_models(module=torchvision.models)
        if builder not in known:
            raise UsageError(f"unknown torchvision model {builder!r} (from {name!r})"
                             f"{_suggest(builder, known)} (list: torchvision.models."
                             "list_models())")
        return
    import timm

    if not timm.is_model(name):
        raise UsageError(f"unknown model {name!r}: not a timm model name"
                         f"{_suggest(name, timm.list_models())} (list: timm.list_models(); "
                         "torchvision models are written tv:resnet18)")


def _adapt_in_chans(model: Any, in_chans: int) -> None:
    """Replace the first ``Conv2d`` of a torchvision model with one taking ``in_chans``."""
    from torch import nn

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_chans:
                return
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, nn.Conv2d(
                in_chans, module.out_channels, module.kernel_size, stride=module.stride,
                padding=module.padding, dilation=module.dilation, groups=1,
                bias=module.bias is not None, padding_mode=module.padding_mode))
            return
    raise UsageError("the torchvision model has no Conv2d to take the input channels")


def build_model(spec: ModelSpec) -> Any:
    """A freshly initialised plain model (never pretrained) of ``spec``'s architecture."""
    check_model_name(spec.model)
    if spec.model.startswith(_TV_PREFIX):
        import torchvision

        model = torchvision.models.get_model(spec.model[len(_TV_PREFIX):], weights=None,
                                             num_classes=spec.num_classes)
        _adapt_in_chans(model, spec.in_chans)
        return model
    import timm

    return timm.create_model(spec.model, pretrained=False, num_classes=spec.num_classes,
                             in_chans=spec.in_chans)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], ModelSpec]:
    """The metadata and model spec of a checkpoint, without loading a tensor.

    Raises :class:`CLIError` (exit 1) for a missing or unreadable file.
    """
    from ..errors import CheckpointError

    path = Path(path)
    if not path.exists():
        raise CLIError(f"no checkpoint at {path}")
    if path.is_dir():
        raise CLIError(f"{path} is a folder; pass the .safetensors file written by "
                       "erm-surgery train")
    from ..checkpoint import read_metadata

    try:
        meta = read_metadata(path)
    except CheckpointError as err:
        raise CLIError(str(err)) from err
    return meta, ModelSpec.from_extra(meta.get("extra") or {}, path)


def load_checkpoint(path: str | os.PathLike) -> tuple[Any, dict[str, Any], ModelSpec]:
    """``(attached model on the CPU, metadata, spec)`` of a command-line checkpoint."""
    from ..checkpoint import load
    from ..errors import CheckpointError

    meta, spec = read_checkpoint(path)
    try:  # the library rebuilds every registered method's result (ESC's projections too)
        model = load(path, build_model(spec))
    except CheckpointError as err:
        raise CLIError(str(err)) from err
    model.eval()
    return model, meta, spec


def save_checkpoint(model: Any, path: str | os.PathLike, spec: ModelSpec,
                    data: dict[str, Any], **extra: Any) -> Path:
    """``erm_surgery.save`` with the spec and data description in ``extra``."""
    from ..checkpoint import save

    return save(model, path, extra={SPEC_KEY: spec.to_dict(), DATA_KEY: data, **extra})
