"""Amnesiac unlearning: undo the recorded parameter updates of batches that held forget data.

Graves, Nagisetty and Ganesh, "Amnesiac Machine Learning", AAAI 2021. During training an
:class:`UpdateRecorder` (opt in: ``train(..., callbacks=[recorder])``) stores the parameter
delta of every optimizer step whose batch held a watched class. Unlearning subtracts the
deltas of the steps that held a forget class, then fine-tunes briefly on the retain data
to repair the damage (the paper's short retraining).

Memory cost: one float copy of the parameters per recorded step (``4 * n_params`` bytes
for float32: 1.5 MB for timm ``test_resnet``, 100 MB for ResNet-50), plus one snapshot
while a step runs. For class unlearning nearly every batch holds every class, so nearly
every step is recorded: ResNet-50 on CIFAR-10 at batch 128 would need ~40 GB per epoch.
Deltas stay in CPU memory up to ``memory_limit_mb`` and are spilled to safetensors files
(one per step) in ``spill_dir`` beyond it. And because nearly every step is undone, the
model goes back to (near) its initialisation: ERM-KTP paper Table 5 reports 9% accuracy
on CIFAR-10. That is the method's known limit for class unlearning, not a bug.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ...errors import UnlearningError, warn_user
from ...surgery import unwrap
from ...training.optim import Recipe
from ...unlearning.registry import register_method
from ...unlearning.request import device_name, mark_forgotten, parse_request
from .common import BaselineInfo, sgd_loop

__all__ = ["UpdateRecorder", "RecordedStep", "AmnesiacConfig", "AmnesiacInfo", "amnesiac"]


@dataclass
class RecordedStep:
    """One recorded optimizer step.

    Attributes:
        step: index of the step among all steps the recorder saw (0-based).
        classes: classes present in the step's batch (all of them, not only the watched).
        path: the spill file holding the deltas, or None while they are in memory.
        nbytes: size of the deltas.
    """

    step: int
    classes: list[int]
    path: str | None
    nbytes: int


def _fingerprint(params: Iterable[torch.Tensor]) -> torch.Tensor:
    # a cheap checksum, kept on the device (no host sync per step); compared at unlearning
    # time to notice a model trained further, or another model, after the recording
    return torch.stack([p.detach().double().sum() for p in params]).sum()


class UpdateRecorder:
    """Records per-step parameter deltas for Amnesiac unlearning (a ``train`` callback).

    ::

        recorder = UpdateRecorder(classes=[3, 7], memory_limit_mb=1024, spill_dir="deltas")
        erm_surgery.train(model, data, epochs=10, callbacks=[recorder])
        student = erm_surgery.unlearn(model, [3], data, method="amnesiac", recorder=recorder)

    Args:
        classes: record only steps whose batch holds one of these classes (the classes
            that may be forgotten later); ``None`` = every step.
        memory_limit_mb: deltas are kept in CPU memory up to this total; later steps are
            written to ``spill_dir`` as ``step_NNNNNNN.safetensors``.
        spill_dir: folder for spilled deltas; default a new temporary folder, created at
            the first spill and deleted by :meth:`cleanup` (or ``with recorder:``).

    The deltas are of the original-architecture parameters (``unwrap(model)``); an
    attached model's ``G`` (stepped by its own optimiser on ERM epochs) and buffers such
    as BatchNorm running statistics are not recorded. With gradient accumulation one
    recorded step covers the micro-batches of one optimizer step; under several processes
    the labels of all processes count and only the main process stores deltas (call
    ``amnesiac`` there). A user's own loop calls :meth:`before_step` / :meth:`after_step`
    around ``optimizer.step()``.
    """

    def __init__(self, classes: Iterable[int] | None = None, *,
                 memory_limit_mb: float = 512.0,
                 spill_dir: str | Path | None = None) -> None:
        if classes is not None:
            watch = [int(c) for c in classes]
            if not watch:
                raise ValueError("classes=[] would record nothing; pass None to record "
                                 "every step")
            self.watch: set[int] | None = set(watch)
        else:
            self.watch = None
        if memory_limit_mb < 0:
            raise ValueError(f"memory_limit_mb must be >= 0, got {memory_limit_mb}")
        self.memory_limit_bytes = int(memory_limit_mb * 2**20)
        self._own_dir = spill_dir is None
        self.spill_dir: Path | None = Path(spill_dir) if spill_dir is not None else None
        self.steps: list[RecordedStep] = []
        self.total_steps = 0
        self.memory_bytes = 0
        self.disk_bytes = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._memory: dict[int, dict[str, torch.Tensor]] = {}
        self._snapshot: dict[str, torch.Tensor] | None = None
        self._pending: set[int] = set()
        self._fingerprint: torch.Tensor | None = None

    # ------------------------------------------------------------ train() callbacks
    def on_before_step(self, trainer: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        self.before_step(trainer.model, y, accelerator=trainer.accelerator)

    def on_after_step(self, trainer: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        self.after_step(trainer.model, accelerator=trainer.accelerator)

    # ------------------------------------------------------------ the recording
    def _wanted(self, classes: set[int]) -> bool:
        return bool(classes) and (self.watch is None or bool(classes & self.watch))

    def before_step(self, model: nn.Module, labels: torch.Tensor, *,
                    accelerator: Any = None) -> None:
        """Call before ``optimizer.step()`` with the batch labels."""
        if accelerator is not None and accelerator.num_processes > 1:
            # every process must record the same decision: the step's update is the mean of
            # all processes' gradients, so the batch is the union of their labels
            padded = accelerator.pad_across_processes(labels.reshape(-1), pad_index=-1)
            labels = accelerator.gather(padded)
            labels = labels[labels >= 0]
        self._pending |= set(labels.unique().tolist())
        if accelerator is not None and not accelerator.sync_gradients:
            return  # an accumulation micro-step: the weights do not move yet
        stores = accelerator is None or accelerator.is_main_process
        if stores and self._wanted(self._pending):
            self._snapshot = {n: p.detach().to("cpu", copy=True)
                              for n, p in unwrap(model).named_parameters()}

    @torch.no_grad()
    def after_step(self, model: nn.Module, *, accelerator: Any = None) -> None:
        """Call after ``optimizer.step()``: stores the delta when the step is recorded."""
        if accelerator is not None and not accelerator.sync_gradients:
            return
        params = dict(unwrap(model).named_parameters())
        classes, self._pending = sorted(self._pending), set()
        if self._snapshot is not None:
            deltas = {n: params[n].detach().cpu() - old for n, old in self._snapshot.items()}
            self._snapshot = None
            self._store(self.total_steps, classes, deltas)
        self.total_steps += 1
        self._fingerprint = _fingerprint(params.values())

    def _store(self, step: int, classes: list[int], deltas: dict[str, torch.Tensor]) -> None:
        if not self.shapes:
            self.shapes = {n: tuple(d.shape) for n, d in deltas.items()}
        nbytes = sum(d.numel() * d.element_size() for d in deltas.values())
        if self.memory_bytes + nbytes <= self.memory_limit_bytes:
            self._memory[step] = deltas
            self.memory_bytes += nbytes
            self.steps.append(RecordedStep(step, classes, None, nbytes))
            return
        from safetensors.torch import save_file

        if self.spill_dir is None:
            self.spill_dir = Path(tempfile.mkdtemp(prefix="erm-amnesiac-"))
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"step_{step:07d}.safetensors"
        save_file({n: d.contiguous() for n, d in deltas.items()}, str(path),
                  metadata={"step": str(step), "classes": json.dumps(classes)})
        self.disk_bytes += nbytes
        self.steps.append(RecordedStep(step, classes, str(path), nbytes))

    def deltas(self, step: RecordedStep) -> dict[str, torch.Tensor]:
        """The parameter deltas of one recorded step (read from disk when spilled)."""
        if step.path is None:
            return self._memory[step.step]
        from safetensors.torch import load_file

        return load_file(step.path)

    # ------------------------------------------------------------ housekeeping
    @property
    def recorded_steps(self) -> int:
        return len(self.steps)

    def cleanup(self) -> None:
        """Forget every delta and delete the spill files (the folder too, if it was a
        temporary one)."""
        for s in self.steps:
            if s.path is not None:
                Path(s.path).unlink(missing_ok=True)
        if self._own_dir and self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self.spill_dir = None
        self.steps, self._memory = [], {}
        self.memory_bytes = self.disk_bytes = 0

    def __enter__(self) -> UpdateRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return (f"UpdateRecorder(watch={sorted(self.watch) if self.watch else 'all'}, "
                f"recorded={len(self.steps)}/{self.total_steps} steps, "
                f"memory={self.memory_bytes / 2**20:.1f} MiB, "
                f"disk={self.disk_bytes / 2**20:.1f} MiB)")


# ----------------------------------------------------------------------- unlearning


@dataclass(kw_only=True)
class AmnesiacConfig(Recipe):
    """Settings of the repair fine-tune that follows the subtraction: the fields of
    :class:`~erm_surgery.training.optim.Recipe` (SGD, nesterov momentum 0.9, cosine to 0).

    ``epochs``: fine-tuning epochs on the retain data after the updates are subtracted
    (0 = none: the bare subtraction).
    """

    epochs: int = 2
    lr: float = 0.05
    batch_size: int = 64

    min_epochs: ClassVar[int] = 0


@dataclass(kw_only=True)
class AmnesiacInfo(BaselineInfo):
    """What :func:`amnesiac` did.

    Attributes:
        steps_undone: recorded steps whose batch held a forget class (subtracted).
        steps_recorded: steps the recorder stored.
        steps_total: optimizer steps the recorder saw.
        undone_fraction: ``steps_undone / steps_total``; near 1 for class unlearning.
        bytes_read: bytes of deltas applied (memory and disk).
        spill_files_read: of which from spill files.
        update_norm: L2 norm of the total update subtracted.
    """

    steps_undone: int = 0
    steps_recorded: int = 0
    steps_total: int = 0
    undone_fraction: float = math.nan
    bytes_read: int = 0
    spill_files_read: int = 0
    update_norm: float = math.nan


@register_method("amnesiac", config=AmnesiacConfig, info=AmnesiacInfo, cli=False,
                 summary="subtract the recorded updates of forget batches, then fine-tune "
                         "(Graves et al. 2021)")
def amnesiac(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: AmnesiacConfig,
    accelerator: Any = None,
    recorder: UpdateRecorder | None = None,
) -> tuple[nn.Module, AmnesiacInfo]:
    """Amnesiac unlearning (Graves et al., AAAI 2021): subtract the recorded updates of the
    steps whose batch held a forget class, then fine-tune on the retain data.

    ``recorder`` is the :class:`UpdateRecorder` that was passed to
    ``train(..., callbacks=[recorder])`` when ``model`` was trained (pass it through
    ``unlearn(..., method="amnesiac", recorder=recorder)``). ``model`` is not modified.
    Cost: reading every undone delta (memory or disk) plus ``epochs`` epochs.
    """
    cfg = config
    req = parse_request(model, classes, data)
    if not isinstance(recorder, UpdateRecorder):
        raise UnlearningError(
            "amnesiac needs recorder=: the UpdateRecorder passed to "
            "erm_surgery.train(..., callbacks=[recorder]) when the model was trained "
            f"(got {type(recorder).__name__})")
    if recorder.total_steps == 0:
        raise UnlearningError("the recorder saw no training step: pass it to "
                              "train(..., callbacks=[recorder]) before unlearning")
    if recorder.watch is not None and not set(req.forget) <= recorder.watch:
        missing = sorted(set(req.forget) - recorder.watch)
        raise UnlearningError(f"the recorder did not watch classes {missing} (it watched "
                              f"{sorted(recorder.watch)}): their updates were not recorded")
    net = unwrap(model)
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
    if recorder.shapes and recorder.shapes != shapes:
        raise UnlearningError("the recorder's deltas do not fit this model's parameters: it "
                              "recorded another architecture")
    if (recorder._fingerprint is not None and not math.isclose(
            float(recorder._fingerprint), float(_fingerprint(net.parameters())),
            rel_tol=1e-9, abs_tol=1e-6)):
        warn_user("the model's parameters differ from those after the last recorded "
                      "step: it was trained further (those updates are not undone) or it is "
                      "another model")
    out = copy.deepcopy(model)
    params = dict(unwrap(out).named_parameters())
    forget = set(req.forget)
    undone = bytes_read = files = 0
    total = {n: torch.zeros_like(p, device="cpu") for n, p in params.items()}
    for step in recorder.steps:
        if not forget & set(step.classes):
            continue
        for n, d in recorder.deltas(step).items():
            total[n] += d
        undone += 1
        bytes_read += step.nbytes
        files += step.path is not None
    with torch.no_grad():
        for n, p in params.items():
            p.sub_(total[n].to(p.device, p.dtype))
    norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in total.values())))
    device = device_name(next(iter(params.values())).device) if params else "cpu"
    if cfg.epochs:
        loop = sgd_loop(out, req.retain_set(), cfg, accelerator=accelerator,
                        desc="Amnesiac repair")
        out, device = loop.model, loop.device
    out.eval()
    mark_forgotten(out, req.forget)
    info = AmnesiacInfo(
        method="amnesiac", forget_classes=req.forget, device=device,
        samples=len(req.retain_idx) if cfg.epochs else 0,
        epochs=cfg.epochs, steps_undone=undone, steps_recorded=len(recorder.steps),
        steps_total=recorder.total_steps, undone_fraction=undone / recorder.total_steps,
        bytes_read=bytes_read, spill_files_read=files, update_norm=norm)
    return out, info
