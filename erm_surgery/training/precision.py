"""bfloat16 training on a CPU: the convolutions oneDNN gets wrong, and the ones it runs slowly.

**Wrong.** On a CPU (torch 2.14, oneDNN, AVX512-BF16), the bfloat16 weight gradient of a
convolution with a stride above 1 whose input is one pixel high or wide leaves the taps
that meet only padding *uninitialised*: whatever the memory held, often NaN or values up
to 3e38, where the gradient is exactly 0 (float32 and float64 give 0; so does bfloat16
with a stride of 1 or an input of 2 pixels or more). The forward skips padding, so no loss
and no output shows it; the weights of those taps drift or turn NaN, and a model later run
at a larger input reads them. Measured (``benchmarks/bf16_conv_hazard.py``: 250 random
geometries, NaN-filled freed memory, two tries each): garbage in 13 of the 65 geometries
:func:`bfloat16_gradient_hazards` flags, in none of the 185 it does not (every bad one had
a one-pixel width under a stride of 2 or 3 there; the rule also flags the height). It is
what made KTP's bfloat16 students on 16 px inputs end with NaN in ``test_resnet``'s
stride-2 ``layer4.0.conv1`` (1 x 1 input there; docs/unlearning.md, "Speed and memory").

**Slow.** oneDNN's bfloat16 backward of a *strided depthwise* convolution (MobileNet's and
EfficientNet's downsampling blocks) took 2.4-12x its float32 time (one layer at 32 px, one
thread), which made a whole training step of efficientnet_b0 1.2x slower in bfloat16.

Shared by every training loop of the library: :func:`erm_surgery.train` and the methods
that train under a caller's CPU bf16 accelerator refuse a model with a hazard
(:func:`refuse_cpu_bfloat16_hazards`); KTP's student steps also choose their own
precision by it (``KTPConfig.student_precision``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["bfloat16_gradient_hazards", "hazard_reason", "refuse_cpu_bfloat16_hazards",
           "strided_depthwise_convolutions"]

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def bfloat16_gradient_hazards(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """Names of the convolutions in ``model`` whose bfloat16 weight gradient oneDNN leaves
    partly uninitialised on a CPU at ``sample``'s size (a batch of one or more inputs):
    those whose input is 1 along a spatial dimension in which the stride is above 1 and
    the kernel wider than 1 (the flag is conservative; see the module's docstring).

    Found with one eval forward of ``sample`` without gradients (forward hooks record each
    convolution's input size); the model's train/eval mode is restored after.
    """
    found: list[str] = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: object) -> None:
            spatial = inputs[0].shape[2:]
            if any(size == 1 and stride > 1 and kernel > 1 for size, stride, kernel
                   in zip(spatial, module.stride, module.kernel_size, strict=False)):
                found.append(name)
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, _CONVOLUTIONS)]
    mode = model.training
    try:
        model.eval()  # no batch statistics from one sample, no running-stat update
        with torch.no_grad():
            model(sample)
    finally:
        model.train(mode)
        for h in handles:
            h.remove()
    return list(dict.fromkeys(found))  # a module called twice is named once


def strided_depthwise_convolutions(model: nn.Module) -> list[str]:
    """Names of the depthwise convolutions (one filter per input channel) with a stride
    above 1 in ``model``: slow in bfloat16 on a CPU (see the module's docstring)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, _CONVOLUTIONS) and 1 < m.groups == m.in_channels
            and max(m.stride) > 1]


def refuse_cpu_bfloat16_hazards(
    model: nn.Module,
    sample: torch.Tensor | Callable[[], torch.Tensor | None] | None,
    accelerator: Any,
    error: type[Exception],
    who: str,
) -> None:
    """Raise ``error`` when ``accelerator`` trains under bf16 autocast on a CPU and
    ``model`` has a :func:`bfloat16_gradient_hazards` at ``sample``'s size. ``sample``: one
    input or a batch, or a function that reads one (called only when the check runs, so
    that other runs read no extra sample from a dataset with random transforms); ``None``
    = nothing to check. Call it before the first optimiser step, so that nothing is trained
    when it raises; ``who`` names the caller in the message."""
    if accelerator.device.type != "cpu" or accelerator.mixed_precision != "bf16":
        return
    if callable(sample):
        sample = sample()
    if sample is None:
        return
    hazards = bfloat16_gradient_hazards(model, sample[:1])
    if hazards:
        raise error(f"{who}: mixed_precision='bf16' on a CPU, but "
                    f"{hazard_reason(sample, hazards)}. Use an accelerator with "
                    "mixed_precision='no', or larger inputs. Nothing was trained")


def hazard_reason(sample: torch.Tensor, hazards: list[str]) -> str:
    """Why bfloat16 is refused, for an error message: the input size and the convolutions
    :func:`bfloat16_gradient_hazards` found at it."""
    return (f"at this input size ({tuple(sample.shape[1:])}) the convolutions {hazards[:5]} "
            "get one-pixel maps with a stride above 1, whose bfloat16 weight gradients "
            "oneDNN leaves partly uninitialised (garbage or NaN in the weights)")
