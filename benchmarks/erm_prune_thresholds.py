"""What do the small entries of ``G`` carry? (issue 13)

One ERM run of ``erm_surgery.train`` (MNIST-5k at 32 px, batch 128, seed 0), then the
prohibition table (paper Table 2, test split) with a channel counted as the class's when
``G > t`` for several ``t``, and a histogram of ``G``'s positive entries. Counting at ``t``
is what ``ERMConfig.prune_below = t`` (or ``model.erm.prune_(t)`` after training) leaves:
the prune happens after the last ERM epoch, and the STD epochs after it never read ``G``.

    OMP_NUM_THREADS=1 python benchmarks/erm_prune_thresholds.py --model efficientnet_b0 \\
        --n-train 1000
    OMP_NUM_THREADS=1 python benchmarks/erm_prune_thresholds.py --model resnet50 --n-train 1000

``--variant topk`` replaces the projection by "row max, then keep the ``--k-frac * K``
largest entries of each row" (an L0 budget; tried and rejected, see docs/training.md);
``--plain`` trains without ERM epochs (the reference accuracy). Appends one JSON line per
run to ``benchmarks/results/erm_prune_thresholds.jsonl``.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import time
from pathlib import Path

import timm
import torch

import erm_surgery
from erm_surgery.data import load_mnist5k
from erm_surgery.surgery.mask import ERMMask
from erm_surgery.training import ERMConfig, g_metrics
from erm_surgery.training.prohibition import prohibition_accuracy

RESULTS = Path(__file__).parent / "results" / "erm_prune_thresholds.jsonl"
THRESHOLDS = (0.0, 0.05, 0.1, 0.3, 0.5)
BINS = ((0, .01), (.01, .05), (.05, .1), (.1, .3), (.3, .7), (.7, 1.0))


def use_topk_projection(k_frac: float) -> None:
    """Patch :meth:`ERMMask.project_` to keep only each row's ``k_frac * K`` largest entries."""
    row_max = ERMMask.project_

    def project_(self, mode="row", eps=1e-12):
        row_max(self, mode, eps)
        G = self.G.data
        k = max(1, math.ceil(k_frac * G.shape[1]))
        kth = G.topk(k, dim=1).values[:, -1:]
        G.mul_((G >= kth) & (G > 0))
        return self

    ERMMask.project_ = project_


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=("default", "topk"), default="default")
    parser.add_argument("--k-frac", type=float, default=0.1)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--feature-node", default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="ERMConfig overrides")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.variant == "topk":
        use_topk_projection(args.k_frac)
    overrides = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)}
    train_set, test_set = load_mnist5k(size=32)
    train_set = torch.utils.data.Subset(train_set, range(args.n_train))
    torch.manual_seed(args.seed)
    model = erm_surgery.attach(timm.create_model(args.model, num_classes=10, in_chans=1),
                               feature_node=args.feature_node)
    config = (ERMConfig(erm_every=10**6, warmup_epochs=0) if args.plain
              else ERMConfig(**overrides))
    start = time.perf_counter()
    erm_surgery.train(model, train_set, epochs=args.epochs, config=config, seed=args.seed,
                      show_progress=False, batch_size=128)
    G = model.erm.G.detach()
    row = {"model": args.model, "n_train": args.n_train, "epochs": args.epochs,
           "seed": args.seed, "variant": "plain" if args.plain else args.variant,
           "overrides": overrides, "feature_node": model.surgery.feature_node,
           "seconds": round(time.perf_counter() - start, 1), "K": G.shape[1],
           "density": float(g_metrics.l1_density(G)), "csi": float(g_metrics.csi(G)),
           "histogram": {f"({lo}, {hi}]": int(((G > lo) & (G <= hi)).sum()) for lo, hi in BINS}}
    for t in (0.0,) if args.plain else THRESHOLDS:
        table = prohibition_accuracy(model, test_set, threshold=t)
        row[f"threshold {t}"] = {
            "std": round(table.std_accuracy, 4), "prohibited": round(table.mean_prohibited, 4),
            "permitted": round(table.mean_permitted, 4),
            "channels_per_class": sum(table.channels) / len(table.channels)}
    print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
