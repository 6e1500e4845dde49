"""Model helpers shared by the metrics: unwrapping, devices, the classifier, eval mode.

An attached ERM model is recognised duck-typed (``model.erm`` with ``G`` and ``forgotten``)
so that the evaluation suite does not depend on how surgery is implemented.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..surgery import model_device
from .config import EvaluationError

__all__ = [
    "plain_module",
    "find_classifier",
    "pool_classifier_input",
    "prepared_models",
    "split_batch",
]


def plain_module(model: nn.Module) -> nn.Module:
    """The original-architecture module of an attached ERM model (``model`` otherwise).

    fx tracing goes through this module: its STD path computes the same function and its
    node names match those of the un-attached original and retrained models.
    """
    return getattr(model, "model", model) if hasattr(model, "erm") else model


def _name_of(model: nn.Module, module: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def _is_classifier_conv(m: nn.Module, num_classes: int | None) -> bool:
    return (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)
            and (num_classes is None or m.out_channels == num_classes))


def find_classifier(
    model: nn.Module, num_classes: int | None = None, name: str | None = None
) -> tuple[str, nn.Module] | None:
    """The final classifier layer of ``model`` as ``(qualified name, module)``.

    Order of preference: the module called ``name``; timm's ``get_classifier()`` when it
    returns a Linear or 1x1 Conv2d; the last ``nn.Linear`` producing ``num_classes``
    outputs; the last 1x1 ``Conv2d`` producing ``num_classes`` channels (SqueezeNet-style
    heads); the last ``nn.Linear``. Returns None when nothing fits.

    Raises:
        EvaluationError: ``name`` is given but is not a submodule of ``model``.
    """
    if name is not None:
        for root in (model, plain_module(model)):
            try:
                module = root.get_submodule(name)
            except AttributeError:
                continue
            return (_name_of(model, module) or name), module
        choices = [n for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) or _is_classifier_conv(m, None)]
        raise EvaluationError(f"classifier {name!r} is not a submodule of the model; "
                              f"Linear / 1x1 conv layers it has: {choices[-8:]}")
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            head = get_classifier()
        except Exception:  # a broken helper only means "look at the modules instead"
            head = None
        if isinstance(head, nn.Linear) or _is_classifier_conv(head, None):
            found = _name_of(model, head)
            if found is not None:
                return found, head
    modules = list(model.named_modules())
    linears = [(n, m) for n, m in modules if isinstance(m, nn.Linear)]
    if num_classes is not None:
        exact = [(n, m) for n, m in linears if m.out_features == num_classes]
        if exact:
            return exact[-1]
        convs = [(n, m) for n, m in modules if _is_classifier_conv(m, num_classes)]
        if convs:
            return convs[-1]
    return linears[-1] if linears else None


def pool_classifier_input(x: torch.Tensor, classifier: nn.Module) -> torch.Tensor:
    """The classifier input as one ``(N, D)`` pooled feature vector per sample.

    A Linear reads its last dimension, so extra middle dimensions (tokens) are averaged;
    a conv classifier reads channels, so spatial dimensions are averaged (global average
    pooling; a no-op reshape for the usual ``1 x 1`` map after pooling).
    """
    if x.dim() == 2:
        return x
    if isinstance(classifier, nn.Conv2d):
        return x.flatten(2).mean(dim=2)
    return x.reshape(x.shape[0], -1, x.shape[-1]).mean(dim=1)


def split_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` of a batch from a classification ``DataLoader``."""
    if isinstance(batch, Mapping):
        for xk, yk in (("image", "label"), ("input", "target"), ("x", "y")):
            if xk in batch and yk in batch:
                return batch[xk], torch.as_tensor(batch[yk])
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], torch.as_tensor(batch[1])
    raise EvaluationError("each batch must be an (inputs, labels) pair; got "
                          f"{type(batch).__name__}")


@contextlib.contextmanager
def prepared_models(
    models: Mapping[str, nn.Module], device: torch.device | str | None = None
) -> Iterator[None]:
    """Put every model in eval mode (and on ``device`` when given); restore both afterwards.

    Evaluation must not leave a user's model in eval mode or on another device, so the
    training flag of every submodule and the original device are put back on exit.
    """
    saved = []
    for model in models.values():
        flags = [(m, m.training) for m in model.modules()]
        saved.append((model, flags, model_device(model)))
    try:
        for model in models.values():
            if device is not None:
                model.to(device)
            model.eval()
        yield
    finally:
        for model, flags, original_device in saved:
            if device is not None:
                model.to(original_device)
            for m, flag in flags:
                m.training = flag
