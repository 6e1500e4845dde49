"""Does ERM's class-channel separation hold on every CNN? (issue 13)

MNIST-5k (4,000 train / 1,000 test real digits) at ``--size`` px, ``erm_surgery.train``
defaults, one row per model and seed: K (channels of the last map), STD test accuracy of
the ERM model vs the same model trained plainly with the same budget, CSI, L1-density,
channels per class (``G > 0``, what prohibition removes), prohibited and permitted
accuracy (paper Table 2, threshold 0, test split) and the training seconds.

    OMP_NUM_THREADS=1 python benchmarks/erm_architectures.py --models test_resnet resnet18
    python benchmarks/erm_architectures.py --models resnet18 --epochs 16 --trace \\
        --set warmup_epochs=0 --no-plain --out resnet18_trace

``--trace`` records after every epoch where the prohibited class's evidence lives: the mean
logit margin (own logit minus the best other) of a class's test samples with all channels,
with only the channels of its ``G`` row (``G[c] > 0``) and with only the others (the
prohibition mask). ``--set key=value`` overrides an ``ERMConfig`` field.

Writes ``benchmarks/results/<out>.{json,md}`` (default ``erm_architectures``); parts of one
sweep run as parallel one-thread processes (``--out part_a`` ...) are combined with
``--merge part_a part_b``.
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import time
from pathlib import Path

import timm
import torch

import erm_surgery
from erm_surgery.data import load_mnist5k, make_loader
from erm_surgery.surgery import apply_channel_mask
from erm_surgery.training import ERMConfig, g_metrics
from erm_surgery.training.prohibition import prohibition_accuracy
from erm_surgery.training.trainer import ERMTrainer

RESULTS = Path(__file__).parent / "results"
MODELS = ["test_resnet", "resnet18", "convnext_atto", "efficientnet_b0",
          "mobilenetv3_large_100", "regnety_016", "resnet50"]
STD_ONLY = dict(erm_every=10**6, warmup_epochs=0)


def fresh(name: str, seed: int) -> erm_surgery.ERMModel:
    torch.manual_seed(seed)
    return erm_surgery.attach(timm.create_model(name, num_classes=10, in_chans=1))


@torch.no_grad()
def margins(model: erm_surgery.ERMModel, data) -> dict[str, float]:
    """Mean over classes of the own-class logit margin with all / in-row / out-of-row maps."""
    model.eval()
    G = model.erm.G
    C = G.shape[0]
    sums = torch.zeros(3, C)
    counts = torch.zeros(C)
    dim = model.surgery.channel_dim
    for x, y in make_loader(data, 500):
        x, y = x.to(G.device), y.to(G.device)
        feats = model.forward_features(x)
        for c in range(C):
            idx = y == c
            if not idx.any():
                continue
            f = feats[idx]
            inrow = (G[c] > 0).float()
            for j, m in enumerate((None, inrow, 1 - inrow)):
                logits = model.forward_head(f if m is None else apply_channel_mask(f, m, dim))
                own = logits[:, c]
                other = logits.clone()
                other[:, c] = -float("inf")
                sums[j, c] += (own - other.amax(1)).sum().float().cpu()
            counts[c] += idx.sum().cpu()
    model.train()
    mean = (sums / counts.clamp_min(1)).mean(1)
    return {"margin_all": float(mean[0]), "margin_in_row": float(mean[1]),
            "margin_out_of_row": float(mean[2])}


def quality(model: erm_surgery.ERMModel, data, trace: bool) -> dict[str, float]:
    G = model.erm.G
    table = prohibition_accuracy(model, data)
    row = {"std_acc": table.std_accuracy, "csi": float(g_metrics.csi(G)),
           "density": float(g_metrics.l1_density(G)),
           "channels_per_class": float((G > 0).sum(1).float().mean()),
           "ones_per_row": float(g_metrics.ones_per_row(G)),
           "prohibited": table.mean_prohibited, "permitted": table.mean_permitted}
    if trace:
        row.update(margins(model, data))
    return row


class TracedTrainer(ERMTrainer):
    """Records :func:`quality` after every epoch (``self.trace``)."""

    def __init__(self, *args, trace_data=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.trace_data, self.trace = trace_data, []

    def _run_epoch(self, epoch, progress):
        out = super()._run_epoch(epoch, progress)
        if self.trace_data is not None:
            model = self.accelerator.unwrap_model(self.wrapped)
            path = "erm" if erm_surgery.training.is_erm_epoch(epoch, self.config) else "std"
            row = {"epoch": epoch + 1, "path": path, **quality(model, self.trace_data, True)}
            self.trace.append(row)
            print("   ", {k: round(v, 4) if isinstance(v, float) else v
                          for k, v in row.items()}, flush=True)
        return out


def run_one(name, seed, args, overrides, train_set, test_set):
    config = ERMConfig(**overrides)
    model = fresh(name, seed)
    K = model.erm.G.shape[1]
    kw = dict(epochs=args.epochs, config=config, seed=seed, show_progress=False,
              batch_size=args.batch_size, mixed_precision=args.mixed_precision,
              channels_last=args.channels_last)
    if args.mixup:  # timm's Mixup/CutMix recipe on both runs (ERM and plain)
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        kw.update(mixup=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1,
                              num_classes=10),
                  criterion=SoftTargetCrossEntropy())
    start = time.perf_counter()
    trainer = TracedTrainer(model, train_set, trace_data=test_set if args.trace else None, **kw)
    trainer.fit()
    seconds = time.perf_counter() - start
    row = {"model": name, "K": K, "seed": seed, "epochs": args.epochs, "n_train": args.n_train,
           **quality(model, test_set, args.trace), "seconds": seconds}
    summary = getattr(trainer, "health", None)
    if summary is not None:
        row["health"] = str(summary)
    if args.plain:
        plain = fresh(name, seed)
        start = time.perf_counter()
        erm_surgery.train(plain, train_set, **{**kw, "config": ERMConfig(**STD_ONLY)})
        row["plain_seconds"] = time.perf_counter() - start
        row["plain_acc"] = prohibition_accuracy(plain, test_set).std_accuracy
    if args.trace:
        row["trace"] = trainer.trace
    return row


def to_markdown(rows, commands, args, overrides) -> str:
    cmd = "`, `".join("python benchmarks/erm_architectures.py " + " ".join(c) for c in commands)
    lines = [
        "# ERM class-channel separation across architectures", "",
        f"`{cmd}` (MNIST-5k, first N of 4000 train digits (see row), 1000 test, at "
        f"{args.size}x{args.size}, "
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} "
        f"thread(s); ERMConfig overrides: {overrides or 'none (defaults)'}"
        f"{'; timm Mixup/CutMix + soft-target CE on both runs' if args.mixup else ''}).", "",
        "Prohibited = mean accuracy of a class's test samples with the channels of its row "
        "of G (G > 0) set to 0 (target <= 0.05); permitted = the other classes under the same "
        "mask.", "",
        "| model | K | seed | epochs | N train | STD acc | plain acc | CSI | density "
        "| channels/class | prohibited | permitted | seconds (plain) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        plain = f"{r['plain_acc']:.3f}" if "plain_acc" in r else "-"
        psec = f" ({r['plain_seconds']:.0f})" if "plain_seconds" in r else ""
        lines.append(
            f"| {r['model']} | {r['K']} | {r['seed']} | {r['epochs']} | {r.get('n_train', 4000)} | "
            f"{r['std_acc']:.3f} | "
            f"{plain} | {r['csi']:.2f} | {r['density']:.3f} | {r['channels_per_class']:.1f} | "
            f"{r['prohibited']:.3f} | {r['permitted']:.3f} | {r['seconds']:.0f}{psec} |")
    for r in rows:
        if "trace" not in r:
            continue
        lines += ["", f"Trace of {r['model']} seed {r['seed']} (margins: own logit minus best "
                  "other, mean over classes):", "",
                  "| epoch | path | STD acc | density | ch/class | prohibited | margin all "
                  "| margin in-row only | margin out-of-row only |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for t in r["trace"]:
            lines.append(
                f"| {t['epoch']} | {t['path']} | {t['std_acc']:.3f} | {t['density']:.3f} | "
                f"{t['channels_per_class']:.1f} | {t['prohibited']:.3f} | "
                f"{t['margin_all']:.2f} | {t['margin_in_row']:.2f} | "
                f"{t['margin_out_of_row']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--n-train", type=int, default=4000,
                        help="use the first N of the 4,000 training digits (test: 1,000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="ERMConfig overrides, e.g. warmup_epochs=0")
    parser.add_argument("--no-plain", dest="plain", action="store_false",
                        help="skip the plain-training reference (halves the time)")
    parser.add_argument("--trace", action="store_true", help="per-epoch diagnostics")
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--mixup", action="store_true",
                        help="timm Mixup/CutMix (0.8/1.0, smoothing 0.1) + soft-target CE")
    parser.add_argument("--out", default="erm_architectures")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to an existing <out>.json (one sweep in parts)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--merge", nargs="+", default=None, metavar="NAME",
                        help="only combine the rows of results/<NAME>.json files (parts of one "
                             "sweep run in parallel processes) into <out>.{json,md}")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    if args.merge:
        parts = [json.loads((args.results / f"{name}.json").read_text()) for name in args.merge]
        rows = [row for part in parts for row in part["rows"]]
        commands = [c for part in parts for c in part["commands"]]
        (args.results / f"{args.out}.json").write_text(json.dumps(
            {"commands": commands, "overrides": overrides, "rows": rows}, indent=2))
        (args.results / f"{args.out}.md").write_text(to_markdown(rows, commands, args,
                                                                 overrides))
        return
    train_set, test_set = load_mnist5k(size=args.size)
    if args.n_train < len(train_set):
        train_set = torch.utils.data.Subset(train_set, range(args.n_train))
    rows, commands = [], [args.argv]
    args.results.mkdir(parents=True, exist_ok=True)
    previous = args.results / f"{args.out}.json"
    if args.append and previous.exists():
        old = json.loads(previous.read_text())
        rows, commands = old["rows"], old["commands"] + commands
    for name in args.models:
        for seed in args.seeds:
            print(f"== {name} seed {seed}", flush=True)
            row = run_one(name, seed, args, overrides, train_set, test_set)
            print({k: v for k, v in row.items() if k != "trace"}, flush=True)
            rows.append(row)
            # written after every row: a sweep cut short keeps what it measured
            (args.results / f"{args.out}.json").write_text(json.dumps(
                {"commands": commands, "overrides": overrides, "rows": rows}, indent=2))
            (args.results / f"{args.out}.md").write_text(to_markdown(rows, commands, args,
                                                                     overrides))


if __name__ == "__main__":
    main()
