"""What every unlearning method shares: the request checks, the data split, the info
base, re-initialisation and the bookkeeping of forgotten classes.

A method calls :func:`parse_request` first (nothing is changed before it returns), builds
its result from a copy, calls :func:`mark_forgotten` on it and returns an info dataclass
derived from :class:`MethodInfo`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import as_dataset, check_class_ids, check_labels, raw_labels
from ..errors import UnlearningError
from ..surgery import ERMModel, find_classifier, num_classes_of, unwrap

__all__ = ["MethodInfo", "Request", "parse_request", "check_forget_classes",
           "mark_forgotten", "frozen_mask", "reinitialised", "seeded_rng", "device_name",
           "classifier_of", "labels_of", "split_data", "check_separation",
           "entanglement_message"]


@dataclass(kw_only=True)
class MethodInfo:
    """Fields every method reports; each method's info dataclass adds its own.

    Attributes:
        method: registry name.
        forget_classes: the classes forgotten by this request, ascending.
        seconds: wall time of the call (set by the registry).
    """

    method: str
    forget_classes: list[int]
    seconds: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_forget_classes(model: nn.Module, classes: Iterable[int], *,
                         require_attached: bool = True) -> list[int]:
    """Validate an unlearning request; returns the sorted class ids.

    Shared by every method. Errors name the problem: not attached (when the method needs
    ``G``), empty, duplicates, unknown ids, already forgotten, nothing left to keep, or a
    model whose ``G`` or head parameters hold NaN / Inf (a diverged training run).
    """
    if not isinstance(model, nn.Module):
        raise UnlearningError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if require_attached and not isinstance(model, ERMModel):
        raise UnlearningError(
            f"this method needs a model returned by erm_surgery.attach() and trained with "
            f"erm_surgery.train(); got {type(model).__name__}, which was never attached")
    C = num_classes_of(model)
    ids = check_class_ids(classes, C, error=UnlearningError, name="the classes to forget",
                          allow_duplicates=False)
    _check_finite(model, C)
    already = model.erm.forgotten_classes if isinstance(model, ERMModel) else []
    gone = sorted(set(ids) & set(already))
    if gone:
        raise UnlearningError(f"classes {gone} are already forgotten (G rows are zero); "
                              "remove them from the request")
    left = set(range(C)) - set(ids) - set(already)
    if not left:
        raise UnlearningError("the request would forget every class: at least one class "
                              "must remain to transfer knowledge to")
    return sorted(ids)


@torch.no_grad()
def _check_finite(model: nn.Module, num_classes: int) -> None:
    """Refuse a model whose ``G`` or head holds NaN / Inf: the channels to prohibit and the
    head FKT copies would be meaningless (a NaN row of ``G`` prohibits no channel)."""
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(model, ERMModel):
        tensors["G"] = model.erm.G
        modules = dict(model.model.named_modules())
        for name in model.surgery.head_modules:
            if name in modules:  # a method's fx edit may have renamed a head module
                for key, p in modules[name].named_parameters():
                    tensors[f"{name}.{key}"] = p
    else:
        found = find_classifier(unwrap(model), num_classes)
        if found is not None:
            tensors.update({f"{found[0]}.{k}": p for k, p in found[1].named_parameters()})
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise UnlearningError(
            f"the model holds NaN or Inf values in {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}: its training diverged (non-finite inputs, a "
            "too high or non-finite lr, an fp16 loss scale). Unlearning it would give a "
            "meaningless result; retrain or load a finite checkpoint first")


def labels_of(data: Dataset | DataLoader, num_classes: int) -> torch.Tensor:
    """Labels of ``data`` (1-D int64), or an :class:`UnlearningError` saying what is wrong:
    no labels, empty, or labels that are not class ids ``0..num_classes - 1``
    (:func:`erm_surgery.data.check_labels`: float labels are refused, never truncated; an
    ``(N, 1)`` column is read as ``N`` labels)."""
    try:
        labels = raw_labels(data)
    except (ValueError, TypeError, RuntimeError) as err:
        raise UnlearningError(f"the data has no labels: {err}") from err
    assert labels is not None  # decode=True iterates a dataset without fast labels
    if labels.numel() == 0:
        raise UnlearningError("the data is empty")
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels.reshape(-1)
    return check_labels(labels, num_classes, error=UnlearningError, name="the data's labels")


@dataclass
class Request:
    """A validated unlearning request: the classes, and the data split by label.

    ``retain_idx`` excludes the forget classes *and* classes an earlier request forgot:
    those samples must not be learned again.
    """

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
                  require_attached: bool = False, need_retain: bool = True,
                  need_forget: bool = False) -> Request:
    """Validate a request (:func:`check_forget_classes`) and split its data
    (:func:`split_data`); what every method calls first. Errors are
    :class:`UnlearningError`; nothing is changed before it returns."""
    forget = check_forget_classes(model, classes, require_attached=require_attached)
    return split_data(model, forget, data, need_retain=need_retain, need_forget=need_forget)


def split_data(model: nn.Module, forget: list[int], data: Dataset | DataLoader, *,
               need_retain: bool = True, need_forget: bool = False) -> Request:
    """Split ``data`` by label for already validated ``forget`` ids.

    Labels come without decoding images where the dataset exposes them. Errors
    (:class:`UnlearningError`): not a dataset, no labels, empty, labels out of range, no
    sample of the classes to keep (``need_retain``) or of the forget classes
    (``need_forget``, for methods that learn from them).
    """
    try:
        dataset = as_dataset(data)
    except TypeError as err:
        raise UnlearningError(str(err)) from err
    num_classes = num_classes_of(model)
    labels = labels_of(data, num_classes)
    gone = model.erm.forgotten_classes if isinstance(model, ERMModel) else []
    is_forget = torch.isin(labels, torch.as_tensor(list(forget), dtype=torch.long))
    is_gone = torch.isin(labels, torch.as_tensor(gone, dtype=torch.long))
    retain_idx = torch.nonzero(~is_forget & ~is_gone).flatten().tolist()
    forget_idx = torch.nonzero(is_forget).flatten().tolist()
    if need_retain and not retain_idx:
        raise UnlearningError("the data has no samples of the classes to keep")
    if need_forget and not forget_idx:
        raise UnlearningError(f"the data has no samples of the forget classes {list(forget)}: "
                              "this method learns from them")
    return Request(list(forget), num_classes, dataset, labels, retain_idx, forget_idx)


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block under torch's global RNG seeded with ``seed``, then restore the caller's
    state (CPU and the current CUDA device): a method's result depends on its own seed and
    leaves the caller's random stream where it was."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _reset_all(module: nn.Module) -> None:
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()


def reinitialised(model: nn.Module, seed: int) -> tuple[nn.Module, list[str]]:
    """A deep copy of ``model`` with every module's ``reset_parameters()`` called.

    KTP's fresh student and the baselines' ``retrain`` both start here; plain and attached
    models alike (an attached copy also gets ``G`` back to its uniform 0.5 start, the
    ``attach`` default, with the ``forgotten`` flags kept). The global RNG is left as it was
    (the re-initialisation draws from a forked, seeded one). Returns the copy and the names
    of parameters that no ``reset_parameters`` reached (still the trained values).
    """
    fresh = copy.deepcopy(model)
    with seeded_rng(seed):
        _reset_all(unwrap(fresh))
    if isinstance(fresh, ERMModel):
        with torch.no_grad():
            fresh.erm.G.fill_(0.5)
            fresh.erm.G[fresh.erm.forgotten] = 0
    theirs = dict(unwrap(model).named_parameters())
    same = [name for name, p in unwrap(fresh).named_parameters()
            if p.numel() and torch.equal(p, theirs[name])]
    return fresh, same


#: the share of retain classes that may lose every channel they use before a request is
#: refused as "G has not separated the classes": a few such classes are entanglement
#: (class 04 of the two-digit numbers is drawn with the parts of 40, and its few channels
#: can all lie in 40's row), which the request must not be refused for; most of them (the
#: CLI's 6-epoch ResNet starved every retain class) is a G that never separated.
STARVED_LIMIT = 0.25


def check_separation(G: torch.Tensor, forget: Iterable[int], threshold: float = 0.0,
                     forgotten: Iterable[int] = ()) -> torch.Tensor:
    """The channels a request on ``G`` keeps (``(K,)`` bool), after refusing a ``G`` that
    has not separated the classes, before any work.

    Prohibiting the forget classes' channels (``G[c] > threshold``) must leave channels to
    distil (an untrained ``G``, all 0.5, or an EMA average of one, every entry a little
    above 0, covers every channel) and must leave every retain class at least one of the
    channels it uses (else the student cannot represent that class: the CLI's 6-epoch
    ResNet lost 100% of every retain class's channels and kept 11% retain accuracy). A few
    such classes (at most :data:`STARVED_LIMIT` of the retain classes) are entangled with
    the forget classes rather than a sign of an unseparated ``G``: the request goes on, and
    :func:`entanglement_message` names them.

    Raises:
        UnlearningError: with the reason and the fix.
    """
    forget = list(forget)
    skip = set(forget) | set(forgotten)
    used = G.detach() > threshold
    keep = ~used[forget].any(dim=0)
    fix = ("Train with ERM until the classes separate (train() ends with an ERM health line: "
           "prohibited-class accuracy near 0 and a density well below 1), or, for an EMA / "
           "averaged copy, take G from the trained model (ema.erm.load_state_dict("
           "model.erm.state_dict())) or raise threshold= above the averaging noise")
    if not bool(keep.any()):
        state = ("it has never been trained (every entry is "
                 f"{float(G.flatten()[0]):g})" if bool((G == G.flatten()[0]).all())
                 else f"{int(used.any(dim=0).sum())} of {G.shape[1]} channels are in use")
        raise UnlearningError(
            f"G has not separated the classes: the channels of classes {forget} (G > "
            f"{threshold:g}) cover all {G.shape[1]} channels, so prohibiting them leaves "
            f"nothing to distil ({state}). {fix}. Nothing was changed")
    starved = [r for r in range(G.shape[0])
               if r not in skip and bool(used[r].any()) and not bool((used[r] & keep).any())]
    if starved:
        names = ", ".join(map(str, starved[:5])) + (
            f" and {len(starved) - 5} more" if len(starved) > 5 else "")
        retain = G.shape[0] - len(skip)
        if len(starved) > STARVED_LIMIT * retain:
            raise UnlearningError(
                f"G has not separated the classes: prohibiting the channels of classes "
                f"{forget} removes every channel that class(es) {names} use ({len(starved)} "
                f"of {retain} retain classes), so the student could not represent them. "
                f"{fix}. Nothing was changed")
    return keep


def entanglement_message(forget: Sequence[int], lost: dict[int, float],
                         limit: float) -> str | None:
    """The knowledge-entanglement warning of a request, or None: ``lost`` maps each retain
    class to the fraction of its channels the request prohibits; classes that lose every
    channel are named first (the student cannot represent them), else the worst three
    above ``limit``."""
    starved = sorted(r for r, f in lost.items() if f >= 1.0)
    if starved:
        names = ", ".join(map(str, starved[:5])) + (
            f" and {len(starved) - 5} more" if len(starved) > 5 else "")
        return (f"knowledge entanglement: prohibiting the channels of classes {list(forget)} "
                f"removes every channel that class(es) {names} use ({len(starved)} of "
                f"{len(lost)} retain classes): the student cannot represent them and their "
                "accuracy will fall to about chance (their images share the forget classes' "
                "features). To keep them, raise threshold= so that only the forget classes' "
                "strongest channels are prohibited (then check the forget accuracy), or "
                "forget them too")
    entangled = sorted(((f, r) for r, f in lost.items() if f > limit), reverse=True)
    if not entangled:
        return None
    worst = ", ".join(f"{f:.0%} of class {r}" for f, r in entangled[:3])
    more = f" (worst 3 of {len(entangled)} classes)" if len(entangled) > 3 else ""
    return (f"knowledge entanglement: prohibiting the channels of classes {list(forget)} "
            f"also removes {worst}'s channels{more}; their accuracy may drop. Train longer "
            "with ERM or raise threshold=.")


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
    """``(name inside unwrap(model), module)`` of the final classifier layer, for methods
    that edit or hook the head (:func:`erm_surgery.surgery.find_classifier`: an attached
    model's recorded head, timm's ``get_classifier()``, else the last Linear / 1x1 conv
    with C outputs). An :class:`UnlearningError` when there is none."""
    net = unwrap(model)
    name = model.surgery.head if isinstance(model, ERMModel) else None
    C = num_classes_of(model)
    found = find_classifier(net, C, name=name)
    if found is None:
        raise UnlearningError(f"no classifier found in {type(net).__name__}: no nn.Linear "
                              f"with {C} outputs and no 1x1 Conv2d with {C} output channels")
    return found
