"""KTP fast: the teacher pass in channels-last (NHWC) layout without changing the teacher,
and bfloat16 autocast for the teacher pass and the student's steps where the hardware is
fast at it.

The teacher only runs forward without gradients during KTP, and oneDNN's and cuDNN's
convolutions are faster on NHWC tensors: measured on a 2-core CPU at 32 px, one thread, a
no-grad forward of 256 digits took 0.33x (efficientnet_b0), 0.46x (resnet18), 0.61x
(test_resnet), 0.68x (convnext_atto) and 0.72x (resnet50) of its time in the default
layout. Converting only the input does not help (a one-channel image is the same in both
layouts), so the teacher's 4-D weights are converted for the call and the original
tensors put back afterwards: the caller's model ends with the same tensors it started
with, values and layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from itertools import chain

import torch
from torch import nn

from ...errors import UnlearningError
from ...training.precision import (
    bfloat16_gradient_hazards,
    hazard_reason,
    strided_depthwise_convolutions,
)

__all__ = ["PRECISIONS", "autocast_dtype", "channels_last_weights", "fast_bfloat16",
           "student_autocast", "student_in_channels_last", "student_wants_channels_last",
           "teacher_in_channels_last", "to_channels_last"]

#: the names ``KTPConfig.teacher_precision`` and ``student_precision`` take
PRECISIONS = ("auto", "float32", "bfloat16")


@contextlib.contextmanager
def channels_last_weights(module: nn.Module) -> Iterator[None]:
    """``module``'s 4-D parameters and buffers in NHWC inside the block, the original
    tensors restored when it ends (however it ends). Only for blocks that do not update
    the weights: an update inside would be made on the copies and dropped.

    NHWC here means the strides ``Module.to(memory_format=torch.channels_last)`` gives.
    ``is_contiguous(memory_format=torch.channels_last)`` is not the test: it is also True
    for an NCHW depthwise (C, 1, k, k) or 1 x 1 (C, K, 1, 1) weight, whose size-1 dims
    make both layouts "contiguous", and oneDNN still reads those strides as NCHW. Left so,
    they made efficientnet_b0's bfloat16 NHWC teacher pass 4.6x slower (474 against 103
    ms for 256 digits, one thread)."""
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for t in chain(module.parameters(), module.buffers()):
                if t.dim() != 4:
                    continue
                nhwc = t.data.to(memory_format=torch.channels_last)
                if nhwc.stride() != t.data.stride():
                    swapped.append((t, t.data))
                    t.data = nhwc
        yield
    finally:
        for t, original in swapped:
            t.data = original


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """An image batch (4-D) in NHWC; anything else unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@contextlib.contextmanager
def teacher_in_channels_last(teacher: nn.Module, enabled: bool,
                             check: Callable[[], object]) -> Iterator[bool]:
    """The teacher in NHWC for the block when ``enabled`` and ``check()`` (a forward of a
    sample) runs in that layout; yields whether it does. A model whose forward cannot take
    NHWC tensors (a ``.view`` on a map, say) runs in its own layout instead."""
    if not enabled:
        yield False
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(channels_last_weights(teacher))
        try:
            check()
        except RuntimeError:
            stack.close()  # its own layout back before the block runs
            yield False
            return
        yield True


def student_wants_channels_last(setting: bool | str, device: torch.device) -> bool:
    """Whether ``KTPConfig.channels_last`` asks for NHWC steps on ``device``: ``True``, or
    ``"auto"`` on a CPU (where it was measured faster; see
    :func:`student_in_channels_last`)."""
    return setting is True or (setting == "auto" and device.type == "cpu")


def student_in_channels_last(student: nn.Module, setting: bool | str, device: torch.device,
                             sample: torch.Tensor) -> bool:
    """Put the fresh ``student`` in NHWC for its distillation steps if ``setting`` says so
    and a one-sample eval forward of ``sample`` runs in it (a ``.view`` on a map refuses);
    returns whether it is.

    ``"auto"``: NHWC on a CPU, where oneDNN's training steps are faster in it (one thread,
    32 px, forward + backward a sample at batch 64 against NCHW: 0.46x efficientnet_b0,
    0.54x mobilenetv3_large_100, 0.72x test_resnet, 0.69-0.87x convnext_atto, regnety_016
    and resnet50; resnet18 0.8x-1.1x between runs), else the default layout; the default
    layout on GPUs, where it was not measured, and for a model that refuses NHWC.
    ``True``: NHWC anywhere; a model that refuses it is an error. ``False``: never.
    """
    if not student_wants_channels_last(setting, device):
        return False
    student.to(memory_format=torch.channels_last)
    mode = student.training
    try:
        student.eval()  # no batch statistics from one sample, no running-stat update
        with torch.no_grad():
            student(to_channels_last(sample))
    except RuntimeError as e:
        student.to(memory_format=torch.contiguous_format)
        if setting is True:
            raise UnlearningError(
                f"KTPConfig(channels_last=True), but this model's forward refuses NHWC "
                f"tensors ({e}); use channels_last='auto' or False. The teacher is "
                "unchanged") from e
        return False
    finally:
        student.train(mode)
    return True


def fast_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` has fast bfloat16 arithmetic: a CUDA GPU of compute capability 8
    or later (Ampere, Hopper, ...) or a ROCm GPU, or a CPU with AVX512-BF16 or AMX (without
    them oneDNN emulates bfloat16, slower than float32)."""
    if device.type == "cuda":
        # compute capability 8 (Ampere) and later; torch.cuda.is_bf16_supported() also
        # says yes for older GPUs that only emulate bfloat16, slower than float32
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    # private helpers of torch.cpu (PyTorch >= 2.3); absent = not known to be fast
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_dtype(device: torch.device, precision: str, *,
                   name: str = "precision") -> torch.dtype | None:
    """The autocast dtype of a forward-only pass (the teacher's) for ``precision``
    (``KTPConfig.teacher_precision``): ``torch.bfloat16`` for ``"bfloat16"``, and for
    ``"auto"`` where :func:`fast_bfloat16`; ``None`` (float32) otherwise. The student's
    steps, which also train, use :func:`student_autocast`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bfloat16":
        return torch.bfloat16
    if precision == "auto" and fast_bfloat16(device):
        return torch.bfloat16
    return None


def student_autocast(student: nn.Module, precision: str, device: torch.device,
                     sample: torch.Tensor | None) -> torch.dtype | None:
    """The autocast dtype of the student's distillation steps
    (``KTPConfig.student_precision``), ``None`` for float32.

    ``"auto"``: bfloat16 where :func:`fast_bfloat16`, except on a CPU for a student that
    oneDNN would train wrongly in bfloat16 at ``sample``'s size (a strided convolution on a
    one-pixel map, whose padding-only taps get uninitialised gradients) or slowly (a
    strided depthwise convolution); see :mod:`erm_surgery.training.precision`.
    ``"bfloat16"``: bfloat16 anywhere, and on a CPU an :class:`UnlearningError` for a
    student with such a hazard, which would end with garbage or NaN in those weights.
    ``sample``: one input at the data's size (``None``: no data, nothing to train).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"student_precision must be one of {PRECISIONS}, got "
                         f"{precision!r}")
    if precision == "float32" or (precision == "auto" and not fast_bfloat16(device)):
        return None
    if device.type != "cpu" or sample is None:
        return torch.bfloat16
    hazards = bfloat16_gradient_hazards(student, sample)
    if precision == "bfloat16" and hazards:
        raise UnlearningError(
            f"KTPConfig(student_precision='bfloat16') on a CPU, but "
            f"{hazard_reason(sample, hazards)}. Use student_precision='auto' or 'float32', "
            "or larger inputs. The teacher is unchanged")
    if precision == "auto" and (hazards or strided_depthwise_convolutions(student)):
        return None
    return torch.bfloat16
