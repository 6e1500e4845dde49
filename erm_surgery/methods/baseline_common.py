"""Pieces shared by the baseline unlearning methods (retrain, fine-tune, random labels,
NegGrad, Amnesiac, Fisher, SISA).

Every baseline works on a plain classifier *and* on an attached :class:`ERMModel` (whose
STD path ``model(x)`` is the plain network). Nothing here touches the evaluation layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import shuffled_loader
from ..errors import UnlearningError
from ..surgery import ERMModel, num_classes_of, unwrap
from ..unlearning import check_forget_classes, labels_of, reinitialised, split_data

__all__ = ["BaselineInfo", "LoopResult", "labels_of", "reinitialised",
           "sgd_loop", "mark_forgotten", "frozen_mask", "check_config", "device_name",
           "classifier_of", "Request", "parse_request",
           ]

#: ``loss_fn(logits, labels) -> scalar loss`` used by :func:`sgd_loop`.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BaselineInfo:
    """Fields every baseline reports (its own info dataclass adds the rest).

    Attributes:
        method: registry name.
        forget_classes: the classes forgotten by this request, ascending.
        seconds: wall time of the unlearning call.
        device: where it ran (``"cpu"``, ``"cuda:0"``...).
        samples: training samples the method's optimisation saw (0 = none).
        epochs: epochs of that optimisation.
    """

    method: str
    forget_classes: list[int]
    seconds: float
    device: str
    samples: int
    epochs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_config(config: Any, cls: type, method: str) -> Any:
    """``config`` or a default ``cls()``; a config of another method is a ``TypeError``
    (``unlearn(..., method="finetune", config=KTPConfig())`` would otherwise be ignored)."""
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise TypeError(f"method {method!r} takes config={cls.__name__}(...), got "
                        f"{type(config).__name__}")
    return config


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


@torch.no_grad()
def mark_forgotten(model: nn.Module, classes: Iterable[int]) -> None:
    """Record forgotten classes on an attached model like KTP's GKT does: their ``G`` rows
    are zeroed and ``erm.forgotten`` set (saved in checkpoints; later requests for the same
    classes are refused). The STD path, which inference uses, is unaffected."""
    if isinstance(model, ERMModel):
        idx = torch.as_tensor(list(classes), dtype=torch.long, device=model.erm.G.device)
        model.erm.forgotten[idx] = True
        model.erm.G[model.erm.forgotten] = 0


@contextlib.contextmanager
def frozen_mask(model: nn.Module) -> Iterator[None]:
    """Freeze ``G`` of an attached model while its weights are optimised on the STD path:
    ``G`` gets no gradient there, and DDP would wait for one."""
    if not isinstance(model, ERMModel):
        yield
        return
    G = model.erm.G
    before = G.requires_grad
    G.requires_grad_(False)
    try:
        yield
    finally:
        G.requires_grad_(before)


def classifier_of(model: nn.Module) -> tuple[str, nn.Module]:
    """``(name in unwrap(model), module)`` of the final classifier layer.

    Attached models know it (``surgery.head``); timm models answer ``get_classifier()``;
    otherwise the last ``nn.Linear`` with ``num_classes`` outputs.
    """
    net = unwrap(model)
    names = {m: n for n, m in net.named_modules()}
    if isinstance(model, ERMModel):
        name = model.surgery.head
        return name, net.get_submodule(name)
    get = getattr(net, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Linear) and head in names:
            return names[head], head
    C = num_classes_of(model)
    linears = [(n, m) for n, m in net.named_modules()
               if isinstance(m, nn.Linear) and m.out_features == C]
    if not linears:
        raise UnlearningError(f"no classifier layer (nn.Linear with {C} outputs) found in "
                              f"{type(net).__name__}")
    return linears[-1]


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
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    seed: int = 0,
    accelerator: Any = None,
    loss_fn: LossFn | None = None,
    show_progress: bool = False,
    desc: str = "fine-tune",
) -> LoopResult:
    """Train ``model`` in place on ``dataset``: the recipe of :func:`erm_surgery.train`'s STD
    epochs (SGD, nesterov momentum, weight decay, cosine schedule to 0 over the run, seeded
    shuffle) on Accelerate, so one or many devices run it unchanged.

    An attached model is trained on its STD path with ``G`` frozen. ``loss_fn(logits, y)``
    replaces cross-entropy (random labels, NegGrad). Returns the unwrapped model.
    """
    from tqdm.auto import tqdm

    from ..training import make_accelerator, make_optimizer

    acc = accelerator or make_accelerator()
    loader = shuffled_loader(dataset, batch_size, seed=seed)
    loss_fn = loss_fn or F.cross_entropy
    total = max(1, len(loader) * epochs)
    with frozen_mask(model):
        params = [p for p in unwrap(model).parameters() if p.requires_grad]
        opt = make_optimizer(torch.optim.SGD, params, lr=lr, momentum=momentum,
                             nesterov=momentum > 0, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
        wrapped, opt, loader, sched = acc.prepare(model, opt, loader, sched)
        wrapped.train()
        progress = tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True,
                        disable=not (show_progress and acc.is_main_process))
        last = torch.zeros(())
        steps = 0
        for _ in range(epochs):
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


@dataclass
class Request:
    """A validated unlearning request: the classes, and the data split by label."""

    forget: list[int]
    num_classes: int
    dataset: Dataset
    labels: torch.Tensor
    retain_idx: list[int]
    forget_idx: list[int]

    @property
    def retain_classes(self) -> list[int]:
        """Classes the model keeps (neither forgotten now nor by an earlier request)."""
        return sorted(set(self.labels[self.retain_idx].tolist())) if self.retain_idx else []

    def retain_set(self) -> Subset:
        return Subset(self.dataset, self.retain_idx)

    def forget_set(self) -> Subset:
        return Subset(self.dataset, self.forget_idx)


def parse_request(model: nn.Module, classes: Iterable[int], data: Dataset | DataLoader, *,
                  need_forget_samples: bool = False) -> Request:
    """Shared validation: the classes (:func:`check_forget_classes`, any model) and the
    data split (:func:`erm_surgery.unlearning.split_data`). Errors are
    :class:`UnlearningError`."""
    forget = check_forget_classes(model, classes, require_attached=False)
    split = split_data(model, forget, data, need_forget=need_forget_samples)
    return Request(forget, num_classes_of(model), split.dataset, split.labels,
                   split.retain_idx, split.forget_idx)
