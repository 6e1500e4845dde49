"""Pieces shared by the baseline unlearning methods (retrain, fine-tune, random labels,
NegGrad, Amnesiac, Fisher, SISA).

Every baseline works on a plain classifier *and* on an attached :class:`ERMModel` (whose
STD path ``model(x)`` is the plain network). Nothing here touches the evaluation layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ...data import batch_statistics, first_input, shuffled_loader
from ...errors import UnlearningError
from ...surgery import unwrap
from ...training.optim import Recipe, cosine_schedule
from ...training.precision import refuse_cpu_bfloat16_hazards
from ...unlearning.request import MethodInfo, device_name, frozen_mask

__all__ = ["BaselineInfo", "LoopResult", "sgd_loop"]

#: ``loss_fn(logits, labels) -> scalar loss`` used by :func:`sgd_loop`.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(kw_only=True)
class BaselineInfo(MethodInfo):
    """Fields every baseline reports besides :class:`MethodInfo`'s (its own info adds
    the rest).

    Attributes:
        device: where it ran (``"cpu"``, ``"cuda:0"``...).
        samples: training samples the method's optimisation saw (0 = none).
        epochs: epochs of that optimisation.
    """

    device: str
    samples: int
    epochs: int


@dataclass
class LoopResult:
    """What :func:`sgd_loop` did."""

    model: nn.Module
    steps: int
    final_loss: float
    device: str


def sgd_loop(
    model: nn.Module,
    dataset: Dataset,
    recipe: Recipe,
    *,
    accelerator: Any = None,
    loss_fn: LossFn | None = None,
    desc: str = "fine-tune",
) -> LoopResult:
    """Train ``model`` in place on ``dataset`` with ``recipe`` (by default the recipe of
    :func:`erm_surgery.train`'s STD epochs: SGD, nesterov momentum, weight decay, cosine
    schedule to 0 over the run, seeded shuffle) on Accelerate, so one or many devices run
    it unchanged.

    An attached model is trained on its STD path with ``G`` frozen. ``loss_fn(logits, y)``
    replaces cross-entropy (random labels, NegGrad). Returns the unwrapped model.
    """
    from tqdm.auto import tqdm

    from ...training import make_accelerator

    if len(dataset) < 2 and batch_statistics(model):  # type: ignore[arg-type]
        raise UnlearningError(
            f"{desc}: the data holds {len(dataset)} sample(s) to train on, and the model "  # type: ignore[arg-type]
            "normalises with batch statistics (BatchNorm), which need more than one value "
            "per channel in a training batch; pass more data")
    acc = accelerator or make_accelerator()
    refuse_cpu_bfloat16_hazards(unwrap(model), lambda: first_input(dataset), acc,
                                UnlearningError, desc)
    loader = shuffled_loader(dataset, recipe.batch_size, seed=recipe.seed)
    loss_fn = loss_fn or F.cross_entropy
    total = max(1, len(loader) * recipe.epochs)
    with frozen_mask(model):
        params = [p for p in unwrap(model).parameters() if p.requires_grad]
        if not params:
            raise UnlearningError(
                f"{desc}: no parameter of the model requires grad (requires_grad=False on "
                "all of them, e.g. a frozen backbone and head), so there is nothing to "
                "train; unfreeze the layers to update (p.requires_grad_(True)) first")
        opt = recipe.build_optimizer(params)
        sched = cosine_schedule(opt, total)
        wrapped, opt, loader, sched = acc.prepare(model, opt, loader, sched)
        wrapped.train()
        progress = tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True,
                        disable=not (recipe.show_progress and acc.is_main_process))
        last = torch.zeros(())
        steps = 0
        for _ in range(recipe.epochs):
            for x, y in loader:
                loss = loss_fn(wrapped(x), y)
                acc.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                last = loss.detach()
                steps += 1
                progress.update(1)
        progress.close()
    out = acc.unwrap_model(wrapped)
    out.eval()
    return LoopResult(model=out, steps=steps, final_loss=float(last),
                      device=device_name(acc.device))
