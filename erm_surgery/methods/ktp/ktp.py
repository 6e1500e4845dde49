"""KTP: Knowledge Transfer and Prohibition (ERM-KTP paper, section 4.2-4.3, Algorithms 2-3).

``unlearn(model, classes, data)`` returns a *fresh* student (this module is CKT's loop and
GKT; FKT's head surgery is :mod:`.fkt`, the settings :mod:`.config`):

- **CKT**: a re-initialised copy of the architecture is trained so that its feature map
  matches the teacher's map times ``Gbar`` (the channels no forget class uses), MSE on the
  map plus MSE on the pooled vector. The teacher runs in eval mode without grad; its
  masked maps are computed once and cached when the data is deterministic, as many as fit
  ``cache_bytes`` (:mod:`.cache`; the rest are recomputed in their batch).
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
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ...data import batch_statistics, shuffled_loader
from ...errors import UnlearningError, warn_user
from ...surgery import ERMModel, attach
from ...training.checks import NonFiniteWatch
from ...training.optim import cosine_schedule
from ...training.precision import refuse_cpu_bfloat16_hazards
from ...unlearning.registry import register_method
from ...unlearning.request import (
    check_separation,
    entanglement_message,
    parse_request,
    reinitialised,
    seeded_rng,
)
from .cache import CACHE_DTYPES, TeacherCache, rank_shard, split_budget
from .config import KTPConfig, KTPInfo
from .fkt import head_layers, transfer_head
from .layout import (
    autocast_dtype,
    student_autocast,
    student_in_channels_last,
    teacher_in_channels_last,
    to_channels_last,
)
from .memory import PeakMemory

__all__ = ["ktp"]

#: the smallest batch of the teacher pass (it runs without gradients)
PASS_BATCH = 256


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


def _check_finite_weights(student: nn.Module, autocast: torch.dtype | None) -> None:
    """Refuse a student with a NaN / Inf weight (one host sync per call). The loss watch
    cannot see a weight that no forward reaches, such as a convolution tap that only ever
    meets padding: oneDNN's bfloat16 steps left NaN there on one-pixel maps, which
    :func:`.layout.student_autocast` now keeps in float32; this is the backstop for a
    geometry the rule does not know (docs/unlearning.md)."""
    bad = [n for n, p in student.named_parameters()
           if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        hint = (" with bfloat16 steps; run KTPConfig(student_precision='float32')"
                if autocast is not None else "")
        raise UnlearningError(f"KTP trained non-finite weights into {bad[:5]}{hint}. The "
                              "student is discarded; the teacher is unchanged")


def _precision_name(autocast: torch.dtype | None) -> str:
    """``"bfloat16"`` for an autocast dtype, ``"float32"`` for none (for ``KTPInfo``)."""
    return str(autocast or torch.float32).removeprefix("torch.")


def _clock(device: torch.device) -> float:
    """Wall seconds now, after the device's queued work (one sync; called a few times a
    request, to say where its time went)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _retain_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the samples with a label (-100 = none); 0 for a batch without."""
    loss = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    return loss / (labels != -100).sum().clamp_min(1)


# ----------------------------------------------------------------------- KTP


@register_method("ktp", config=KTPConfig, info=KTPInfo, needs_attached=True, group="ktp",
                 summary="Knowledge Transfer and Prohibition: a fresh student distilled from "
                         "the masked teacher (ERM-KTP, CVPR 2023)")
def ktp(
    model: ERMModel,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: KTPConfig,
    accelerator: Any = None,
    student: nn.Module | None = None,
) -> tuple[ERMModel, KTPInfo]:
    """Knowledge Transfer and Prohibition; returns ``(student, info)``. See :func:`unlearn`.

    Runs under its own random state seeded with ``config.seed`` (the student's
    initialisation, data order, dropout), so the result does not depend on, and does not
    advance, the caller's global torch RNG.
    """
    from ...training import make_accelerator

    acc = accelerator or make_accelerator()
    with (seeded_rng(config.seed), _restored(model), PeakMemory(acc.device) as peak,
          contextlib.ExitStack() as teacher_layout):
        s, info = _ktp(model, classes, data, config, acc, student, teacher_layout)
    info.peak_rss_mib, info.cuda_peak_mib = peak.peak_rss_mib, peak.cuda_peak_mib
    return s, info


@contextlib.contextmanager
def _restored(teacher: nn.Module) -> Iterator[None]:
    """The teacher's train/eval mode and device, as they were, however the call ends: the
    distillation runs it in eval mode on the accelerator's device, and an error there
    (bad data, a NaN loss, an interrupt) must not leave it so."""
    if not isinstance(teacher, ERMModel):
        yield
        return
    mode, device = teacher.training, teacher.erm.G.device
    try:
        yield
    finally:
        teacher.train(mode)
        teacher.to(device)


def _ktp(model: ERMModel, classes: Iterable[int], data: Dataset | DataLoader,
         config: KTPConfig, accelerator: Any, student: nn.Module | None,
         teacher_layout: contextlib.ExitStack) -> tuple[ERMModel, KTPInfo]:
    """The request; ``teacher_layout`` holds the teacher's NHWC weights until the caller's
    block ends (the original tensors are put back then)."""
    from tqdm.auto import tqdm

    started = _clock(accelerator.device)
    request = parse_request(model, classes, data, require_attached=True)
    forget = request.forget
    if config.logit_weight and not model.has_head_graph:
        raise UnlearningError("logit_weight needs a head that reads only the feature map; "
                              "this model's head reads other tensors too. Use "
                              "logit_weight=0")
    label_weight = config.label_weight
    if label_weight and not model.has_head_graph:
        warn_user("KTP: this model's head is not a function of the feature map alone "
                      "(it reads other tensors), so the retain-label term (label_weight) "
                      "is skipped; only the feature distillation runs")
        label_weight = 0.0
    acc = accelerator
    teacher = model
    device = acc.device

    dataset = request.dataset
    idx = (request.retain_idx if config.distill_on == "retain"
           else list(range(len(request.labels))))
    distill_set = Subset(dataset, idx)
    if len(distill_set) < 2 and batch_statistics(model):
        raise UnlearningError(
            f"KTP distils on {len(distill_set)} sample ({config.distill_on} data): the "
            "model normalises with batch statistics (BatchNorm), which need more than one "
            "value per channel in a training batch; pass more data of the classes to keep")

    G = teacher.erm.G.detach()
    # refuses an untrained / EMA-averaged G before any work (issue 14)
    check_separation(G, forget, config.threshold, teacher.erm.forgotten_classes)
    keep = teacher.erm.keep_mask(forget, config.threshold)
    per_forget, lost = _entanglement(G, forget, keep, config.threshold,
                                     teacher.erm.forgotten_classes)
    message = entanglement_message(forget, lost, config.entanglement_warning)
    if message:
        warn_user(message)

    s, same = _fresh_student(teacher, student, config.seed)
    s.train()
    teacher.eval()
    teacher.to(device)  # mode and device restored by _restored(), also on an error
    keep_f = keep.to(device=device, dtype=torch.float32)
    cd = teacher.surgery.channel_dim
    shape = [1, 1, 1, 1]
    shape[cd] = keep.numel()
    keep_map = keep_f.view(shape)

    # one sample, read once: the NHWC probes of the teacher and the student, and the
    # student's bfloat16 check, run on it
    probe = dataset[idx[0]][0].unsqueeze(0).to(device) if idx else None

    # the student's steps under bfloat16 autocast where the hardware is fast at it and
    # oneDNN trains this model right at this input size (refused before any work if asked
    # for where it does not), unless the caller's accelerator already runs mixed precision
    # (its prepared forward autocasts; the same check applies to its bf16)
    own_amp = acc.mixed_precision == "no"
    if own_amp:
        student_amp = student_autocast(s, config.student_precision, device, probe)
    else:
        student_amp = None
        refuse_cpu_bfloat16_hazards(s, probe, acc, UnlearningError, "KTP")

    def one_sample() -> None:
        with torch.no_grad():
            teacher.forward_features(to_channels_last(probe))

    nhwc = bool(idx) and teacher_layout.enter_context(teacher_in_channels_last(
        teacher, config.teacher_channels_last, one_sample))
    if teacher.has_head_graph and request.forget_idx:
        # cheap (<= 256 samples, one feature pass): does the teacher's G prohibit the class?
        with torch.no_grad():
            sample = request.forget_idx[:256]
            x = torch.stack([dataset[i][0] for i in sample]).to(device)
            x = to_channels_last(x) if nhwc else x
            y = request.labels[torch.as_tensor(sample, dtype=torch.long)].to(device)
            kept = teacher.forward_head(teacher.forward_features(x) * keep_map)
            left = float((kept.argmax(1) == y).float().mean())
        if left > 0.05:
            warn_user(
                f"the teacher's prohibition is weak: with the channels of classes {forget} "
                f"prohibited it still classifies {left:.0%} of their training samples "
                "correctly (target <= 5%), so KTP's student may keep them. Retrain the "
                "teacher with erm_surgery.train defaults (ERMConfig.lambda4 > 0) or more "
                "epochs; see TrainResult.health")

    # FKT first: the prohibited head feeds the label and logit terms during distillation
    blocked = transfer_head(teacher, s, keep.to(s.erm.G.device), forget, config.forget_bias)
    head_terms = bool(label_weight or config.logit_weight)
    # the head trains only when a term reaches it; otherwise DDP would wait for its grads
    train_head = config.train_head and head_terms
    head_params = {id(p) for _, m in head_layers(s) for p in m.parameters()}
    frozen = [p for p in s.parameters()
              if p is s.erm.G or (id(p) in head_params and not train_head)]
    if label_weight:
        labels = torch.full_like(request.labels, -100)  # forget samples never meet a label
        labels[request.retain_idx] = request.labels[request.retain_idx]
        distill_labels = labels[torch.as_tensor(idx, dtype=torch.long)].to(device)
    frozen_ids = {id(p) for p in frozen}
    for p in s.parameters():  # a fresh student trains all its weights, whatever the
        p.requires_grad_(id(p) not in frozen_ids)  # teacher's (a frozen backbone) had
    params = [p for p in s.model.parameters() if p.requires_grad]
    # Several processes: each rank keeps one shard of the data for the whole run (instead
    # of Accelerate's per-epoch split), so it can cache the teacher maps of that shard
    sharded = acc.num_processes > 1
    positions = (rank_shard(len(distill_set), acc.num_processes, acc.process_index,
                            config.seed) if sharded else list(range(len(distill_set))))
    batch_size, lr = config.batch_for(len(positions))
    opt = replace(config, lr=lr).build_optimizer(params)
    indexed = _Indexed(distill_set)
    loader = shuffled_loader(Subset(indexed, positions) if sharded else indexed,
                             batch_size, seed=config.seed + acc.process_index,
                             num_workers=config.num_workers)
    # a prepared scheduler steps once per process per step (Accelerate's convention for a
    # loader it splits); our shard loader is already one process's part
    per_step = acc.num_processes if sharded else 1
    sched = cosine_schedule(opt, max(1, len(loader) * config.epochs * per_step),
                           config.warmup_for(batch_size) * per_step)

    cache_on = config.cache_teacher
    if cache_on is None:
        cache_on = _deterministic(dataset)
    budget = split_budget(config.cache_bytes, device) if cache_on else (0, 0)
    # the teacher pass keeps no activations (no_grad): a larger batch than the student's
    # is cheaper per sample (measured on one CPU thread: 256 beat 64 by 5-20% on
    # test_resnet and resnet18) and costs little memory
    pass_batch = max(2 * batch_size, PASS_BATCH)
    autocast = autocast_dtype(device, config.teacher_precision, name="teacher_precision")
    progress = tqdm(total=max(1, len(loader) * config.epochs)
                    + (math.ceil(len(positions) / pass_batch) if cache_on else 0),
                    desc="KTP teacher pass", unit="batch", dynamic_ncols=True,
                    disable=not (config.show_progress and acc.is_main_process))
    pass_started = _clock(device)
    teacher_maps = TeacherCache(teacher, keep_map, distill_set, positions, device, budget,
                                dtype=CACHE_DTYPES[config.cache_dtype],
                                batch_size=pass_batch, num_workers=config.num_workers,
                                progress=progress, channels_last=nhwc, autocast=autocast)
    teacher_pass_s = _clock(device) - pass_started if teacher_maps.cached else 0.0

    student_nhwc = bool(idx) and student_in_channels_last(
        s, config.channels_last, device, probe)
    if sharded:  # the loader is this rank's already: Accelerate must not split it again
        wrapped, opt, sched = acc.prepare(s, opt, sched)
    else:
        wrapped, opt, loader, sched = acc.prepare(s, opt, loader, sched)
    # one context for every step (an autocast object can be entered again and again)
    amp = (torch.autocast(device.type, dtype=student_amp) if student_amp
           else contextlib.nullcontext())
    last = torch.zeros((), device=device)
    steps = 0
    watch = NonFiniteWatch(device, "KTP distillation", UnlearningError, acc)
    progress.set_description("KTP distillation")
    steps_started = _clock(device)
    for epoch in range(config.epochs):
        watch.start(epoch)
        for x, i in loader:
            x = x.to(device)  # a prepared loader has moved it already; a shard's has not
            if student_nhwc:
                x = to_channels_last(x)
            target = teacher_maps.targets(x, i).float()
            with amp:
                if head_terms:  # features and logits from one pass, through DDP's forward
                    out, logits = wrapped(x, return_features="both")
                else:
                    out = wrapped(x, return_features=True)
                distill = _distill_loss(out.float(), target, cd, config.pooled_weight)
                loss = distill
                if label_weight:
                    y = distill_labels[i.to(device)]
                    loss = loss + label_weight * _retain_label_loss(logits, y)
                if config.logit_weight:
                    head = acc.unwrap_model(wrapped).forward_head
                    with torch.no_grad():
                        soft = F.softmax(head(target).float() / config.temperature, dim=1)
                    log_p = F.log_softmax(logits.float() / config.temperature, dim=1)
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
            steps += 1
            watch.update(loss)  # host look every CHECK_FINITE_EVERY batches
            progress.update(1)
        watch.check()
    progress.close()
    steps_ended = _clock(device)

    s = acc.unwrap_model(wrapped)
    if student_nhwc:  # returned in the default layout, like any other model
        s.to(memory_format=torch.contiguous_format)
    _check_finite_weights(s, student_amp)
    for p in frozen:
        p.requires_grad_(True)
    with torch.no_grad():  # GKT
        s.erm.G.copy_(teacher.erm.G)
        s.erm.forgotten.copy_(teacher.erm.forgotten)
        s.erm.forgotten[forget] = True
        s.erm.G[s.erm.forgotten] = 0
    s.eval()
    info = KTPInfo(
        method="ktp", forget_classes=forget, threshold=config.threshold,
        prohibited_channels=int((~keep).sum()), num_channels=keep.numel(),
        channels_per_forget_class=per_forget, retain_channels_lost=lost,
        distill_on=config.distill_on, epochs=config.epochs, samples=len(distill_set),
        final_mse=float(last),
        batch_size=batch_size, lr=lr, warmup_steps=config.warmup_for(batch_size),
        teacher_channels_last=nhwc, student_channels_last=student_nhwc,
        teacher_precision=_precision_name(autocast),
        student_precision=(_precision_name(student_amp) if own_amp
                           else f"{acc.mixed_precision} (accelerator)"),
        steps=steps, cached_samples=teacher_maps.cached,
        cache_bytes=teacher_maps.nbytes,
        streamed_batches=teacher_maps.streamed_batches,
        not_reinitialised=same,
        teacher_pass_s=teacher_pass_s,
        distill_s=steps_ended - steps_started,
        total_s=_clock(device) - started,
        config={k: v for k, v in asdict(config).items()
                if k not in ("show_progress", "num_workers")})
    return s, info


