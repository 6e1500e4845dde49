"""ERM training (paper Algorithm 1) on Hugging Face Accelerate.

``train(model, data, epochs=...)`` runs on one CPU, one or many GPUs, and under
``torchrun`` / ``accelerate launch`` unchanged. STD epochs update the weights with plain
cross-entropy; ERM epochs update the weights and ``G`` with :func:`erm_loss` (which by
default also trains the standard path from the same backbone pass), then project ``G``.
The default schedule is one STD warm-up epoch, then ERM epochs. ``G`` has its own Adam
optimiser, stepped only on ERM epochs, so momentum or weight decay never move it during
STD epochs.

(Over 400 lines on purpose: the trainer owns its resumable checkpoints and the checks that
a resume matches the run, and :class:`ERMTrainer` and :func:`train` share one set of run
settings, written out as keyword arguments with their documentation rather than hidden in
``**kwargs``. Input checks, the ERM health summary and the prohibition table have their own
modules: :mod:`.checks`, :mod:`.health`, :mod:`.prohibition`.)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import atomic_write, save
from ..data import as_dataset, check_labels, shuffled_loader
from ..errors import CheckpointError, TrainingError, warn_user
from ..surgery import ERMModel
from . import g_metrics as metrics
from .checks import NonFiniteWatch, check_training_data
from .health import WEAK_PROHIBITION, ERMHealth, erm_health
from .losses import ERMConfig, erm_loss, is_erm_epoch
from .optim import cosine_schedule, default_optimizer
from .precision import refuse_cpu_bfloat16_hazards

__all__ = ["EpochStats", "TrainResult", "ERMHealth", "erm_health", "ERMTrainer", "train",
           "make_accelerator", "std_accuracy", "caller_state_kept", "TrainingData"]

_STATE_FILE = "trainer_state.pt"
_MODEL_FILE = "model.safetensors"


def _is_checkpoint(path: Path) -> bool:
    return (path / _STATE_FILE).is_file() and (path / _MODEL_FILE).is_file()


@dataclass
class EpochStats:
    """One row of the training history.

    ``train_accuracy`` and ``loss`` come from the forward passes the epoch trained with (the
    ERM path on ERM epochs: no second pass); ``val_accuracy`` is the STD path on
    ``val_data``, over the whole set across processes.
    """

    epoch: int
    path: str
    loss: float
    train_accuracy: float
    val_accuracy: float | None
    csi: float
    l1_density: float
    ones_per_row: float
    lr: float
    seconds: float


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model (unwrapped) and the history."""

    model: ERMModel
    history: list[EpochStats] = field(default_factory=list)
    config: ERMConfig = field(default_factory=ERMConfig)
    health: ERMHealth | None = None
    #: the weights' optimiser: the default's choice and why, or the caller's class name
    optimizer: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "history": [asdict(h) for h in self.history],
                "health": asdict(self.health) if self.health is not None else None,
                "optimizer": self.optimizer}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


#: prohibited-class accuracy above which train() warns (paper Table 2 reaches ~0)
def make_accelerator(mixed_precision: str = "no", gradient_accumulation_steps: int = 1):
    """An ``Accelerator`` that uses the GPUs when there are any and gloo on CPUs otherwise.

    On a CPU-only machine ``cpu=True`` matters: without it, two processes started by
    ``torchrun`` do not join one process group.
    """
    from accelerate import Accelerator

    try:
        return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision,
                           gradient_accumulation_steps=gradient_accumulation_steps)
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise
        # Accelerate keeps one state per process: the first train()/unlearn() call fixed it
        raise ValueError(
            f"mixed_precision={mixed_precision!r} cannot be used: this process already "
            "created an Accelerator with another setting, and Accelerate allows one per "
            "process. Create one Accelerator yourself and pass it as accelerator= to every "
            "call, or run the call in a new process") from err


@contextlib.contextmanager
def caller_state_kept(*, rng: bool = False) -> Iterator[None]:
    """Leave the caller's process as it was after a ``train()`` / ``unlearn()`` call.

    Accelerate keeps the gradient-accumulation setting in one state shared by every
    ``Accelerator`` of the process, so the default accelerator a call builds would reset
    the caller's own ``Accelerator(gradient_accumulation_steps=4)`` to 1: it is restored.
    With ``rng=True`` the global torch (CPU and CUDA), numpy and ``random`` generators run
    forked: the call may seed them (``set_seed``) without moving the caller's streams.
    """
    from accelerate.state import GradientState

    shared = GradientState._shared_state
    had, kwargs = "plugin_kwargs" in shared, dict(shared.get("plugin_kwargs") or {})
    with contextlib.ExitStack() as stack:
        if rng:
            devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
            stack.enter_context(torch.random.fork_rng(devices=devices))
            np_state = _numpy_state()
            py_state = random.getstate()
        try:
            yield
        finally:
            if had:
                shared["plugin_kwargs"] = kwargs
            if rng:
                random.setstate(py_state)
                if np_state is not None:
                    import numpy as np

                    np.random.set_state(np_state)


def _numpy_state() -> Any:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return None
    return np.random.get_state()


class TrainingData:
    """A reference (never a copy) to the data a model was trained on, kept by
    :func:`train` as ``model.training_data`` so ``unlearn(model, classes)`` can use it.

    It sits in the model's ``__dict__``, outside the module registry: ``state_dict`` and
    checkpoints never see it, ``copy.deepcopy(model)`` shares it (``__deepcopy__`` returns
    the holder itself) and pickling the model drops the data (it unpickles empty).
    """

    def __init__(self, data: Any) -> None:
        self.data = data

    def __deepcopy__(self, memo: dict) -> TrainingData:
        return self

    def __reduce__(self) -> tuple[type, tuple[None]]:
        return (TrainingData, (None,))

    def __repr__(self) -> str:
        return f"TrainingData({type(self.data).__name__})"


@torch.no_grad()
def std_accuracy(model: nn.Module, loader: DataLoader, accelerator=None) -> float:
    """STD-path accuracy over the whole loader (all processes, no duplicated samples)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long)
    outside = torch.zeros((), dtype=torch.long)  # labels outside 0..C-1 (one sync, at the end)
    total = 0
    for x, y in loader:
        logits = model(x)
        if total == 0:  # the first batch: float, one-hot or (N, 1) labels
            check_labels(y, logits.shape[1], error=TrainingError, name="the val_data labels")
        pred = logits.argmax(dim=1)
        if accelerator is not None:
            pred, y = accelerator.gather_for_metrics((pred, y))
        correct = correct + (pred == y).sum().cpu()
        outside = outside + ((y < 0) | (y >= logits.shape[1])).sum().cpu()
        total += y.numel()
    model.train(was_training)
    if int(outside):
        raise TrainingError(f"{int(outside)} val_data labels lie outside 0..{logits.shape[1] - 1}"
                            f": expected integer class ids of the model's "
                            f"{logits.shape[1]} classes")
    return float(correct) / max(total, 1)


def _split_compiled(model: Any) -> tuple[ERMModel, nn.Module | None]:
    """``(attached model, its torch.compile wrapper or None)``; anything else is refused."""
    compiled = None
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        compiled, model = model, model._orig_mod
    if not isinstance(model, ERMModel):
        raise TypeError("train() takes a model returned by erm_surgery.attach() (or "
                        f"torch.compile of one), got {type(model).__name__}")
    return model, compiled


class ERMTrainer:
    """Algorithm 1 on Accelerate. See :func:`train` for the arguments."""

    def __init__(
        self,
        model: ERMModel,
        train_data: Dataset | DataLoader,
        *,
        epochs: int,
        val_data: Dataset | DataLoader | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        config: ERMConfig | None = None,
        accelerator: Any = None,
        batch_size: int = 128,
        lr: float | None = None,
        weight_decay: float | None = None,
        mixed_precision: str = "no",
        gradient_accumulation_steps: int = 1,
        seed: int = 0,
        output_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        show_progress: bool = True,
        num_workers: int = 0,
        callbacks: Sequence[Any] = (),
        channels_last: bool = False,
        mixup: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
        | None = None,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        model, compiled = _split_compiled(model)
        if compile and compiled is None:
            compiled = torch.compile(model, **(compile if isinstance(compile, dict) else {}))
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if scheduler is not None and optimizer is None:
            raise ValueError("a scheduler needs the optimizer it drives: pass optimizer= too")
        if checkpoint_every and output_dir is None:
            raise ValueError("checkpoint_every needs output_dir= to write checkpoints to")
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if value is not None and not math.isfinite(float(value)):
                raise ValueError(f"{name} must be a finite number, got {value}")
        # labels, emptiness, one-sample batches: refused before anything is changed
        self._check_first_batch = check_training_data(model, train_data, val_data)
        self.model = model
        # timm's Mixup / CutMix: (x, y) -> (mixed x, soft targets), on every training batch
        self.mixup = mixup
        self.criterion = criterion or F.cross_entropy
        self.config = config or ERMConfig()
        self.epochs = epochs
        self.seed = seed
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.show_progress = show_progress
        # NHWC weights and inputs: faster convolutions on GPUs with tensor cores (AMP)
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        # objects with optional on_before_step(trainer, x, y) / on_after_step(trainer, x, y)
        # methods, called around every optimizer step (e.g. an update recorder)
        self.callbacks = list(callbacks)
        self.accelerator = accelerator or make_accelerator(mixed_precision,
                                                           gradient_accumulation_steps)
        from accelerate.utils import set_seed

        set_seed(seed)
        # the sampler's generator is re-seeded every epoch, so a resumed run sees the same
        # batches as an uninterrupted one
        self._generator = torch.Generator()
        if isinstance(train_data, DataLoader):
            train_loader = train_data
        else:
            train_loader = shuffled_loader(as_dataset(train_data), batch_size,
                                           generator=self._generator, num_workers=num_workers)
        self._settings = {  # a resumed run must match them (load_checkpoint)
            "epochs": epochs, "batch_size": train_loader.batch_size, "seed": seed,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "config": self.config.to_dict()}
        val_loader = None
        if val_data is not None:
            val_loader = val_data if isinstance(val_data, DataLoader) else DataLoader(
                as_dataset(val_data), batch_size=batch_size * 2, num_workers=num_workers)

        G = model.erm.G
        if optimizer is None:
            params = [p for p in model.model.parameters() if p.requires_grad]
            choice = default_optimizer(model.model)
            if lr is not None and choice.name != "sgd" and lr > 5 * choice.lr:
                # lr=0.05 is an SGD value (train()'s default before the family rule)
                warn_user(
                    f"lr={lr:g} goes to {choice.name} ({choice.reason}), whose own default "
                    f"is {choice.lr:g}: a learning rate this high may diverge. Omit lr= for "
                    f"{choice.name}'s, or pass optimizer= to choose the optimiser")
            optimizer = choice.build(params, lr, weight_decay)
            group = optimizer.param_groups[0]
            self._optimizer_summary = (
                f"{choice.name} lr={group['lr']:g} weight_decay="
                f"{group['weight_decay']:g} (default: {choice.reason})")
        else:
            self._optimizer_summary = f"{type(optimizer).__name__} (the caller's)"
        if any(p is G for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("leave model.erm.G out of optimizer=: G has its own optimiser "
                             "(ERMConfig.g_lr), stepped only on ERM epochs")
        steps_per_epoch = math.ceil(len(train_loader) / gradient_accumulation_steps)
        if scheduler is None:
            scheduler = cosine_schedule(optimizer, steps_per_epoch * epochs)
        g_optimizer = torch.optim.Adam([G], lr=self.config.g_lr)

        acc = self.accelerator
        (self.wrapped, self.optimizer, self.g_optimizer, self.train_loader,
         self.scheduler) = acc.prepare(compiled if compiled is not None else model, optimizer,
                                       g_optimizer, train_loader, scheduler)
        self.val_loader = acc.prepare(val_loader) if val_loader is not None else None
        self.history: list[EpochStats] = []
        self.start_epoch = 0
        self._watch = NonFiniteWatch(acc.device, "ERM training", TrainingError, acc)
        # oneDNN's bfloat16 weight gradients are wrong for some small-map geometries:
        # checked on the first batch (refuse_cpu_bfloat16_hazards)
        self._check_bfloat16 = True

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write model, optimisers, scheduler, RNG and history to folder ``path``.

        The folder is assembled under a temp name and swapped in, so a crash leaves the
        previous checkpoint intact (as ``path`` or, when killed mid-swap, as ``path.old``,
        which :meth:`load_checkpoint` falls back to). Temp folders a killed save left behind
        are removed. Only the main process writes.
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            stale = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}")  # mkdtemp's names
            for old_tmp in path.parent.glob(f".{path.name}.*"):
                if old_tmp.is_dir() and stale.fullmatch(old_tmp.name):
                    shutil.rmtree(old_tmp, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
            try:
                save(self.model, tmp / _MODEL_FILE)
                state = {
                    "epoch": len(self.history),
                    "optimizer": self.optimizer.state_dict(),
                    "g_optimizer": self.g_optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "history": [asdict(h) for h in self.history],
                    "config": self.config.to_dict(),
                    "settings": self._settings,
                }
                torch.save(state, tmp / _STATE_FILE)
                old = path.with_name(path.name + ".old")
                if path.exists():
                    os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore everything :meth:`save_checkpoint` wrote; training continues exactly."""
        from safetensors.torch import load_file

        path = Path(path)
        old = path.with_name(path.name + ".old")
        if not path.exists() and _is_checkpoint(old):  # a save killed mid-swap
            warn_user(f"{path} is missing; resuming from {old}, the checkpoint a save "
                      "interrupted between its two renames kept")
            path = old
        if not _is_checkpoint(path):
            raise CheckpointError(f"{path} is not a training checkpoint folder (expected "
                                  f"{_MODEL_FILE} and {_STATE_FILE})")
        state = torch.load(path / _STATE_FILE, weights_only=True, map_location="cpu")
        tensors = load_file(str(path / _MODEL_FILE))
        model = self.model
        self._check_resume(path, state, tensors, model)  # before anything is loaded
        model.model.load_state_dict({k[6:]: v for k, v in tensors.items()
                                     if k.startswith("model.")})
        model.erm.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("erm.")})
        self.optimizer.load_state_dict(state["optimizer"])
        self.g_optimizer.load_state_dict(state["g_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.history = [EpochStats(**h) for h in state["history"]]
        self.start_epoch = int(state["epoch"])

    def _check_resume(self, path: Path, state: dict[str, Any],
                      tensors: dict[str, torch.Tensor], model: ERMModel) -> None:
        """The checkpoint must fit the model (keys, shapes), the optimiser and this run's
        settings (batch size, seed, ERMConfig...; ``epochs`` may grow)."""
        expected = {f"{prefix}.{k}": tuple(v.shape)
                    for prefix, module in (("model", model.model), ("erm", model.erm))
                    for k, v in module.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        problems = [f"missing {k}" for k in expected if k not in found][:5]
        problems += [f"unexpected {k}" for k in found if k not in expected][:5]
        problems += [f"{k}: {found[k]} in the checkpoint, {shape} in the model"
                     for k, shape in expected.items() if k in found and found[k] != shape][:5]
        if problems:
            raise CheckpointError(
                f"cannot resume from {path}: it does not match the model (another "
                f"architecture or class count?): {'; '.join(problems)}. Nothing was loaded")
        groups = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
        if groups != [len(g["params"]) for g in self.optimizer.param_groups]:
            raise CheckpointError(f"cannot resume from {path}: its optimiser state has "
                                  f"parameter groups of sizes {groups}, this run's optimiser "
                                  "others. Nothing was loaded")
        recorded = dict(state.get("settings") or {})
        recorded.setdefault("config", state.get("config"))
        differ = []
        for key, ours in self._settings.items():
            theirs = recorded.get(key)
            if theirs is None or (key == "epochs" and ours >= theirs):
                continue
            if key == "config":
                # a field the checkpoint lacks is newer than it: not a difference
                differ += [f"config.{k}={ours[k]!r} (checkpoint: {theirs[k]!r})"
                           for k in ours if k in theirs and ours[k] != theirs[k]]
            elif ours != theirs:
                differ.append(f"{key}={ours!r} (checkpoint: {theirs!r})")
        done = int(state["epoch"])
        if done > self.epochs and "epochs" not in recorded:  # a checkpoint without settings
            differ.append(f"epochs={self.epochs} (the checkpoint already finished {done})")
        if differ:
            raise CheckpointError(
                f"cannot resume from {path}: this run's settings differ from the ones it was "
                f"written with: {', '.join(differ)}. A resumed run continues exactly only "
                "with the same settings (epochs may grow); pass them, or start a new run "
                "without resume_from. Nothing was loaded")

    # ------------------------------------------------------------------ the loop

    def _notify(self, event: str, x: torch.Tensor, y: torch.Tensor) -> None:
        for callback in self.callbacks:
            hook = getattr(callback, event, None)
            if hook is not None:
                hook(self, x, y)

    def _run_epoch(self, epoch: int, progress) -> tuple[float, float]:
        acc, cfg = self.accelerator, self.config
        erm_path = is_erm_epoch(epoch, cfg)
        model = self.wrapped
        mask = self.model.erm
        # DDP needs every parameter in every backward; on STD epochs G gets a zero gradient
        distributed = acc.num_processes > 1
        model.train()
        self._generator.manual_seed(self.seed * 100_003 + epoch)
        sums = torch.zeros(3, device=acc.device)  # loss * n, correct, n (no per-step sync)
        self._watch.start(epoch)
        for x, y in self.train_loader:
            if self._check_first_batch:  # labels not readable up front: the first batch's
                check_labels(y, mask.G.shape[0], error=TrainingError,
                             name="the training labels (first batch)")
                self._check_first_batch = False
            if self._check_bfloat16:  # before the first step: see .precision
                self._check_bfloat16 = False
                refuse_cpu_bfloat16_hazards(self.model, x, acc, TrainingError,
                                            "erm_surgery.train")
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            with acc.accumulate(model):
                if erm_path:
                    loss, terms = erm_loss(model, x, y, cfg, criterion=self.criterion,
                                           return_terms=True)
                    logits = terms["logits"]
                else:
                    logits = model(x)
                    loss = self.criterion(logits, y)
                    if distributed:
                        loss = loss + 0.0 * mask.G.sum()
                acc.backward(loss)
                self._notify("on_before_step", x, y)
                self.optimizer.step()
                self.scheduler.step()
                if erm_path:
                    self.g_optimizer.step()
                self._notify("on_after_step", x, y)
                self.optimizer.zero_grad(set_to_none=True)
                self.g_optimizer.zero_grad(set_to_none=True)
                if erm_path and acc.sync_gradients:
                    mask.project_(cfg.projection)
            n = y.shape[0]
            hard = y.argmax(dim=1) if y.is_floating_point() else y  # soft targets: top class
            sums += torch.stack([loss.detach().float() * n,
                                 (logits.argmax(dim=1) == hard).sum().float(),
                                 torch.tensor(float(n), device=sums.device)])
            self._watch.update(loss)  # host look every CHECK_FINITE_EVERY batches
            if progress is not None:
                progress.update(1)
        self._watch.check()
        if erm_path and cfg.prune_below > 0 and self._last_erm_epoch(epoch):
            mask.prune_(cfg.prune_below)  # every rank holds the same G: same result
        sums = acc.reduce(sums, reduction="sum").cpu()
        return float(sums[0] / sums[2].clamp_min(1)), float(sums[1] / sums[2].clamp_min(1))

    def _last_erm_epoch(self, epoch: int) -> bool:
        """Whether no ERM epoch follows ``epoch`` in this run. ``G`` is pruned only then: the
        STD epochs after it never read ``G``, so the STD accuracy is the unpruned run's
        (pruning after every ERM epoch moved it by -1.5 to +0.3 points, one seed per model)."""
        return not any(is_erm_epoch(e, self.config) for e in range(epoch + 1, self.epochs))

    def fit(self, resume_from: str | os.PathLike | None = None) -> TrainResult:
        """Train for the remaining epochs; returns the unwrapped model and the history."""
        from tqdm.auto import tqdm

        if resume_from is not None:
            self.load_checkpoint(resume_from)
        acc = self.accelerator
        total = (self.epochs - self.start_epoch) * len(self.train_loader)
        progress = tqdm(total=total, disable=not (self.show_progress and acc.is_main_process),
                        desc="ERM training", unit="batch", dynamic_ncols=True)
        model = self.model
        try:
            for epoch in range(self.start_epoch, self.epochs):
                path = "erm" if is_erm_epoch(epoch, self.config) else "std"
                progress.set_description(f"epoch {epoch + 1}/{self.epochs} [{path}]")
                start = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                loss, train_acc = self._run_epoch(epoch, progress)
                val_acc = (std_accuracy(self.wrapped, self.val_loader, acc)
                           if self.val_loader is not None else None)
                G = model.erm.G
                stats = EpochStats(
                    epoch=epoch, path=path, loss=loss, train_accuracy=train_acc,
                    val_accuracy=val_acc, csi=float(metrics.csi(G)),
                    l1_density=float(metrics.l1_density(G)),
                    ones_per_row=float(metrics.ones_per_row(G)), lr=lr,
                    seconds=time.perf_counter() - start)
                self.history.append(stats)
                progress.set_postfix(loss=f"{loss:.3f}", acc=f"{train_acc:.3f}",
                                     val=f"{val_acc:.3f}" if val_acc is not None else "-",
                                     csi=f"{stats.csi:.2f}", dens=f"{stats.l1_density:.3f}")
                done = epoch + 1
                if self.checkpoint_every and (done % self.checkpoint_every == 0
                                              or done == self.epochs):
                    self.save_checkpoint(self.output_dir / "checkpoint")
        finally:
            progress.close()
        # a run without ERM epochs (plain training, e.g. a retrained reference) leaves G
        # untouched: its prohibition says nothing, so there is no health to report
        trained_g = any(h.path == "erm" for h in self.history)
        health = erm_health(model, self.val_loader) if trained_g else None
        if acc.is_main_process and health is not None:
            if self.show_progress:
                print(health, flush=True)
            if health.weak:
                warn_user(
                    f"ERM prohibition is weak: with its channels prohibited a class keeps "
                    f"{health.prohibited:.1%} accuracy on val_data (target <= "
                    f"{WEAK_PROHIBITION:.0%}), so unlearning by G will leave it readable. "
                    "Train more epochs, keep ERMConfig.lambda4 > 0 (the prohibition term), "
                    "or check erm_surgery.prohibition_accuracy per class")
        result = TrainResult(model=model, history=self.history, config=self.config,
                             health=health, optimizer=self._optimizer_summary)
        if self.output_dir is not None and acc.is_main_process:
            atomic_write(self.output_dir / "history.json",
                         lambda tmp: Path(tmp).write_text(result.to_json()))
        acc.wait_for_everyone()
        return result


def train(
    model: ERMModel,
    train_data: Dataset | DataLoader,
    *,
    epochs: int,
    val_data: Dataset | DataLoader | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    config: ERMConfig | None = None,
    accelerator: Any = None,
    resume_from: str | os.PathLike | None = None,
    batch_size: int = 128,
    lr: float | None = None,
    weight_decay: float | None = None,
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    show_progress: bool = True,
    num_workers: int = 0,
    callbacks: Sequence[Any] = (),
    channels_last: bool = False,
    mixup: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    | None = None,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    compile: bool | dict[str, Any] = False,
) -> TrainResult:
    """Train an attached model with ERM training; returns a :class:`TrainResult`.

    Args:
        model: a model returned by :func:`erm_surgery.attach` (trained in place).
        train_data: a Dataset of ``(image, label)`` pairs or a DataLoader. With a Dataset
            the batches are shuffled by a generator re-seeded each epoch from ``seed``, so
            ``resume_from`` continues exactly.
        epochs: total number of epochs; the ERM/STD schedule comes from ``config``.
        val_data: optional data for the STD-path validation accuracy of every epoch.
        optimizer: for the weights; must not contain ``G``, which has its own Adam.
            Default: :func:`~erm_surgery.training.optim.default_optimizer` by the model's
            family: SGD (momentum 0.9, nesterov, lr 0.05, weight decay 5e-4) for
            BatchNorm CNNs, AdamW (lr 2e-3, weight decay 0.05) for LayerNorm-only ones
            such as ConvNeXt, on which SGD collapses (docs/training.md).
            ``TrainResult.optimizer`` says which.
        scheduler: stepped once per optimizer step (default: cosine to 0 over the run).
        config: :class:`ERMConfig` (loss weights, density target, schedule, projection).
        accelerator: an ``accelerate.Accelerator``; default: one made by
            :func:`make_accelerator` with ``mixed_precision`` and
            ``gradient_accumulation_steps``.
        resume_from: a checkpoint folder written by an earlier run (``output_dir/checkpoint``).
        batch_size: minibatch size of a Dataset's loader (validation: twice that).
        lr: learning rate of the default optimiser (None = its own: 0.05 SGD, 2e-3 AdamW).
        weight_decay: weight decay of the default optimiser (None = its own: 5e-4 SGD,
            0.05 AdamW).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` for the default accelerator.
            ``"bf16"`` on a CPU is refused (:class:`TrainingError`, before the first step)
            for a model with a strided convolution that meets a one-pixel map at the
            data's size: oneDNN leaves part of its bfloat16 weight gradient uninitialised
            (:mod:`erm_surgery.training.precision`).
        gradient_accumulation_steps: for the default accelerator.
        seed: seeds the run (data order, initial random state).
        output_dir: history.json and checkpoints, written by the main process only.
        checkpoint_every: epochs between resumable checkpoints (0 = never).
        show_progress: tqdm bar on the main process.
        num_workers: DataLoader worker processes.
        callbacks: objects with optional ``on_before_step(trainer, x, y)`` /
            ``on_after_step(trainer, x, y)``, called around every optimizer step.
        channels_last: NHWC weights and inputs, for GPUs with AMP.
        mixup: ``mixup(x, y) -> (x, y_soft)`` applied to every training batch, e.g. timm's
            ``Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=C)``; the ERM path then
            masks each image with the label-weighted mix of its classes' rows of ``G``.
        criterion: ``criterion(logits, y)`` of both paths (default ``F.cross_entropy``, which
            takes class ids and soft targets); e.g. timm's ``SoftTargetCrossEntropy``.
        compile: ``torch.compile`` the model for the run (``True``, or a dict of
            ``torch.compile`` keyword arguments such as ``{"backend": "aot_eager"}``). A model
            compiled by the caller (``torch.compile(attached)``) is accepted as it is.

    The call leaves the caller's process as it was: the global torch / numpy / ``random``
    generators are forked (the run is seeded from ``seed`` alone), and the gradient-
    accumulation setting Accelerate shares between accelerators is restored. ``model``
    remembers a reference to ``train_data`` (``model.training_data``, not a copy), so
    ``erm_surgery.unlearn(model, classes)`` needs no data argument.

    Raises:
        ValueError: bad arguments (``epochs < 1``, an ``lr`` / ``weight_decay`` that is NaN
            or infinite, ...).
        TrainingError: before any work, empty data, one sample with BatchNorm, or training
            / ``val_data`` labels that are not integer class ids ``0..C-1``; during the run,
            a NaN / Inf loss (read every :data:`CHECK_FINITE_EVERY` batches and at each
            epoch's end; the message names the epoch and the batches).
        CheckpointError: ``resume_from`` is not a training checkpoint, does not fit the
            model, or was written with other run settings (``epochs`` may grow); nothing
            is loaded then.
    """
    with caller_state_kept(rng=True):  # seeded from `seed`; the caller's streams untouched
        trainer = ERMTrainer(model, train_data, epochs=epochs, val_data=val_data,
                             optimizer=optimizer, scheduler=scheduler, config=config,
                             accelerator=accelerator, batch_size=batch_size, lr=lr,
                             weight_decay=weight_decay, mixed_precision=mixed_precision,
                             gradient_accumulation_steps=gradient_accumulation_steps,
                             seed=seed, output_dir=output_dir,
                             checkpoint_every=checkpoint_every, show_progress=show_progress,
                             num_workers=num_workers, callbacks=callbacks,
                             channels_last=channels_last, mixup=mixup, criterion=criterion,
                             compile=compile)
        result = trainer.fit(resume_from=resume_from)
    # a reference for unlearn(model, classes): outside the module registry, shared by deepcopy
    trainer.model.__dict__["training_data"] = TrainingData(train_data)
    return result
