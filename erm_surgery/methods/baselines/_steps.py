"""A step-by-step training run for the baselines whose step is more than ``loss_fn(logits,
y)``: SalUn (a gradient mask), l1-sparse (a penalty on the weights), SCRUB (two data
streams), Bad Teacher and Boundary Shrink (frozen teachers that see the inputs).

:class:`StepRun` is :func:`~erm_surgery.methods.baselines.common.sgd_loop` taken apart:
the same recipe (optimiser, cosine schedule over the whole run, seeded shuffles, the
last incomplete batch dropped), the same Accelerate wrapping and checks, but the caller
writes the loop and calls :meth:`StepRun.step` with each loss.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ...data import batch_statistics, first_input, shuffled_loader
from ...errors import UnlearningError
from ...surgery import unwrap
from ...training.optim import Recipe, cosine_schedule
from ...training.precision import refuse_cpu_bfloat16_hazards
from ...unlearning.request import device_name, frozen_mask
from .common import LoopResult

__all__ = ["StepRun", "frozen_teacher", "distill_kl", "steps_per_epoch"]


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
    """Optimiser steps of one pass over ``dataset`` (the last incomplete batch dropped, as
    :func:`~erm_surgery.data.shuffled_loader` does; at least 1)."""
    return max(1, len(dataset) // batch_size)  # type: ignore[arg-type]


def frozen_teacher(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model`` on ``device`` in eval mode with no parameter requiring grad: a
    teacher the run reads and never trains (the caller's model is not moved)."""
    teacher = copy.deepcopy(model).to(device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """``KL(teacher || student)`` of the temperature-softened distributions, averaged over
    the batch and scaled by ``T^2`` (Hinton et al. 2015) so its gradient does not shrink
    with ``T``."""
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (t * t)


class StepRun:
    """The optimiser, schedule and Accelerate wrapping of ``model`` for a loop the caller
    writes; a context manager (``G`` of an attached model stays frozen inside it).

    Usage::

        with StepRun(student, recipe, total_steps=n, accelerator=acc, desc="SCRUB") as run:
            for x, y in run.loader(data):
                run.step(loss_of(run.model(x), y))
        result = run.result()

    ``after_step(run)`` is called after every optimiser step (SalUn puts its frozen
    weights back there). ``params``: the parameters to train (default: every parameter
    of ``model`` that requires grad).
    """

    def __init__(self, model: nn.Module, recipe: Recipe, *, total_steps: int,
                 accelerator: Any = None, desc: str = "unlearn",
                 params: Iterable[torch.Tensor] | None = None,
                 after_step: Callable[[StepRun], None] | None = None,
                 train_mode: bool = True) -> None:
        from ...training import make_accelerator

        self.recipe = recipe
        self.desc = desc
        self.acc = accelerator or make_accelerator()
        self._model = model
        self._params = params
        self._after_step = after_step
        self._train_mode = train_mode
        self.total_steps = max(1, total_steps)
        self.steps = 0
        self.last = torch.zeros(())
        self._mask_ctx = frozen_mask(model)
        self._bf16_checked = False  # oneDNN's CPU bf16 hazard, on the first loader's data

    @property
    def device(self) -> torch.device:
        return self.acc.device

    def __enter__(self) -> StepRun:
        from tqdm.auto import tqdm

        self._mask_ctx.__enter__()
        params = [p for p in (self._params if self._params is not None
                              else unwrap(self._model).parameters()) if p.requires_grad]
        if not params:
            self._mask_ctx.__exit__(None, None, None)
            raise UnlearningError(
                f"{self.desc}: no parameter of the model requires grad (requires_grad=False "
                "on all of them, e.g. a frozen backbone and head), so there is nothing to "
                "train; unfreeze the layers to update (p.requires_grad_(True)) first")
        self.params = params
        opt = self.recipe.build_optimizer(params)
        sched = cosine_schedule(opt, self.total_steps)
        self.model, self.optimizer, self.scheduler = self.acc.prepare(self._model, opt, sched)
        self.model.train(self._train_mode)
        self._progress = tqdm(total=self.total_steps, desc=self.desc, unit="batch",
                              dynamic_ncols=True,
                              disable=not (self.recipe.show_progress
                                           and self.acc.is_main_process))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.close()
        self._mask_ctx.__exit__(*exc)

    def loader(self, dataset: Dataset, batch_size: int | None = None,
               seed: int | None = None) -> DataLoader:
        """A seeded, shuffled loader of ``dataset`` (incomplete last batch dropped),
        prepared for the accelerator. Refuses a one-sample set when the model normalises
        with batch statistics (it would fail inside BatchNorm)."""
        if len(dataset) < 2 and self._train_mode and batch_statistics(self._model):  # type: ignore[arg-type]
            raise UnlearningError(
                f"{self.desc}: the data holds {len(dataset)} sample(s) to train on, and the "  # type: ignore[arg-type]
                "model normalises with batch statistics (BatchNorm), which need more than "
                "one value per channel in a training batch; pass more data")
        if self._train_mode and not self._bf16_checked:  # the first loader: before any step
            self._bf16_checked = True
            refuse_cpu_bfloat16_hazards(unwrap(self._model), lambda: first_input(dataset),
                                        self.acc, UnlearningError, self.desc)
        loader = shuffled_loader(dataset, batch_size or self.recipe.batch_size,
                                 seed=self.recipe.seed if seed is None else seed)
        return self.acc.prepare(loader)

    def step(self, loss: torch.Tensor) -> None:
        """Backward, optimiser and schedule step, zero the gradients (no host sync)."""
        self.acc.backward(loss)
        self.optimizer.step()
        if self._after_step is not None:
            self._after_step(self)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last = loss.detach()
        self.steps += 1
        self._progress.update(1)

    def result(self) -> LoopResult:
        """The trained model (unwrapped, eval mode), the step count, the last loss."""
        out = self.acc.unwrap_model(self.model)
        out.eval()
        return LoopResult(model=out, steps=self.steps, final_loss=float(self.last),
                          device=device_name(self.acc.device))
