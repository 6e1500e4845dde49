"""Accuracy: per class, and pooled over the forget and the retain classes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["AccuracyResult", "per_class_accuracy", "class_set_accuracy", "accuracy_metrics",
           "accuracy_deltas"]


@dataclass
class AccuracyResult:
    """Accuracies of one model (fractions in [0, 1]; NaN where a class has no samples).

    ``forget_*`` / ``retain_*`` are sample-weighted over the forget / retain classes, so
    they equal the accuracy on the forget / retain subsets of the data.
    """

    forget_train: float
    forget_test: float
    retain_train: float
    retain_test: float
    per_class_train: list[float]
    per_class_test: list[float]


def _predictions(logits_or_preds: torch.Tensor) -> torch.Tensor:
    return logits_or_preds.argmax(dim=1) if logits_or_preds.dim() == 2 else logits_or_preds


def per_class_accuracy(
    logits_or_preds: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """``(C,)`` accuracy of each class; NaN for a class without samples.

    Accepts logits ``(N, C)`` or predicted class ids ``(N,)``.
    """
    preds = _predictions(logits_or_preds).cpu().long()
    labels = labels.cpu().long()
    correct = torch.bincount(labels[preds == labels], minlength=num_classes).double()
    total = torch.bincount(labels, minlength=num_classes).double()
    acc = correct / total
    return torch.where(total > 0, acc, torch.full_like(acc, math.nan)).float()


def class_set_accuracy(
    logits_or_preds: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]
) -> float:
    """Accuracy on the samples whose label is in ``classes`` (NaN when there are none)."""
    preds = _predictions(logits_or_preds).cpu().long()
    labels = labels.cpu().long()
    keep = torch.isin(labels, torch.as_tensor(list(classes), dtype=torch.long))
    if not bool(keep.any()):
        return math.nan
    return float((preds[keep] == labels[keep]).double().mean())


def accuracy_metrics(
    train_logits: torch.Tensor,
    train_labels: torch.Tensor,
    test_logits: torch.Tensor,
    test_labels: torch.Tensor,
    forget_classes: Sequence[int],
    num_classes: int,
) -> AccuracyResult:
    """Forget / retain accuracy on train and test, and per-class accuracy on both."""
    retain = [c for c in range(num_classes) if c not in set(forget_classes)]
    return AccuracyResult(
        forget_train=class_set_accuracy(train_logits, train_labels, forget_classes),
        forget_test=class_set_accuracy(test_logits, test_labels, forget_classes),
        retain_train=class_set_accuracy(train_logits, train_labels, retain),
        retain_test=class_set_accuracy(test_logits, test_labels, retain),
        per_class_train=per_class_accuracy(train_logits, train_labels, num_classes).tolist(),
        per_class_test=per_class_accuracy(test_logits, test_labels, num_classes).tolist(),
    )


def accuracy_deltas(result: AccuracyResult, reference: AccuracyResult) -> dict[str, float]:
    """``result - reference`` for the four pooled accuracies (negative = lower than before)."""
    keys = ("forget_train", "forget_test", "retain_train", "retain_test")
    return {k: getattr(result, k) - getattr(reference, k) for k in keys}
