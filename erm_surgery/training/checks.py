"""What training refuses before (and watches during) the work: empty or one-sample data,
labels that are not class ids, and a loss that stops being finite.

Shared by :func:`erm_surgery.train` and KTP's distillation loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import as_dataset, batch_statistics, check_labels, raw_labels
from ..errors import TrainingError, warn_user
from ..surgery import ERMModel

__all__ = ["NonFiniteWatch", "check_training_data", "CHECK_FINITE_EVERY"]

#: batches between two host-side looks at the non-finite-loss flag (and at each epoch's end)
CHECK_FINITE_EVERY = 50


class NonFiniteWatch:
    """Detects a NaN / Inf loss without a host sync per step.

    ``update(loss)`` ORs ``~isfinite(loss)`` into a device-side flag; the host reads it
    every ``every`` batches and at :meth:`check` (the end of an epoch), across processes,
    and raises ``error`` naming the epoch, the batch window and the likely causes. Shared
    by :func:`train` and KTP's distillation.
    """

    def __init__(self, device: torch.device | str, what: str, error: type[Exception],
                 accelerator: Any = None, every: int = CHECK_FINITE_EVERY) -> None:
        self.flag = torch.zeros((), dtype=torch.bool, device=device)
        self.what, self.error, self.accelerator, self.every = what, error, accelerator, every
        self.epoch, self.step, self.checked = 0, 0, 0

    def start(self, epoch: int) -> None:
        self.epoch, self.step, self.checked = epoch, 0, 0

    def update(self, loss: torch.Tensor) -> None:
        self.flag |= ~torch.isfinite(loss.detach()).all()
        self.step += 1
        if self.step % self.every == 0:
            self.check()

    def check(self) -> None:
        if self.step == self.checked:
            return
        flag = self.flag.float()
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:  # every rank raises, none waits
            flag = acc.reduce(flag, reduction="sum")
        if bool(flag):
            raise self.error(
                f"{self.what}: the loss became NaN or Inf in epoch {self.epoch + 1}, batches "
                f"{self.checked + 1}-{self.step} (checked every {self.every} batches). Likely "
                "causes: NaN / Inf values in the inputs, a learning rate that is too high or "
                "not finite, or an fp16 loss scale that overflowed. The weights updated since "
                "are probably not finite: fix the cause and start again (or resume from a "
                "checkpoint written before)")
        self.checked = self.step


def _length(data: Dataset | DataLoader) -> int | None:
    try:
        return len(as_dataset(data))  # type: ignore[arg-type]
    except TypeError:  # an IterableDataset without __len__
        return None


def check_training_data(model: ERMModel, train_data: Dataset | DataLoader,
                val_data: Dataset | DataLoader | None) -> bool:
    """Refuse what would crash inside torch or train the wrong thing, before any work:
    empty data, one sample with BatchNorm, labels that are not class ids ``0..C-1``;
    warn about classes without a training sample. Labels are read only where the dataset
    exposes them (:func:`erm_surgery.data.raw_labels`); returns True when they are not,
    so that the first batch's labels are checked instead."""
    if not isinstance(model, ERMModel):
        return False  # the caller's TypeError says so
    C = model.surgery.num_classes
    n = _length(train_data)
    if n == 0:
        raise TrainingError("the training data is empty: pass a dataset of (image, label) "
                            "samples")
    if n == 1 and batch_statistics(model):
        raise TrainingError(
            "the training data holds 1 sample, and the model normalises with batch "
            "statistics (BatchNorm), which need more than one value per channel in a "
            "training batch; pass more data (at least a few batches of samples)")
    labels = raw_labels(train_data, decode=False)
    if labels is not None:
        labels = check_labels(labels, C, error=TrainingError, name="the training labels")
        missing = torch.nonzero(torch.bincount(labels, minlength=C) == 0).flatten().tolist()
        if missing:
            warn_user(f"classes {missing} have no training samples: the model cannot learn "
                      "them, and their rows of G get no training signal (they end as "
                      "all-ones rows after the projection). Pass data of every class "
                      f"0..{C - 1}, or attach a model with fewer classes")
    if val_data is not None:
        if _length(val_data) == 0:
            raise TrainingError("val_data is empty: pass samples, or val_data=None")
        val_labels = raw_labels(val_data, decode=False)
        if val_labels is not None:
            check_labels(val_labels, C, error=TrainingError, name="the val_data labels")
    return labels is None


