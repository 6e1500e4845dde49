"""The "logit-only" fake of unlearning, for calibrating metrics and the verdict.

The most common false sense of privacy: block the forget classes in the classifier and
keep every feature of the original. Its forget accuracy is 0 and every score that reads
only the outputs (entropy MIA, ZRF, loss MIA) calls it forgotten, yet the knowledge is all
still in the features. A metric the verdict may rest on has to tell this model from a
retrained one (``benchmarks/verdict_calibration.py``, ``tests/test_verdict.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from .config import EvaluationError, check_forget_classes
from .models import find_classifier

__all__ = ["logit_only", "BLOCKED_LOGIT"]

#: The bias given to a blocked class: its softmax probability underflows to exactly 0 in
#: float32 while every loss stays finite.
BLOCKED_LOGIT = -1e4


def logit_only(model: nn.Module, forget_classes: Iterable[int] | int, *,
               classifier: str | None = None) -> nn.Module:
    """A copy of ``model`` whose classifier rows of ``forget_classes`` are blocked.

    The rows' weights become 0 and their biases :data:`BLOCKED_LOGIT`, so those classes
    are never predicted; every other parameter (the features, the other classes' rows)
    is the original's. ``model`` is not modified.

    Args:
        model: a classifier whose last layer is an ``nn.Linear`` or 1x1 ``nn.Conv2d``
            (plain or attached ERM model).
        forget_classes: the classes to block.
        classifier: module name of the classifier, overriding the automatic choice.

    Raises:
        EvaluationError: no classifier layer found, or class ids outside its outputs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fake = copy.deepcopy(model)
    found = find_classifier(fake, None, classifier)
    if found is None:
        raise EvaluationError("logit_only: no classifier layer found in the model; name it "
                              "with classifier='fc'")
    name, head = found
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise EvaluationError(f"logit_only: the classifier {name!r} has no weight to block")
    classes = check_forget_classes(forget_classes, weight.shape[0])
    with torch.no_grad():
        weight[classes] = 0
        if getattr(head, "bias", None) is None:
            # a head without a bias gets one (zeros) so that the block is a bias, as usual
            head.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype,
                                                 device=weight.device))
        head.bias[classes] = BLOCKED_LOGIT
    return fake
