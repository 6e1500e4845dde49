"""KTP: Knowledge Transfer and Prohibition (ERM-KTP paper, section 4.2-4.3, Algorithms 2-3).

``unlearn(model, classes, data)`` returns a *fresh* student:

- **CKT**: a re-initialised copy of the architecture is trained so that its feature map
  matches the teacher's map times ``Gbar`` (the channels no forget class uses), MSE on the
  map plus MSE on the pooled vector. The teacher runs in eval mode without grad; its
  masked maps are computed once and cached when the data is deterministic.
- **FKT**: the teacher's head is copied; its inputs from prohibited channels are zeroed,
  and the forget classes' rows are zeroed with a bias of ``forget_bias``, so their logit is
  a constant far below any retained logit.
- **Retain labels** (ours, not in the paper; ``label_weight``): the same distillation
  steps also take a cross-entropy on the retain samples' labels through the fixed FKT
  head, so the student's features fit the head that remains after the cut. With Adam this
  closes the retain-accuracy gap of the paper's recipe (benchmarks/results/ktp_recipe.md);
  ``KTPConfig.paper()`` turns it off.
- **GKT**: ``G`` is copied with the forget rows zeroed and ``erm.forgotten`` set, so the
  model itself records which classes are gone (saved in checkpoints).

The teacher object is never modified; ``unlearn_checkpoint`` replaces a checkpoint file
atomically so no copy of the teacher is left behind (Algorithm 3).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .checkpoint import load, read_metadata, save
from .data import as_dataset, get_labels, shuffled_loader
from .errors import UnlearningError
from .surgery import ERMModel, attach, head_roles, num_classes_of, unwrap

__all__ = ["KTPConfig", "UnlearningInfo", "unlearn", "ktp", "unlearn_checkpoint",
           "check_forget_classes", "available_methods", "register_method", "DataSplit",
           "split_data", "labels_of", "reinitialised", "seeded_rng"]


@dataclass
class KTPConfig:
    """Hyperparameters of KTP.

    Attributes:
        threshold: a channel is prohibited when a forget class has ``G[c, k] > threshold``
            (0 = the reference code: any use prohibits; the paper defines only 0 and 1).
        epochs: distillation epochs of the student.
        lr: learning rate of the student (cosine schedule to 0; the reference code's SGD
            used 0.1).
        optimizer: ``"sgd"`` (momentum 0.9, nesterov) or ``"adam"``.
        weight_decay: of the student's optimiser.
        batch_size: distillation batch size.
        distill_on: ``"retain"`` (the student never sees the forget classes, like a
            retrained model) or ``"all"`` (forget samples too, with their prohibited
            channels as zero targets).
        pooled_weight: weight of the MSE on the spatially pooled map (reference code: 1).
        logit_weight: weight of a distillation term on logits: KL divergence between the
            (already prohibited) head applied to the teacher's masked map and to the
            student's map, at ``temperature`` (0 = the paper's feature MSE only).
        temperature: softmax temperature of that term.
        label_weight: weight of a cross-entropy term on the retain samples' labels, through
            the student's prohibited head (0 = the paper's feature MSE only). The forget
            classes' logits are blocked, so this term cannot teach them back.
        train_head: fine-tune the head along with that term. Only the entries FKT keeps
            train: the inputs from prohibited channels and the forget classes' rows stay
            blocked after every step. Off by default: measured, it adds nothing over the
            label term alone (benchmarks/results/ktp_recipe.md).
        cache_teacher: compute the teacher's masked maps once; ``None`` = when the data has
            no random transform (TensorDataset, or no ``transform`` attribute) and one
            process runs.
        forget_bias: bias given to the forget classes' zeroed rows.
        entanglement_warning: warn when a retain class loses more than this fraction of the
            channels it uses (knowledge entanglement).
        seed: seeds the student's re-initialisation and the data order.
        channels_last: NHWC student and inputs (faster convolutions on GPUs with AMP).
        num_workers: DataLoader worker processes for reading and augmenting images (0 =
            in the main process; raise it for image folders with decoding and transforms).
        show_progress: tqdm bar on the main process.
    """

    threshold: float = 0.0
    epochs: int = 2
    lr: float = 0.005
    optimizer: str = "adam"
    weight_decay: float = 5e-4
    batch_size: int = 32
    distill_on: str = "retain"
    pooled_weight: float = 1.0
    logit_weight: float = 0.0
    temperature: float = 4.0
    label_weight: float = 1.0
    train_head: bool = False
    cache_teacher: bool | None = None
    forget_bias: float = -1e4
    entanglement_warning: float = 0.3
    seed: int = 0
    num_workers: int = 0
    channels_last: bool = False
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.distill_on not in ("retain", "all"):
            raise ValueError(f"distill_on must be 'retain' or 'all', got {self.distill_on!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.label_weight < 0 or self.logit_weight < 0:
            raise ValueError("label_weight and logit_weight must be >= 0")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")


    @classmethod
    def paper(cls, **overrides: Any) -> KTPConfig:
        """The reference code's recipe (feature MSE only, fixed FKT head, SGD at lr 0.1),
        for 2 epochs: what this library ran before the retain-label term."""
        fields = dict(epochs=2, lr=0.1, optimizer="sgd", label_weight=0.0, train_head=False)
        return cls(**{**fields, **overrides})


@dataclass
class UnlearningInfo:
    """What one unlearning request did (also kept on the student as ``unlearning_info``)."""

    method: str
    forget_classes: list[int]
    threshold: float
    prohibited_channels: int
    num_channels: int
    channels_per_forget_class: dict[int, int]
    retain_channels_lost: dict[int, float]
    distill_on: str
    epochs: int
    samples: int
    final_mse: float
    seconds: float
    not_reinitialised: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # the recipe, for the record

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------- validation


def check_forget_classes(model: nn.Module, classes: Iterable[int], *,
                         require_attached: bool = True) -> list[int]:
    """Validate an unlearning request; returns the sorted class ids.

    Shared by every method. Errors name the problem: not attached (when the method needs
    ``G``), empty, duplicates, unknown ids, already forgotten, or nothing left to keep.
    """
    if not isinstance(model, nn.Module):
        raise UnlearningError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if require_attached and not isinstance(model, ERMModel):
        raise UnlearningError(
            f"this method needs a model returned by erm_surgery.attach() and trained with "
            f"erm_surgery.train(); got {type(model).__name__}, which was never attached")
    if isinstance(classes, int):
        classes = [classes]
    ids = list(classes)
    if not ids:
        raise UnlearningError("no classes to forget: pass a non-empty list of class ids")
    if any(isinstance(c, bool) or not isinstance(c, (int, torch.Tensor)) for c in ids):
        raise UnlearningError(f"class ids must be integers, got {ids}")
    ids = [int(c) for c in ids]
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise UnlearningError(f"duplicate class ids {dupes}: pass each class once")
    C = num_classes_of(model)
    already = model.erm.forgotten_classes if isinstance(model, ERMModel) else []
    bad = [c for c in ids if not 0 <= c < C]
    if bad:
        raise UnlearningError(f"unknown class ids {bad}: the model has classes 0..{C - 1}")
    gone = sorted(set(ids) & set(already))
    if gone:
        raise UnlearningError(f"classes {gone} are already forgotten (G rows are zero); "
                              "remove them from the request")
    left = set(range(C)) - set(ids) - set(already)
    if not left:
        raise UnlearningError("the request would forget every class: at least one class "
                              "must remain to transfer knowledge to")
    return sorted(ids)


@dataclass
class DataSplit:
    """The data of a request, split by label (indices into ``dataset``).

    ``retain_idx`` excludes the forget classes *and* classes an earlier request forgot:
    those samples must not be learned again.
    """

    dataset: Dataset
    labels: torch.Tensor
    retain_idx: list[int]
    forget_idx: list[int]


def labels_of(data: Dataset | DataLoader, num_classes: int) -> torch.Tensor:
    """Labels of ``data`` (1-D int64), or an :class:`UnlearningError` saying what is wrong."""
    try:
        labels = get_labels(data)
    except (ValueError, TypeError) as err:
        raise UnlearningError(f"the data has no labels: {err}") from err
    if labels.numel() == 0:
        raise UnlearningError("the data is empty")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise UnlearningError(f"the data has labels outside 0..{num_classes - 1}")
    return labels


def split_data(model: nn.Module, forget: Sequence[int], data: Dataset | DataLoader, *,
               need_retain: bool = True, need_forget: bool = False) -> DataSplit:
    """Split ``data`` for a validated request; shared by every method.

    Labels come without decoding images where the dataset exposes them. Errors
    (:class:`UnlearningError`): not a dataset, no labels, empty, labels out of range, no
    sample of the classes to keep (``need_retain``) or of the forget classes
    (``need_forget``, for methods that learn from them).
    """
    try:
        dataset = as_dataset(data)
    except TypeError as err:
        raise UnlearningError(str(err)) from err
    labels = labels_of(data, num_classes_of(model))
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
    return DataSplit(dataset, labels, retain_idx, forget_idx)


# ----------------------------------------------------------------------- the pieces


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


def _fresh_student(teacher: ERMModel, student: nn.Module | None,
                   seed: int) -> tuple[ERMModel, list[str]]:
    """A re-initialised model of the teacher's architecture, attached at the same place."""
    if student is not None:
        s = attach(student, feature_node=teacher.surgery.feature_node,
                   head=teacher.surgery.head)
        if (s.surgery.num_classes, s.surgery.num_channels) != (
                teacher.surgery.num_classes, teacher.surgery.num_channels):
            raise UnlearningError("student= must have the teacher's architecture and class "
                                  "count")
        s.to(teacher.erm.G.device)
        return s, []
    return reinitialised(teacher, seed)


def _head_layers(model: ERMModel) -> list[tuple[str, nn.Module]]:
    return [(name, model.model.get_submodule(name)) for name in model.surgery.head_modules]


@dataclass
class _Blocked:
    """Entries of one head parameter that FKT fixes: ``param = param * open + fill``."""

    param: torch.Tensor
    open: torch.Tensor  # 1 where the entry may train, 0 where it is blocked
    fill: torch.Tensor  # the blocked entries' value (0, or forget_bias for logits)

    @torch.no_grad()
    def apply(self) -> None:
        if self.open.device != self.param.device:  # the model moved (accelerator.prepare)
            self.open, self.fill = self.open.to(self.param.device), self.fill.to(
                self.param.device)
        self.param.mul_(self.open).add_(self.fill)


def _block(param: torch.Tensor, blocked: torch.Tensor, value: float = 0.0) -> _Blocked:
    open_ = (~blocked).to(param.dtype)
    return _Blocked(param, open_, (1 - open_) * value)


@torch.no_grad()
def _input_channels(model: ERMModel, layer: nn.Module) -> torch.Tensor | None:
    """The feature-map channel behind each input of a Linear head layer, or None.

    Found by sending a map whose channel ``k`` holds the value ``k + 1`` everywhere through
    the head: pooling, flattening and concatenation (timm's ``catavgmax``: ``[avg, max]``,
    channel-major flattening: ``(K, H, W)``) keep the values, so the layer's input names
    its channels. Anything that changes values (a norm) gives None.
    """
    K, shape = model.surgery.num_channels, model.surgery.feature_shape
    if not model.has_head_graph or not shape:
        return None
    view = [1] * (len(shape) + 1)
    view[model.surgery.channel_dim] = K
    weight = layer.weight
    probe = torch.arange(1, K + 1, dtype=weight.dtype, device=weight.device).view(view)
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    was_training = model.training
    model.eval()
    try:
        model.forward_head(probe.expand(1, *shape))
    except Exception:  # any failure means: fall back to the layout rule
        return None
    finally:
        handle.remove()
        model.train(was_training)
    if len(seen) != 1 or seen[0].numel() != weight.shape[1]:
        return None
    values = seen[0].reshape(-1).float()
    ids = values.round()
    if not torch.allclose(values, ids, atol=1e-3) or ids.min() < 1 or ids.max() > K:
        return None
    return ids.long() - 1


@torch.no_grad()
def _transfer_head(teacher: ERMModel, student: ERMModel, keep: torch.Tensor,
                   forget: Sequence[int], forget_bias: float) -> list[_Blocked]:
    """FKT: copy the head, cut its inputs from prohibited channels, block forget rows.

    Returns what was blocked, so that a head trained afterwards can be kept blocked.
    Inputs the teacher's head already ignores (channels an earlier request prohibited)
    and classes it already blocks stay blocked too.
    """
    for (_, t_mod), (_, s_mod) in zip(_head_layers(teacher), _head_layers(student),
                                         strict=True):
        s_mod.load_state_dict(t_mod.state_dict())
    K = teacher.surgery.num_channels
    C = teacher.surgery.num_classes
    drop = ~keep
    readers, classifiers = head_roles(student)
    if not readers or not classifiers:  # a head fx saw as functional ops: the named head
        readers = readers or [student.surgery.head]
        classifiers = classifiers or [student.surgery.head]
    blocked: list[_Blocked] = []
    for name, mod in _head_layers(student):
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        b = getattr(mod, "bias", None)
        if w.dim() == 1 and w.numel() == K:  # per-channel affine (a norm in the head)
            cut = drop.to(w.device) | ((w == 0) & (b == 0 if b is not None else True))
            blocked.append(_block(w, cut))
            if b is not None:
                blocked.append(_block(b, cut))
            continue
        if name not in readers:
            continue
        in_features = w.shape[1] if w.dim() >= 2 else None
        channels = (_input_channels(student, mod)
                    if w.dim() == 2 and in_features not in (None, K) else None)
        if channels is not None:  # a Linear on pooled, flattened or concatenated maps
            cut = drop.to(w.device)[channels] | (w == 0).all(0)
            blocked.append(_block(w, cut.view(1, -1).expand_as(w)))
        elif in_features is not None and in_features % K == 0:  # Linear(K, .), Conv(K, ...)
            per_channel = w.view(w.shape[0], K, -1)  # or a Linear on flattened (K, H, W)
            cut = drop.to(w.device) | (per_channel == 0).all(2).all(0)
            blocked.append(_block(w, cut.view(1, K, 1).expand_as(per_channel).reshape(
                w.shape)))
    idx = torch.as_tensor(list(forget), dtype=torch.long)
    for name in classifiers:  # every layer that writes logits: parallel heads included
        classifier = student.model.get_submodule(name)
        if classifier.weight.shape[0] != C:
            raise UnlearningError(
                f"head layer {name!r} writes the logits but has {classifier.weight.shape[0]} "
                f"outputs, not {C}; FKT cannot block the forget classes there")
        w, b = classifier.weight, getattr(classifier, "bias", None)
        rows = torch.zeros(C, dtype=torch.bool, device=w.device)
        rows[idx.to(w.device)] = True
        if b is not None:  # classes an earlier request blocked
            rows |= (b == forget_bias) & (w.view(C, -1) == 0).all(1)
        shape = (C,) + (1,) * (w.dim() - 1)
        blocked.append(_block(w, rows.view(shape).expand_as(w)))
        if b is not None:
            blocked.append(_block(b, rows, forget_bias))
    for block in blocked:
        block.apply()
    return blocked


def _entanglement(G: torch.Tensor, forget: Sequence[int], keep: torch.Tensor,
                  threshold: float, forgotten: Sequence[int]) -> tuple[dict, dict]:
    used = G > threshold
    per_forget = {c: int(used[c].sum()) for c in forget}
    lost = {}
    for r in range(G.shape[0]):
        if r in forget or r in forgotten:
            continue
        own = used[r]
        lost[r] = float((own & ~keep).sum() / own.sum().clamp_min(1))
    return per_forget, lost


class _Indexed(Dataset):
    """Yields ``(x, index)`` so cached teacher targets can be looked up per sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.dataset[i][0], i


def _deterministic(dataset: Dataset) -> bool:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, TensorDataset) or getattr(dataset, "transform", None) is None


def _distill_loss(out: torch.Tensor, target: torch.Tensor, channel_dim: int,
                  pooled_weight: float) -> torch.Tensor:
    spatial = [d for d in (1, 2, 3) if d != channel_dim]
    loss = F.mse_loss(out, target)
    if pooled_weight:
        loss = loss + pooled_weight * F.mse_loss(out.mean(spatial), target.mean(spatial))
    return loss


def _retain_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the samples with a label (-100 = none); 0 for a batch without."""
    loss = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    return loss / (labels != -100).sum().clamp_min(1)


# ----------------------------------------------------------------------- KTP


def ktp(
    model: ERMModel,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: KTPConfig | None = None,
    accelerator: Any = None,
    student: nn.Module | None = None,
) -> tuple[ERMModel, UnlearningInfo]:
    """Knowledge Transfer and Prohibition; returns ``(student, info)``. See :func:`unlearn`.

    Runs under its own random state seeded with ``config.seed`` (the student's
    initialisation, data order, dropout), so the result does not depend on, and does not
    advance, the caller's global torch RNG.
    """
    config = config or KTPConfig()
    if not isinstance(config, KTPConfig):
        raise TypeError(f"ktp() takes config=KTPConfig(...), got {type(config).__name__}")
    with seeded_rng(config.seed):
        return _ktp(model, classes, data, config, accelerator, student)


def _ktp(model: ERMModel, classes: Iterable[int], data: Dataset | DataLoader,
         config: KTPConfig, accelerator: Any, student: nn.Module | None,
         ) -> tuple[ERMModel, UnlearningInfo]:
    from tqdm.auto import tqdm

    from .training import make_accelerator, make_optimizer

    forget = check_forget_classes(model, classes)
    if config.logit_weight and not model.has_head_graph:
        raise UnlearningError("logit_weight needs a head that reads only the feature map; "
                              "this model's head reads other tensors too. Use "
                              "logit_weight=0")
    label_weight = config.label_weight
    if label_weight and not model.has_head_graph:
        warnings.warn("KTP: this model's head is not a function of the feature map alone "
                      "(it reads other tensors), so the retain-label term (label_weight) "
                      "is skipped; only the feature distillation runs", stacklevel=4)
        label_weight = 0.0
    start = time.perf_counter()
    acc = accelerator or make_accelerator()
    teacher = model
    device = acc.device

    split = split_data(teacher, forget, data)
    dataset = split.dataset
    idx = split.retain_idx if config.distill_on == "retain" else list(range(len(split.labels)))
    distill_set = Subset(dataset, idx)

    G = teacher.erm.G.detach()
    keep = teacher.erm.keep_mask(forget, config.threshold)
    per_forget, lost = _entanglement(G, forget, keep, config.threshold,
                                     teacher.erm.forgotten_classes)
    entangled = {r: f for r, f in lost.items() if f > config.entanglement_warning}
    if entangled:
        warnings.warn(
            f"knowledge entanglement: prohibiting the channels of classes {forget} also "
            f"removes {', '.join(f'{f:.0%} of class {r}' for r, f in entangled.items())}'s "
            "channels; their accuracy may drop. Train longer with ERM or raise threshold=.",
            stacklevel=4)  # the caller of unlearn()

    s, same = _fresh_student(teacher, student, config.seed)
    s.train()
    teacher_mode = teacher.training
    teacher_device = teacher.erm.G.device
    teacher.eval()
    teacher.to(device)  # moved back below: the caller's model is not changed
    keep_f = keep.to(device=device, dtype=torch.float32)
    cd = teacher.surgery.channel_dim
    shape = [1, 1, 1, 1]
    shape[cd] = keep.numel()
    keep_map = keep_f.view(shape)

    # FKT first: the prohibited head feeds the label and logit terms during distillation
    blocked = _transfer_head(teacher, s, keep.to(s.erm.G.device), forget, config.forget_bias)
    head_terms = bool(label_weight or config.logit_weight)
    # the head trains only when a term reaches it; otherwise DDP would wait for its grads
    train_head = config.train_head and head_terms
    head_params = {id(p) for _, m in _head_layers(s) for p in m.parameters()}
    frozen = [p for p in s.parameters()
              if p is s.erm.G or (id(p) in head_params and not train_head)]
    if label_weight:
        labels = torch.full_like(split.labels, -100)  # forget samples never meet a label
        labels[split.retain_idx] = split.labels[split.retain_idx]
        distill_labels = labels[torch.as_tensor(idx, dtype=torch.long)].to(device)
    for p in frozen:  # unused by the distillation: DDP must not wait for their gradients
        p.requires_grad_(False)
    params = [p for p in s.model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        opt = make_optimizer(torch.optim.Adam, params, lr=config.lr,
                             weight_decay=config.weight_decay)
    else:
        opt = make_optimizer(torch.optim.SGD, params, lr=config.lr, momentum=0.9,
                             nesterov=True, weight_decay=config.weight_decay)
    loader = shuffled_loader(_Indexed(distill_set), config.batch_size, seed=config.seed,
                             num_workers=config.num_workers)
    total = max(1, len(loader) * config.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))

    cache = config.cache_teacher
    if cache is None:
        cache = acc.num_processes == 1 and _deterministic(dataset)
    targets: torch.Tensor | None = None
    bar_total = total + (math.ceil(len(distill_set) / (2 * config.batch_size)) if cache else 0)
    progress = tqdm(total=bar_total, desc="KTP", unit="batch", dynamic_ncols=True,
                    disable=not (config.show_progress and acc.is_main_process))
    with torch.no_grad():
        if cache:  # one teacher pass, in dataset order
            progress.set_description("KTP teacher pass")
            parts = []
            for x, _ in DataLoader(distill_set, batch_size=2 * config.batch_size,
                                   num_workers=config.num_workers):
                parts.append(teacher.forward_features(x.to(device)) * keep_map)
                progress.update(1)
            targets = torch.cat(parts)

    if config.channels_last:
        s.to(memory_format=torch.channels_last)
    wrapped, opt, loader, sched = acc.prepare(s, opt, loader, sched)
    last = torch.zeros((), device=device)
    progress.set_description("KTP distillation")
    for _ in range(config.epochs):
        for x, i in loader:
            if config.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            if targets is not None:
                target = targets[i.to(targets.device)]
            else:
                with torch.no_grad():
                    target = teacher.forward_features(x) * keep_map
            if head_terms:  # features and logits from one pass, through DDP's forward
                out, logits = wrapped(x, return_features="both")
            else:
                out = wrapped(x, return_features=True)
            target = target.to(out.dtype)
            distill = _distill_loss(out, target, cd, config.pooled_weight)
            loss = distill
            if label_weight:
                y = distill_labels[i.to(device)]
                loss = loss + label_weight * _retain_label_loss(logits, y)
            if config.logit_weight:
                head = acc.unwrap_model(wrapped).forward_head
                with torch.no_grad():
                    soft = F.softmax(head(target) / config.temperature, dim=1)
                log_p = F.log_softmax(logits / config.temperature, dim=1)
                loss = loss + config.logit_weight * config.temperature ** 2 * F.kl_div(
                    log_p, soft, reduction="batchmean")
            acc.backward(loss)
            opt.step()
            if train_head:  # weight decay and momentum must not reopen what FKT blocked
                for block in blocked:
                    block.apply()
            sched.step()
            opt.zero_grad(set_to_none=True)
            last = distill.detach()
            progress.update(1)
    progress.close()
    teacher.train(teacher_mode)
    teacher.to(teacher_device)

    s = acc.unwrap_model(wrapped)
    for p in frozen:
        p.requires_grad_(True)
    with torch.no_grad():  # GKT
        s.erm.G.copy_(teacher.erm.G)
        s.erm.forgotten.copy_(teacher.erm.forgotten)
        s.erm.forgotten[forget] = True
        s.erm.G[s.erm.forgotten] = 0
    s.eval()
    info = UnlearningInfo(
        method="ktp", forget_classes=forget, threshold=config.threshold,
        prohibited_channels=int((~keep).sum()), num_channels=keep.numel(),
        channels_per_forget_class=per_forget, retain_channels_lost=lost,
        distill_on=config.distill_on, epochs=config.epochs, samples=len(distill_set),
        final_mse=float(last), seconds=time.perf_counter() - start,
        not_reinitialised=same,
        config={k: v for k, v in asdict(config).items()
                if k not in ("show_progress", "num_workers")})
    s.__dict__["unlearning_info"] = info
    return s, info


# ----------------------------------------------------------------------- registry

_METHODS: dict[str, Callable[..., tuple[ERMModel, UnlearningInfo]]] = {"ktp": ktp}


def register_method(name: str, fn: Callable[..., tuple[nn.Module, Any]]) -> None:
    """Add an unlearning method: ``fn(model, classes, data, *, config, accelerator, ...)``
    returning ``(unlearned_model, info)``."""
    if name in _METHODS:
        raise ValueError(f"an unlearning method named {name!r} is already registered")
    _METHODS[name] = fn


def available_methods() -> list[str]:
    """Names accepted by ``unlearn(..., method=)``."""
    return sorted(_METHODS)


def unlearn(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    method: str = "ktp",
    config: Any = None,
    accelerator: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Forget ``classes``: returns a new model; ``model`` (the teacher) is not modified.

    Args:
        model: an attached model trained with :func:`erm_surgery.train`.
        classes: class ids to forget (a list, or one int).
        data: the training data (Dataset or DataLoader of ``(image, label)``); it is split
            by label here (fast through ``.targets`` / ``TensorDataset`` labels).
        method: a name from :func:`available_methods` (default ``"ktp"``).
        config: the method's config dataclass (:class:`KTPConfig` for KTP).
        accelerator: an ``accelerate.Accelerator`` (default: GPUs if any, else CPU).
        **kwargs: passed to the method (KTP: ``student=`` a plain model of the same
            architecture to use as the fresh student's initialisation).

    The returned model is attached, so it can be trained or asked to forget again:
    ``unlearn(unlearn(m, [1], d), [2], d)`` forgets both. ``student.unlearning_info`` holds an
    :class:`UnlearningInfo` (channels removed, retain-class entanglement, timing).
    """
    if method not in _METHODS:
        raise ValueError(f"unknown unlearning method {method!r}; available: "
                         f"{available_methods()}")
    student, _ = _METHODS[method](model, classes, data, config=config,
                                  accelerator=accelerator, **kwargs)
    return student


def unlearn_checkpoint(
    path: str | os.PathLike,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    base_model: nn.Module,
    **kwargs: Any,
) -> Any:
    """Algorithm 3 on a file: load, unlearn, and atomically replace the checkpoint.

    The new checkpoint is written to a temp file and renamed over ``path``, so no copy of
    the teacher is left behind and a crash leaves the old file whole. Returns the method's
    info (an :class:`UnlearningInfo` for KTP). Methods whose result ``erm_surgery.load``
    cannot rebuild (ESC inserts projection modules) are refused before the file is touched.
    """
    extra = dict(read_metadata(path).get("extra") or {})
    teacher = load(path, base_model)
    student = unlearn(teacher, classes, data, **kwargs)
    added = [] if not isinstance(student, ERMModel) else sorted(
        set(student.model.state_dict()) - set(teacher.model.state_dict()))
    if not isinstance(student, ERMModel) or added:
        raise UnlearningError(
            f"method {kwargs.get('method', 'ktp')!r} returns a model that erm_surgery.load() "
            f"cannot rebuild from the base model (new tensors {added[:3]}); {path} was left "
            "as it was. Unlearn in memory and save the result with torch.save, or use ktp")
    del teacher
    info = student.__dict__["unlearning_info"]
    # keep what the file already recorded (training history...); the newest request is
    # ``unlearning``, every request so far is listed in ``unlearning_history``
    extra["unlearning_history"] = [*extra.get("unlearning_history", []), info.to_dict()]
    extra["unlearning"] = info.to_dict()
    save(student, Path(path), extra=extra)
    return info
