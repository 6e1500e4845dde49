"""Wall time per epoch of ERM training vs plain training of the same model, one run.

Three loops over the same data, interleaved epoch by epoch so machine noise hits all of
them alike: the original (plain timm) model with CE; the attached model's STD path with
CE; the attached model's ERM path (``erm_loss``: one forward, both regularisers, ``G``'s own
Adam step and the projection). The ratio ERM / original is the figure the paper reports as
1.28x (target here: <= 1.10x).

    python benchmarks/erm_overhead.py --epochs 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import erm_surgery
from erm_surgery.data import load_mnist5k
from erm_surgery.training import ERMConfig, erm_loss

RESULTS = Path(__file__).parent / "results"


def run_epoch(kind: str, model, opt, g_opt, loader, config: ERMConfig) -> float:
    """One training epoch of the given kind; returns this process's CPU time in seconds
    (wall time is at the mercy of other jobs on a shared machine)."""
    model.train()
    start = time.process_time()
    for x, y in loader:
        if kind == "erm":
            loss = erm_loss(model, x, y, config)
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if kind == "erm":
            g_opt.step()
            g_opt.zero_grad(set_to_none=True)
            model.erm.project_()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per variant")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    train_set, _ = load_mnist5k()
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    base = timm.create_model(args.model, num_classes=10, in_chans=1)
    config = ERMConfig()
    variants = {}
    for kind in ("original", "std", "erm"):
        model = base if kind == "original" else erm_surgery.attach(base)
        params = model.parameters() if kind == "original" else model.model.parameters()
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        g_opt = (torch.optim.Adam([model.erm.G], lr=config.g_lr)
                 if kind != "original" else None)
        variants[kind] = (model, opt, g_opt)
    run_epoch("std", *variants["std"], loader, config)  # warm-up: allocator, threads
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for rep in range(args.epochs):
        # rotate the order every round so a slow spell of the machine hits each variant
        for kind in order[rep % 3:] + order[:rep % 3]:
            model, opt, g_opt = variants[kind]
            run = "erm" if kind == "erm" else "std"
            times[kind].append(run_epoch(run, model, opt, g_opt, loader, config))
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model,
        "data": f"MNIST-5k train ({len(train_set)} images, 1x32x32)",
        "batch_size": args.batch_size,
        "epochs_per_variant": args.epochs,
        "threads": args.threads,
        "device": "cpu",
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu_seconds_per_epoch": times,
        "median_cpu_seconds_per_epoch": median,
        "ratio_std_to_original": median["std"] / median["original"],
        "ratio_erm_to_original": median["erm"] / median["original"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "erm_overhead.json").write_text(json.dumps(result, indent=2))
    md = [
        "# ERM training overhead",
        "",
        f"`python benchmarks/erm_overhead.py --epochs {args.epochs} --threads {args.threads}`"
        f" ({args.model}, {result['data']}, batch {args.batch_size}, CPU, "
        f"{args.threads} threads, torch {torch.__version__}; variants interleaved per epoch, "
        "order rotated)",
        "",
        "| variant | median CPU s/epoch | ratio to original |",
        "| --- | --- | --- |",
    ]
    for kind in ("original", "std", "erm"):
        md.append(f"| {kind} | {median[kind]:.2f} | {median[kind] / median['original']:.3f} |")
    (args.out / "erm_overhead.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
