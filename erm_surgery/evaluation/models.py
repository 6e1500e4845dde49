"""Model helpers shared by the metrics: unwrapping, devices, the classifier, eval mode.

An attached ERM model is recognised duck-typed (``model.erm`` with ``G`` and ``forgotten``)
so that the evaluation suite does not depend on how surgery is implemented.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..errors import EvaluationError, SurgeryError
from ..surgery import find_classifier as surgery_find_classifier
from ..surgery import model_device

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


def find_classifier(
    model: nn.Module, num_classes: int | None = None, name: str | None = None
) -> tuple[str, nn.Module] | None:
    """:func:`erm_surgery.surgery.find_classifier` with the evaluation's error type."""
    try:
        return surgery_find_classifier(model, num_classes, name=name)
    except SurgeryError as err:
        raise EvaluationError(str(err)) from err


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
