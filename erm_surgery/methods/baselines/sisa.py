"""SISA: Sharded, Isolated, Sliced, Aggregated training and exact unlearning.

Bourtoule, Chandrasekaran, Choquette-Choo, Jia, Travers, Zhang, Lie and Papernot,
"Machine Unlearning", IEEE S&P 2021. The training set is split into ``shards`` disjoint
parts; one model per shard is trained in isolation, its shard fed in ``slices`` cumulative
stages with a checkpoint after each. At inference the shard models' softmax outputs are
averaged. Unlearning a sample retrains only the shard that held it, from the checkpoint
before the first slice that held it.

For *class* unlearning this saving disappears: the shards are random, so every shard holds
samples of every class, usually in its first slice, and every shard is retrained from
scratch (the ERM-KTP paper, section 5.4: "we need to retrain all shards"). The cost is then
that of training the ensemble again, about one retraining. :class:`SISAInfo` reports how
many shards and slices were retrained. The ensemble's accuracy is also lower than one
model's trained on all data (each shard model sees ``1 / shards`` of it).

::

    ensemble = train_sisa(model, train_set, SISAConfig(shards=4, slices=4), epochs=10)
    ensemble(x)                       # log of the mean of the shard models' softmax
    unlearned = erm_surgery.unlearn(ensemble, [3], train_set, method="sisa")
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ...data import as_dataset
from ...errors import UnlearningError
from ...surgery import num_classes_of, unwrap
from ...training.optim import Recipe
from ...unlearning.registry import register_method, resolve_config
from ...unlearning.request import check_forget_classes, labels_of, reinitialised
from .common import BaselineInfo, sgd_loop

__all__ = ["SISAConfig", "SISAEnsemble", "SISAInfo", "train_sisa", "sisa"]


@dataclass
class SISAConfig:
    """How a SISA ensemble is trained (and retrained when unlearning).

    Attributes:
        shards: disjoint parts of the data, one model each.
        slices: cumulative stages per shard: stage ``r`` trains on slices ``1..r`` and is
            checkpointed. Each stage runs ``max(1, round(2 * epochs / (slices + 1)))``
            epochs, so a shard's model sees about ``epochs`` passes over its data in total
            (Bourtoule et al. section V-B keep the budget the same way).
        batch_size: minibatch size.
        lr: SGD learning rate (nesterov momentum 0.9, cosine to 0 within each stage).
        weight_decay: SGD weight decay.
        keep_checkpoints: keep each shard's state after every stage (CPU memory:
            ``shards * slices`` copies of the model) so that unlearning can restart from
            the last stage before the forget samples; False = always retrain a touched
            shard from scratch.
        seed: the sharding, the re-initialisations and the data order.
        show_progress: tqdm bars on the main process.
    """

    shards: int = 4
    slices: int = 4
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    keep_checkpoints: bool = True
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.shards < 1 or self.slices < 1:
            raise ValueError(f"shards and slices must be >= 1, got {self.shards}, "
                             f"{self.slices}")
        if self.batch_size < 1 or not self.lr > 0:
            raise ValueError("batch_size must be >= 1 and lr > 0")

    def stage_epochs(self, epochs: int) -> int:
        """Epochs of each cumulative stage for a budget of ``epochs`` per shard."""
        return max(1, round(2 * epochs / (self.slices + 1)))


class SISAEnsemble(nn.Module):
    """The shard models of a SISA run, averaged at inference.

    ``forward(x)`` returns the log of the mean of the shard models' softmax (so argmax,
    cross-entropy and every logit-based metric work unchanged: ``log_softmax`` of it is
    itself); :meth:`predict_proba` returns the mean softmax. ``plan[s][r]`` holds the
    dataset indices of slice ``r`` of shard ``s``; the forget classes' samples are removed
    from it by unlearning, and ``forgotten_classes`` lists them.
    """

    def __init__(self, shards: list[nn.Module], plan: list[list[list[int]]],
                 labels: torch.Tensor, config: SISAConfig, epochs: int,
                 checkpoints: list[list[dict[str, torch.Tensor]]] | None = None) -> None:
        super().__init__()
        self.shards = nn.ModuleList(shards)
        self.num_classes = num_classes_of(shards[0])
        self.plan = plan
        self.labels = labels
        self.config = config
        self.epochs = epochs
        self.checkpoints = checkpoints or [[] for _ in shards]
        self.forgotten_classes: list[int] = []

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the shard models' softmax, ``(N, C)``."""
        return torch.stack([F.softmax(m(x).float(), dim=-1) for m in self.shards]).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # clamped so a class every shard gives probability 0 still has a finite loss
        return self.predict_proba(x).clamp_min(1e-12).log()

    def extra_repr(self) -> str:
        return f"shards={len(self.shards)}, slices={self.config.slices}"


@dataclass(kw_only=True)
class SISAInfo(BaselineInfo):
    """What one SISA unlearning request did.

    Attributes (besides :class:`BaselineInfo`'s; ``samples``: training samples left in
    the retrained shards, ``epochs``: epochs of each retrained stage):
        shards: shards in the ensemble.
        shards_retrained: shards that held forget samples and were retrained.
        restart_slices: per shard, the stage it restarted from (0 = from scratch, ``r`` =
            from the checkpoint after stage ``r``; None = untouched).
        stages_retrained: cumulative stages trained again, over all shards.
        notes: what the run noticed (e.g. every shard retrained from scratch).
    """

    shards: int
    shards_retrained: int
    restart_slices: list[int | None]
    stages_retrained: int
    notes: list[str] = field(default_factory=list)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _train_shard(model: nn.Module, dataset: Dataset, slices: list[list[int]], start: int,
                 cfg: SISAConfig, epochs: int, accelerator: Any, shard: int,
                 checkpoints: list[dict[str, torch.Tensor]]) -> tuple[nn.Module, str, int]:
    """Train stages ``start+1 .. R`` of one shard; returns (model, device, stages run)."""
    device = "cpu"
    stages = 0
    per_stage = cfg.stage_epochs(epochs)
    for r in range(start, len(slices)):
        seen = [i for part in slices[: r + 1] for i in part]
        if not seen:  # every sample so far was forgotten: nothing to learn yet
            if cfg.keep_checkpoints:
                checkpoints.append(_state(model))
            continue
        recipe = Recipe(epochs=per_stage, lr=cfg.lr, batch_size=cfg.batch_size,
                        weight_decay=cfg.weight_decay, seed=cfg.seed * 1009 + shard * 31 + r,
                        show_progress=cfg.show_progress)
        loop = sgd_loop(model, Subset(dataset, seen), recipe, accelerator=accelerator,
                        desc=f"SISA shard {shard + 1} stage {r + 1}/{len(slices)}")
        model, device = loop.model, loop.device
        stages += 1
        if cfg.keep_checkpoints:
            checkpoints.append(_state(model))
    return model, device, stages


def train_sisa(model: nn.Module, data: Dataset | DataLoader, config: SISAConfig | None = None,
               *, epochs: int, accelerator: Any = None) -> SISAEnsemble:
    """Train a SISA ensemble of ``config.shards`` re-initialised copies of ``model``.

    ``model`` gives the architecture (an attached model's plain network is used; the
    ensemble members are plain models trained with the STD recipe). ``epochs`` is the
    budget per shard model (see :class:`SISAConfig`). Cost: about one training run of
    ``model`` on ``data`` (each shard model sees ``1 / shards`` of it), plus the stage
    checkpoints in CPU memory.
    """
    cfg = resolve_config(SISAConfig, config, {}, method="sisa")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    net = unwrap(model)
    C = num_classes_of(model)
    dataset = as_dataset(data)
    labels = labels_of(dataset, C)
    n = len(labels)
    if n < cfg.shards * cfg.slices:
        raise ValueError(f"{n} samples cannot fill {cfg.shards} shards x {cfg.slices} slices")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    plan = []
    for s in range(cfg.shards):
        shard = perm[s::cfg.shards]
        plan.append([sorted(shard[r::cfg.slices]) for r in range(cfg.slices)])
    members, checkpoints = [], []
    for s in range(cfg.shards):
        fresh, _ = reinitialised(net, cfg.seed * 1009 + s)
        ckpts: list[dict[str, torch.Tensor]] = []
        fresh, _, _ = _train_shard(fresh, dataset, plan[s], 0, cfg, epochs, accelerator, s,
                                   ckpts)
        members.append(fresh)
        checkpoints.append(ckpts)
    ensemble = SISAEnsemble(members, plan, labels, cfg, epochs, checkpoints)
    return ensemble.eval()


def _training_config(model: nn.Module) -> SISAConfig:
    return model.config if isinstance(model, SISAEnsemble) else SISAConfig()


@register_method("sisa", config=SISAConfig, info=SISAInfo, reloadable=False, cli=False,
                 default_config=_training_config,
                 summary="retrain the shards that held forget data (Bourtoule et al. 2021)")
def sisa(
    model: SISAEnsemble,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: SISAConfig,
    accelerator: Any = None,
) -> tuple[SISAEnsemble, SISAInfo]:
    """SISA unlearning: retrain only the shards that held forget samples, each from the
    checkpoint of the last stage before its first slice that held one.

    ``model`` is an ensemble from :func:`train_sisa` and ``data`` the same training data
    (its labels are checked against the ones recorded). ``config`` may change the
    retraining settings (learning rate, progress...) but not ``shards`` / ``slices``;
    default: the training config. ``model`` is not modified; a new ensemble is returned.
    """
    if not isinstance(model, SISAEnsemble):
        raise UnlearningError(
            f"sisa unlearns a SISAEnsemble returned by erm_surgery.methods.baselines.train_sisa(); "
            f"got {type(model).__name__} (SISA must be used from training on)")
    cfg = config
    if (cfg.shards, cfg.slices) != (model.config.shards, model.config.slices):
        raise UnlearningError(f"config has {cfg.shards} shards x {cfg.slices} slices; the "
                              f"ensemble was trained with {model.config.shards} x "
                              f"{model.config.slices}")
    forget = check_forget_classes(model, classes, require_attached=False)
    gone = sorted(set(forget) & set(model.forgotten_classes))
    if gone:
        raise UnlearningError(f"classes {gone} are already forgotten; remove them from the "
                              "request")
    if not set(range(model.num_classes)) - set(forget) - set(model.forgotten_classes):
        raise UnlearningError("the request would forget every class")
    dataset = as_dataset(data)
    labels = labels_of(dataset, model.num_classes)
    if labels.shape != model.labels.shape or not torch.equal(labels, model.labels):
        raise UnlearningError("data is not the training data of this ensemble (its labels "
                              "differ): SISA needs the same dataset, in the same order")
    out = copy.deepcopy(model)
    is_forget = torch.isin(labels, torch.as_tensor(forget, dtype=torch.long))
    restart: list[int | None] = []
    stages = samples = 0
    device = "cpu"
    for s, slices in enumerate(out.plan):
        first = next((r for r, part in enumerate(slices)
                      if part and bool(is_forget[torch.as_tensor(part)].any())), None)
        restart.append(first)
        if first is None:
            continue
        out.plan[s] = slices = [[i for i in part if not is_forget[i]] for part in slices]
        ckpts = out.checkpoints[s][:first] if cfg.keep_checkpoints else []
        if ckpts and len(ckpts) == first:  # resume after stage `first`
            member = out.shards[s]
            member.load_state_dict(ckpts[-1])
        else:  # from scratch, as a fresh member would have started
            member, _ = reinitialised(out.shards[s], cfg.seed * 1009 + s)
            ckpts, first = [], 0
            restart[-1] = 0
        member, device, run = _train_shard(member, dataset, slices, first, cfg, out.epochs,
                                           accelerator, s, ckpts)
        out.shards[s] = member
        out.checkpoints[s] = ckpts
        stages += run
        samples += sum(len(p) for p in slices)
    out.forgotten_classes = sorted(out.forgotten_classes + forget)
    out.eval()
    retrained = sum(r is not None for r in restart)
    notes = []
    if retrained == len(out.shards) and all(r == 0 for r in restart):
        notes.append("every shard held forget samples in its first slice: all shards were "
                     "retrained from scratch (class unlearning gives SISA no saving)")
    info = SISAInfo(method="sisa", forget_classes=forget, shards=len(out.shards),
                    shards_retrained=retrained, restart_slices=restart,
                    stages_retrained=stages, samples=samples, device=device,
                    epochs=cfg.stage_epochs(out.epochs), notes=notes)
    return out, info
