"""How much does the ERM surgery cost? Tracing time, and the training step with the mask.

(a) ``attach(timm resnet50)``: wall time of the whole call (deep copy, two fx traces, shape
    propagation on a ``(2, 3, 224, 224)`` probe, analysis, graph edits), median of
    ``--attach-runs`` runs, with the median time of each stage.
(b) One training step (forward, cross-entropy, backward; no optimiser step) per batch for

    - ``original``: the plain timm model,
    - ``std``: the attached model's STD path ``m(x)``,
    - ``erm``: its ERM path ``m(x, labels=y)`` (mask rows gathered, map multiplied, ``G``
      gets a gradient),

    for timm ``resnet18``, ``resnet50`` and ``test_resnet`` in train mode, at batch
    ``--batch`` and ``--size`` x ``--size`` inputs. The three variants run interleaved, in a
    rotating order, in the same process (``--reps`` rounds after ``--warmup`` rounds), so
    drift in machine load hits them alike. Each variant is reported as its median step
    wall time, and as ratios to ``original``: the median over rounds of the per-round ratio
    of wall times, and of CPU times (``time.process_time``, which other jobs on a shared
    machine hardly change).

Writes ``surgery_speed.json`` and ``surgery_speed.md`` under ``--out``, with the device,
CPU model, torch/timm versions and the number of threads.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import erm_surgery
from erm_surgery import surgery as S
from erm_surgery.surgery import _analysis, _graphs

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("original", "std", "erm")


# --------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Wall time and CPU time of this process (all its threads) for one call.

    On a shared CPU the CPU time hardly depends on other jobs, the wall time does.
    """
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on."""
    env: dict[str, Any] = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else cpu_name()),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
    }
    if hasattr(os, "getloadavg"):
        env["loadavg_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return env


# --------------------------------------------------------------------------- (a) attach


def time_attach(name: str, runs: int) -> dict[str, Any]:
    """Median wall time of ``attach(model)`` and of its stages, on CPU."""
    model = timm.create_model(name, pretrained=False)
    erm_surgery.attach(model)  # warm-up: imports, fx code generation caches
    timed = [_timed(lambda: erm_surgery.attach(model), torch.device("cpu"))
             for _ in range(runs)]
    totals = [wall for wall, _ in timed]

    stages: dict[str, list[float]] = {k: [] for k in
                                      ("deepcopy", "trace_eval", "shape_prop", "analyse",
                                       "train_graph_and_edits")}
    for _ in range(runs):
        t = time.perf_counter
        t0 = t()
        base = copy.deepcopy(model)
        t1 = t()
        gm = S.trace_model(base, training=False)
        t2 = t()
        probe = _analysis.probe_input(base, None)  # timing the library's own stages
        base.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(probe)
        base.train()
        t3 = t()
        info = _analysis.analyse(gm, None, None, None)
        t4 = t()
        _graphs.build_graphs(base, info, gm)
        t5 = t()
        for key, value in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4),
                              strict=True):
            stages[key].append(value)
    return {
        "model": name,
        "probe": list(probe.shape),
        "runs": runs,
        "median_s": statistics.median(totals),
        "min_s": min(totals),
        "median_cpu_s": statistics.median(cpu for _, cpu in timed),
        "all_s": [round(v, 4) for v in totals],
        "stages_median_s": {k: round(statistics.median(v), 4) for k, v in stages.items()},
    }


# --------------------------------------------------------------------------- (b) train step


def time_train_step(name: str, batch: int, size: int, reps: int, warmup: int,
                    device: torch.device, num_classes: int = 10) -> dict[str, Any]:
    """Interleaved forward+backward timings of the original, STD and ERM paths."""
    torch.manual_seed(0)
    original = timm.create_model(name, pretrained=False, num_classes=num_classes)
    original.to(device).train()
    attached = erm_surgery.attach(original).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)

    def step(model: nn.Module, labels: torch.Tensor | None) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            out = model(x) if labels is None else model(x, labels=labels)
            F.cross_entropy(out, y).backward()
        return run

    steps = {"original": step(original, None), "std": step(attached, None),
             "erm": step(attached, y)}
    wall: dict[str, list[float]] = {k: [] for k in VARIANTS}
    cpu: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for i in range(warmup + reps):
        order = VARIANTS[i % 3:] + VARIANTS[:i % 3]  # rotate who goes first
        for key in order:
            w, c = _timed(steps[key], device)
            if i >= warmup:
                wall[key].append(w)
                cpu[key].append(c)

    def ratios(times: dict[str, list[float]]) -> dict[str, float]:
        return {k: statistics.median(a / b for a, b in zip(times[k], times["original"],
                                                            strict=True))
                for k in VARIANTS}

    best = {k: min(v) for k, v in wall.items()}
    return {
        "model": name,
        "batch": batch,
        "input": [3, size, size],
        "reps": reps,
        "warmup": warmup,
        "feature_node": attached.surgery.feature_node,
        "K": attached.surgery.num_channels,
        "median_s": {k: statistics.median(v) for k, v in wall.items()},
        "ratio_to_original": ratios(wall),
        "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "cpu_ratio_to_original": ratios(cpu),
        "min_s": best,
        "min_ratio_to_original": {k: best[k] / best["original"] for k in VARIANTS},
        "all_s": {k: [round(t, 5) for t in v] for k, v in wall.items()},
        "all_cpu_s": {k: [round(t, 5) for t in v] for k, v in cpu.items()},
    }


# --------------------------------------------------------------------------- report


def report(result: dict[str, Any]) -> str:
    """The markdown summary."""
    env, att = result["environment"], result["attach"]
    lines = [
        "# Surgery speed",
        "",
        f"Generated by `benchmarks/surgery_speed.py` ({result['date']}); device "
        f"{env['device']} ({env['device_name']}), torch {env['torch']}, timm {env['timm']}, "
        f"**{env['threads']} thread(s)** (OMP_NUM_THREADS={env['OMP_NUM_THREADS']}), "
        f"{env['cpu_count']} cores; load average at start {env.get('loadavg_at_start')}, "
        f"at end {env.get('loadavg_at_end')} (a shared machine: other jobs ran meanwhile).",
        "",
        "## attach() time",
        "",
        f"`attach(timm {att['model']})` on CPU, probe {att['probe']}: "
        f"**median {att['median_s']:.3f} s** wall (min {att['min_s']:.3f} s, "
        f"{att['runs']} runs; median CPU time {att['median_cpu_s']:.3f} s).",
        "",
        "| stage | median s |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in att["stages_median_s"].items()]
    lines += [
        "",
        "## Training step: forward + cross-entropy + backward",
        "",
        "Median wall time per step. Ratios to `original` are medians of per-round ratios "
        "(interleaved rounds), of wall time and of the process's CPU time; the CPU-time "
        "ratio is the one to trust on a shared machine (other jobs stretch wall time, not "
        "CPU time).",
        "",
        "| model | batch | input | original s | std s | erm s | std / original (CPU) "
        "| erm / original (CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["train_step"]:
        m, q, c = r["median_s"], r["ratio_to_original"], r["cpu_ratio_to_original"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['input'][1]}x{r['input'][2]} | "
            f"{m['original']:.4f} | {m['std']:.4f} | {m['erm']:.4f} | "
            f"{q['std']:.3f} ({c['std']:.3f}) | {q['erm']:.3f} ({c['erm']:.3f}) |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="device of the train-step timings")
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "test_resnet"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=112, help="input side in pixels")
    p.add_argument("--reps", type=int, default=15, help="timed rounds per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds per model")
    p.add_argument("--attach-model", default="resnet50")
    p.add_argument("--attach-runs", type=int, default=7)
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"),
                              "environment": environment(device),
                              "args": {k: str(v) for k, v in vars(args).items()}}
    t0 = time.perf_counter()
    result["attach"] = time_attach(args.attach_model, args.attach_runs)
    print(f"attach(timm {args.attach_model}): median {result['attach']['median_s']:.3f} s",
          file=sys.stderr)
    result["train_step"] = []
    for name in args.models:
        r = time_train_step(name, args.batch, args.size, args.reps, args.warmup, device)
        result["train_step"].append(r)
        q, c = r["ratio_to_original"], r["cpu_ratio_to_original"]
        print(f"{name}: std/original {q['std']:.3f} (CPU time {c['std']:.3f}), "
              f"erm/original {q['erm']:.3f} (CPU time {c['erm']:.3f})", file=sys.stderr)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if hasattr(os, "getloadavg"):
        result["environment"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "surgery_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    text = report(result) + f"\nWall time of the benchmark: {result['wall_s']:.0f} s.\n"
    (args.out / "surgery_speed.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
