"""Which convolutions get a partly uninitialised bfloat16 weight gradient on this CPU.

For random convolution geometries (input size, kernel, stride, dilation, groups, layout,
batch), one bfloat16-autocast forward and backward on the CPU after filling freed memory
with NaN; a geometry is *bad* when a tap that meets only padding (its float64 gradient is
exactly 0) gets a non-zero or non-finite bfloat16 gradient, or the gradient holds NaN.
Reports how the bad ones split by :func:`erm_surgery.training.precision.bfloat16_gradient_hazards`
(the rule that keeps KTP's student and ``train(mixed_precision="bf16")`` away from them):
it must flag every bad geometry. Also the live taps' worst relative error against
float64, so a wrong gradient there would show too.

    OMP_NUM_THREADS=1 python benchmarks/bf16_conv_hazard.py --trials 250

Writes benchmarks/results/bf16_conv_hazard.{json,md}. Re-run it on a new torch: when no
flagged geometry is bad any more, the rule can be relaxed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from erm_surgery.training.precision import bfloat16_gradient_hazards

RESULTS = Path(__file__).parent / "results"


def _one(geometry: dict) -> tuple[bool, float]:
    """(bad, worst relative error on the live taps) for one try of ``geometry``."""
    g = geometry
    w = torch.randn(g["cout"], g["cin"] // g["groups"], *g["kernel"])
    x = torch.randn(g["batch"], g["cin"], *g["size"])
    if g["nhwc"]:
        w, x = (t.contiguous(memory_format=torch.channels_last) for t in (w, x))
    w.requires_grad_()
    junk = [torch.full((g["cin"] * g["cout"] * 9 + 1000 * i,), float("nan")) for i in range(8)]
    del junk  # what an uninitialised gradient would read
    conv = dict(stride=g["stride"], padding=g["padding"], groups=g["groups"],
                dilation=g["dilation"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.conv2d(x, w, **conv)
    out.float().sum().backward()
    w64 = w.detach().double().requires_grad_()
    F.conv2d(x.double(), w64, **conv).sum().backward()
    dead = (w64.grad == 0).all(0).all(0)
    grad = w.grad.double()
    bad = bool((grad[:, :, dead] != 0).any()) or not bool(torch.isfinite(grad).all())
    live = ~dead
    err = ((grad[:, :, live] - w64.grad[:, :, live]).abs()
           / (w64.grad[:, :, live].abs() + 1)).max()
    return bad, float(err.nan_to_num(float("inf")))


def _geometry(rng: random.Random) -> dict:
    kernel = (rng.choice([1, 3, 5]), rng.choice([1, 3, 5]))
    dilation = rng.choice([1, 1, 2])
    cin = rng.choice([8, 32, 96])
    groups = rng.choice([1, 1, cin])
    return {"size": (rng.choice([1, 1, 2, 3, 5]), rng.choice([1, 1, 2, 4])),
            "kernel": kernel, "stride": (rng.choice([1, 2, 3]), rng.choice([1, 2])),
            "padding": tuple(dilation * (k // 2) for k in kernel), "dilation": dilation,
            "cin": cin, "groups": groups,
            "cout": cin if groups == cin else rng.choice([16, 64, 192]),
            "batch": rng.choice([1, 4, 16]), "nhwc": rng.random() < 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=250)
    parser.add_argument("--tries", type=int, default=2, help="runs per geometry")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(0)
    counts = {"flagged_bad": 0, "flagged_clean": 0, "unflagged_bad": 0, "unflagged_clean": 0}
    bad_rows, worst_live = [], 0.0
    for _ in range(args.trials):
        g = _geometry(rng)
        layer = nn.Conv2d(g["cin"], g["cout"], g["kernel"], stride=g["stride"],
                          padding=g["padding"], dilation=g["dilation"], groups=g["groups"])
        try:
            flagged = bool(bfloat16_gradient_hazards(nn.Sequential(layer),
                                                     torch.zeros(1, g["cin"], *g["size"])))
            runs = [_one(g) for _ in range(args.tries)]
        except RuntimeError:  # the kernel does not fit the input: not a geometry
            continue
        bad = any(b for b, _ in runs)
        worst_live = max(worst_live, *(e for _, e in runs))
        counts[f"{'flagged' if flagged else 'unflagged'}_{'bad' if bad else 'clean'}"] += 1
        if bad:
            bad_rows.append({**g, "flagged": flagged})
    data = {"command": f"OMP_NUM_THREADS=1 python benchmarks/bf16_conv_hazard.py --trials "
                       f"{args.trials} --tries {args.tries} --seed {args.seed}",
            "torch": torch.__version__,
            "avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported",
                                        lambda: False)()),
            "counts": counts, "worst_live_tap_relative_error": worst_live, "bad": bad_rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bf16_conv_hazard.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = ["# bfloat16 convolution weight gradients on this CPU", "",
             f"`{data['command']}` (torch {data['torch']}, AVX512-BF16: "
             f"{data['avx512_bf16']}).", "",
             "| | bad (garbage on padding-only taps) | clean |", "| --- | --- | --- |",
             f"| flagged by `bfloat16_gradient_hazards` | {counts['flagged_bad']} | "
             f"{counts['flagged_clean']} |",
             f"| not flagged | {counts['unflagged_bad']} | {counts['unflagged_clean']} |", "",
             f"Worst relative error on the live taps (against float64): {worst_live:.3g}.", "",
             "Bad geometries (input size, kernel, stride):", ""]
    lines += [f"- {r['size']} {r['kernel']} {r['stride']} groups {r['groups']} dilation "
              f"{r['dilation']} {'NHWC' if r['nhwc'] else 'NCHW'} batch {r['batch']}"
              for r in bad_rows]
    (args.out / "bf16_conv_hazard.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
