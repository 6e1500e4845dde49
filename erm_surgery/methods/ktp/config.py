"""KTP's settings (:class:`KTPConfig`) and what a request reports (:class:`KTPInfo`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ...training.optim import Recipe
from ...unlearning.request import MethodInfo
from .cache import CACHE_DTYPES
from .layout import PRECISIONS

__all__ = ["AUTO_WARMUP_STEPS", "KTPConfig", "KTPInfo"]

#: the warmup of a run whose batch (and learning rate) the policy scaled up: 20 steps
#: kept batch 64 at lr 0.01 within 0.3 points of batch 32 (docs/unlearning.md)
AUTO_WARMUP_STEPS = 20


@dataclass(kw_only=True)
class KTPConfig(Recipe):
    """Hyperparameters of KTP.

    The fields of :class:`~erm_surgery.training.optim.Recipe` with KTP's defaults
    (``epochs`` = distillation epochs of the student, Adam at ``lr`` 0.005 with a cosine
    schedule to 0, batch 32 on small data; ``seed`` also seeds the student's
    re-initialisation), and the attributes below.

    The batch grows with the data (:meth:`batch_for`): ``batch_size`` is the batch on
    small data, doubled up to ``max_batch_size`` while the run keeps at least
    ``min_steps`` optimiser steps, with ``lr`` scaled linearly with the batch after a
    ``warmup_steps`` warmup. The budget is steps: on MNIST-5k's 2,400-3,600 retain samples
    (``benchmarks/ktp_recipe.py``'s nine cases) batch 64 at lr 0.01 with a 20-step warmup
    (74-112 steps) kept the retain accuracy of batch 32 (224 steps) within 0.3 points,
    and batch 128 (36-56 steps) lost a point whatever the rule
    (benchmarks/results/ktp_batch_*, docs/unlearning.md, "Speed and memory"). The default
    ``min_steps`` of 100 takes batch 64 from 3,200 samples per process and 128 from 6,400.

    Attributes:
        max_batch_size: the largest batch the policy may take (``batch_size`` or less =
            always ``batch_size``).
        min_steps: the fewest optimiser steps (over all epochs) the policy keeps when it
            grows the batch.
        lr_scaling: how ``lr`` follows the batch the policy takes: ``"sqrt"`` (times
            ``sqrt(batch / batch_size)``, Adam's rule of thumb) or ``"linear"`` (times
            ``batch / batch_size``, the SGD rule, usually with ``warmup_steps``).
        warmup_steps: optimiser steps of a linear learning-rate warmup from 0 before the
            cosine decay (0 = none; counted per process, like ``min_steps``). ``None`` =
            :data:`AUTO_WARMUP_STEPS` when the policy took a batch larger than
            ``batch_size`` (its learning rate scaled up), none at ``batch_size``
            (:meth:`warmup_for`).
        threshold: a channel is prohibited when a forget class has ``G[c, k] > threshold``
            (0 = the reference code: any use prohibits; the paper defines only 0 and 1).
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
            no random transform (TensorDataset, or no ``transform`` attribute). Under
            several processes each rank caches the shard it distils on.
        cache_bytes: the most memory the cached maps may take; the samples beyond it are
            streamed (their maps recomputed under ``no_grad`` when their batch comes).
            ``None`` = a quarter of the free memory: on a GPU a quarter of its free
            memory, then a quarter of the host's available memory in pinned host memory;
            on a CPU a quarter of the available memory. ``0`` = no cache.
        cache_dtype: storage of the cached maps: ``"auto"`` (the dtype the teacher pass
            produces, so always exact: bfloat16, half the bytes of float32, when the pass
            runs under bfloat16 autocast), ``"float32"``, ``"bfloat16"`` or ``"float16"``
            (half the memory; float32 maps rounded to 3 significant digits,
            ``"float16"`` overflows above 65504).
        forget_bias: bias given to the forget classes' zeroed rows.
        entanglement_warning: warn when a retain class loses more than this fraction of the
            channels it uses (knowledge entanglement).
        channels_last: the student's steps in NHWC (weights and inputs): ``"auto"`` (the
            default) on a CPU, where oneDNN trains faster in it (0.46-0.87x of a step's
            NCHW time on six of seven timm families, measured; see
            :func:`.layout.student_in_channels_last`), unless the model refuses NHWC;
            ``True`` anywhere (on GPUs it helps with AMP); ``False`` never. The student
            is returned in the default layout either way.
        teacher_channels_last: run the teacher pass (a forward without gradients) in NHWC:
            0.33-0.72x of its time on a CPU, measured. The teacher's 4-D weights are
            converted for the call and its own tensors put back after; a model whose
            forward refuses NHWC runs in its own layout (:mod:`.layout`).
        teacher_precision: the teacher pass's arithmetic: ``"auto"`` (bfloat16 autocast
            where the device has fast bfloat16, a CPU with AVX512-BF16 or AMX or a CUDA GPU
            of compute capability 8 or later: 0.50-0.64x of the float32 pass's time on a
            CPU, measured; float32 elsewhere), ``"float32"`` or ``"bfloat16"``. The maps
            keep bfloat16's 3 significant digits (the retain accuracy of the student is
            unchanged within the noise of a run, docs/unlearning.md);
            :attr:`KTPInfo.teacher_precision` says which ran.
        student_precision: the arithmetic of the student's distillation steps (forward and
            loss under autocast; weights, gradients and the optimiser stay float32):
            ``"auto"`` (bfloat16 where the hardware is fast at it, a GPU of compute
            capability 8+ or a CPU with AVX512-BF16 / AMX, the usual mixed precision;
            float32 on a CPU for a student with a strided convolution that meets a
            one-pixel map at the data's size, whose bfloat16 weight gradient oneDNN leaves
            partly uninitialised, or with a strided depthwise convolution, which oneDNN
            runs slower in bfloat16: :func:`~erm_surgery.methods.ktp.layout.student_autocast`,
            :mod:`erm_surgery.training.precision`), ``"float32"`` or ``"bfloat16"``
            (anywhere; on a CPU an :class:`UnlearningError` before any work for a student
            with that one-pixel hazard). The call also refuses a student that ends with a
            non-finite weight. Ignored when the accelerator passed to ``unlearn`` already
            runs mixed precision (its ``"bf16"`` on a CPU gets the same hazard check).
            :attr:`KTPInfo.student_precision` says which ran.
        num_workers: DataLoader worker processes for reading and augmenting images (0 =
            in the main process; raise it for image folders with decoding and transforms).
    """

    epochs: int = 2
    lr: float = 0.005
    optimizer: str = "adam"
    batch_size: int = 32
    max_batch_size: int = 128
    min_steps: int = 100
    lr_scaling: str = "linear"
    warmup_steps: int | None = None
    threshold: float = 0.0
    distill_on: str = "retain"
    pooled_weight: float = 1.0
    logit_weight: float = 0.0
    temperature: float = 4.0
    label_weight: float = 1.0
    train_head: bool = False
    cache_teacher: bool | None = None
    cache_bytes: int | None = None
    cache_dtype: str = "auto"
    forget_bias: float = -1e4
    entanglement_warning: float = 0.3
    num_workers: int = 0
    channels_last: bool | Literal["auto"] = "auto"
    teacher_channels_last: bool = True
    teacher_precision: str = "auto"
    student_precision: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.distill_on not in ("retain", "all"):
            raise ValueError(f"distill_on must be 'retain' or 'all', got {self.distill_on!r}")
        if self.label_weight < 0 or self.logit_weight < 0:
            raise ValueError("label_weight and logit_weight must be >= 0")
        if self.max_batch_size < 1 or self.min_steps < 1:
            raise ValueError(f"max_batch_size and min_steps must be >= 1, got "
                             f"{self.max_batch_size} and {self.min_steps}")
        if self.lr_scaling not in ("sqrt", "linear"):
            raise ValueError(f"lr_scaling must be 'sqrt' or 'linear', got {self.lr_scaling!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.cache_bytes is not None and self.cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0 or None (a budget from free memory), "
                             f"got {self.cache_bytes}")
        for name in ("teacher_precision", "student_precision"):
            if getattr(self, name) not in PRECISIONS:
                raise ValueError(f"{name} must be one of {PRECISIONS}, got "
                                 f"{getattr(self, name)!r}")
        if self.channels_last not in (True, False, "auto"):
            raise ValueError(f"channels_last must be True, False or 'auto', got "
                             f"{self.channels_last!r}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {sorted(CACHE_DTYPES)}, got "
                             f"{self.cache_dtype!r}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")

    def batch_for(self, samples: int) -> tuple[int, float]:
        """``(batch, lr)`` for ``samples`` distillation samples (per process).

        ``batch_size`` doubled while the doubled batch stays within ``max_batch_size`` and
        still gives ``epochs * (samples // batch) >= min_steps``; the learning rate grows
        with the batch as ``lr_scaling`` says (``"sqrt"``: Adam's rule of thumb, the noise
        of a gradient falls with the square root of the batch).
        """
        batch = self.batch_size
        while (2 * batch <= self.max_batch_size
               and self.epochs * (samples // (2 * batch)) >= self.min_steps):
            batch *= 2
        ratio = batch / self.batch_size
        return batch, self.lr * (ratio if self.lr_scaling == "linear" else math.sqrt(ratio))

    def warmup_for(self, batch: int) -> int:
        """Warmup steps of a run at ``batch`` (from :meth:`batch_for`): ``warmup_steps``,
        or with ``None`` :data:`AUTO_WARMUP_STEPS` when the batch grew, else 0."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return AUTO_WARMUP_STEPS if batch > self.batch_size else 0

    @classmethod
    def paper(cls, **overrides: Any) -> KTPConfig:
        """The reference code's recipe (feature MSE only, fixed FKT head, SGD at lr 0.1,
        batch 32 whatever the data), for 2 epochs: what this library ran before the
        retain-label term."""
        fields = dict(epochs=2, lr=0.1, optimizer="sgd", label_weight=0.0, train_head=False,
                      max_batch_size=32, warmup_steps=0)
        return cls(**{**fields, **overrides})


@dataclass(kw_only=True)
class KTPInfo(MethodInfo):
    """What one KTP request did (also kept on the student as ``unlearning_info``).

    Attributes (besides :class:`MethodInfo`'s):
        threshold: the prohibition threshold used.
        prohibited_channels: channels prohibited (of ``num_channels``).
        num_channels: K.
        channels_per_forget_class: channels each forget class used.
        retain_channels_lost: per retain class, the fraction of its channels prohibited.
        distill_on: ``"retain"`` or ``"all"``.
        epochs: distillation epochs.
        samples: distillation samples.
        final_mse: feature MSE of the last batch.
        batch_size: the batch the run took (:meth:`KTPConfig.batch_for`).
        lr: its learning rate.
        warmup_steps: its warmup steps (:meth:`KTPConfig.warmup_for`).
        teacher_channels_last: whether the teacher pass ran in NHWC.
        student_channels_last: whether the student's steps ran in NHWC.
        teacher_precision: the teacher pass's autocast dtype (``"bfloat16"``), or
            ``"float32"`` when it ran in the teacher's own precision.
        student_precision: the distillation steps' autocast dtype, ``"float32"`` without
            autocast, or the accelerator's mixed precision (``"bf16 (accelerator)"``).
        steps: optimiser steps run.
        cached_samples: samples whose teacher maps were cached (this process's; the others
            were streamed).
        cache_bytes: bytes the cache held.
        streamed_batches: distillation batches that recomputed teacher maps (all of them
            without a cache, none when everything fit).
        peak_rss_mib: the process's peak resident set during the call, MiB (the whole
            process: the caller's tensors, the teacher, the student and the cache; see
            :class:`~erm_surgery.methods.ktp.memory.PeakMemory` for how it is measured).
        cuda_peak_mib: ``torch.cuda.max_memory_allocated`` during the call on a GPU
            (the peak statistics are reset at the start), None on a CPU.
        not_reinitialised: parameters no ``reset_parameters`` reached.
        teacher_pass_s: wall seconds of the teacher pass that filled the cache (0 without
            one; maps streamed during the steps count in ``distill_s``).
        distill_s: wall seconds of the student's distillation steps (all epochs).
        total_s: wall seconds of the whole request; the rest beyond the two above is
            setup (checks, the fresh student, FKT) and the final weight check.
        config: the recipe, for the record.
    """

    threshold: float
    prohibited_channels: int
    num_channels: int
    channels_per_forget_class: dict[int, int]
    retain_channels_lost: dict[int, float]
    distill_on: str
    epochs: int
    samples: int
    final_mse: float
    batch_size: int = 0
    lr: float = 0.0
    warmup_steps: int = 0
    teacher_channels_last: bool = False
    student_channels_last: bool = False
    teacher_precision: str = "float32"
    student_precision: str = "float32"
    steps: int = 0
    cached_samples: int = 0
    cache_bytes: int = 0
    streamed_batches: int = 0
    peak_rss_mib: float | None = None
    cuda_peak_mib: float | None = None
    not_reinitialised: list[str] = field(default_factory=list)
    teacher_pass_s: float = 0.0
    distill_s: float = 0.0
    total_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
