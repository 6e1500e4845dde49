"""KTP unlearning vs retraining from scratch, in one run, on MNIST-5k (real digits).

1. ERM quality (issue 3): the same tiny timm CNN trained for the same epochs with plain
   STD training and with ERM alternate training: STD test accuracy of both, CSI,
   L1-density, and the prohibition table (paper Table 2).
2. Unlearning (issue 4): for each forget set, KTP on the ERM model vs a model retrained
   from scratch on the retain data with the original recipe and budget: forget accuracy
   (train/test), retain accuracy, linear-probe accuracy on the forget classes (is the class
   gone from the features?), and the wall-time ratio unlearn / retrain.

    python benchmarks/unlearn_vs_retrain.py --epochs 16 --threads 2

Writes benchmarks/results/unlearn_vs_retrain.{json,md} and erm_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import timm
import torch

import erm_surgery
from erm_surgery.data import load_mnist5k, split_by_class
from erm_surgery.evaluation import EvalConfig, evaluate
from erm_surgery.methods.ktp import KTPConfig, ktp
from erm_surgery.training import ERMConfig
from erm_surgery.training.prohibition import prohibition_accuracy

RESULTS = Path(__file__).parent / "results"
STD_ONLY = ERMConfig(erm_every=10**6, warmup_epochs=0)


def fresh(model_name: str, seed: int) -> erm_surgery.ERMModel:
    torch.manual_seed(seed)
    return erm_surgery.attach(timm.create_model(model_name, num_classes=10, in_chans=1))


class Clock:
    """Wall time and this process's CPU time (robust when other jobs share the machine)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def timed_train(model, data, epochs: int, config: ERMConfig, **kw):
    with Clock() as clock:
        result = erm_surgery.train(model, data, epochs=epochs, config=config,
                                   show_progress=False, **kw)
    return result, clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--epochs", type=int, default=16, help="original training budget")
    parser.add_argument("--ktp-epochs", type=int, default=KTPConfig.epochs)
    parser.add_argument("--forget", default="3;1,4,6,9",
                        help="forget sets, ';'-separated, classes ','-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--ktp-extra", default="",
                        help="JSON of KTPConfig fields: a second KTP run per forget set on "
                             "the same original, against the same retrained model")
    args = parser.parse_args()
    extra = json.loads(args.ktp_extra) if args.ktp_extra else None
    torch.set_num_threads(args.threads)
    forget_sets = [[int(c) for c in part.split(",")] for part in args.forget.split(";")]
    train_set, test_set = load_mnist5k()
    args.out.mkdir(parents=True, exist_ok=True)
    setting = (f"{args.model} (in_chans=1), MNIST-5k {len(train_set)} train / "
               f"{len(test_set)} test at 32x32, CPU {args.threads} threads, "
               f"torch {torch.__version__}, seed {args.seed}")

    # ------------------------------------------------------------- 1. ERM quality
    plain = fresh(args.model, args.seed)
    plain_run, plain_s = timed_train(plain, train_set, args.epochs, STD_ONLY,
                                     val_data=test_set, seed=args.seed)
    original = fresh(args.model, args.seed)
    erm_run, erm_s = timed_train(original, train_set, args.epochs, ERMConfig(),
                                 val_data=test_set, seed=args.seed)
    table = prohibition_accuracy(original, test_set)
    last = erm_run.history[-1]
    quality = {
        "setting": setting, "epochs": args.epochs, "config": ERMConfig().to_dict(),
        "plain_std_test_accuracy": plain_run.history[-1].val_accuracy,
        "erm_std_test_accuracy": last.val_accuracy,
        "csi": last.csi, "csi_max": 10 * 9, "l1_density": last.l1_density,
        "target_density": ERMConfig().target_density, "ones_per_row": last.ones_per_row,
        "prohibition": table.to_dict(),
        "train_seconds": {"plain": plain_s.wall, "erm": erm_s.wall},
        "train_cpu_seconds": {"plain": plain_s.cpu, "erm": erm_s.cpu},
        "history": [h.__dict__ for h in erm_run.history],
    }
    (args.out / "erm_quality.json").write_text(json.dumps(quality, indent=2))
    q_md = [
        "# ERM training quality",
        "",
        f"`python benchmarks/unlearn_vs_retrain.py --epochs {args.epochs}` ({setting}).",
        "",
        "| | value |", "| --- | --- |",
        f"| STD test accuracy, plain training | {quality['plain_std_test_accuracy']:.4f} |",
        f"| STD test accuracy, ERM training | {quality['erm_std_test_accuracy']:.4f} |",
        f"| CSI (0 = orthogonal rows, max 90) | {last.csi:.2f} |",
        f"| L1-density (target {ERMConfig().target_density}) | {last.l1_density:.4f} |",
        f"| channels per class with G > 0.5 | {last.ones_per_row:.1f} |",
        f"| prohibited-class accuracy, mean | {table.mean_prohibited:.4f} |",
        f"| permitted-class accuracy, mean | {table.mean_permitted:.4f} |",
        f"| STD accuracy (same data) | {table.std_accuracy:.4f} |",
        f"| training CPU time plain / ERM (s) | {plain_s.cpu:.1f} / {erm_s.cpu:.1f} |",
        "",
        "Per class (prohibited accuracy, permitted accuracy, channels prohibited):",
        "",
        "| class | prohibited | permitted | channels |", "| --- | --- | --- | --- |",
    ]
    for c in range(10):
        q_md.append(f"| {c} | {table.prohibited[c]:.3f} | {table.permitted[c]:.3f} | "
                    f"{table.channels[c]} |")
    (args.out / "erm_quality.md").write_text("\n".join(q_md) + "\n")
    print("\n".join(q_md))

    # ------------------------------------------------------------- 2. unlearning
    rows = []
    eval_cfg = EvalConfig(seed=args.seed)
    for forget in forget_sets:
        retain_train, _ = split_by_class(train_set, forget)
        retrained = fresh(args.model, args.seed + 1)
        _, retrain_s = timed_train(retrained, retain_train, args.epochs, ERMConfig(),
                                   seed=args.seed)
        variants = [("defaults", {})] + ([("extra: " + args.ktp_extra, extra)]
                                         if extra else [])
        for label, overrides in variants:
            with Clock() as ktp_s:
                student, info = ktp(original, forget, train_set, config=KTPConfig(
                    **{"epochs": args.ktp_epochs, **overrides}, show_progress=False,
                    seed=args.seed))
            report = evaluate(student, forget, train_set, test_set, original=original,
                              retrained=retrained, metrics=("accuracy", "probe"),
                              config=eval_cfg)
            acc, probe = report.accuracy, report.probe
            row = {
                "forget": forget, "ktp": label, "batch_size": info.batch_size,
                "steps": info.steps, "peak_rss_mib": info.peak_rss_mib,
                "ktp_seconds": ktp_s.wall, "retrain_seconds": retrain_s.wall,
                "ktp_cpu_seconds": ktp_s.cpu, "retrain_cpu_seconds": retrain_s.cpu,
                "time_ratio": ktp_s.wall / retrain_s.wall,
                "cpu_time_ratio": ktp_s.cpu / retrain_s.cpu,
                "forget_acc_train": acc["model"].forget_train,
                "forget_acc_test": acc["model"].forget_test,
                "retain_acc_test": acc["model"].retain_test,
                "original_retain_acc_test": acc["original"].retain_test,
                "retrained_retain_acc_test": acc["retrained"].retain_test,
                "retrained_forget_acc_test": acc["retrained"].forget_test,
                "probe_forget_ktp": probe["model"].forget_acc,
                "probe_forget_retrained": probe["retrained"].forget_acc,
                "probe_forget_original": probe["original"].forget_acc,
                "prohibited_channels": info.prohibited_channels,
                "num_channels": info.num_channels,
                "retain_channels_lost": info.retain_channels_lost,
            }
            rows.append(row)
            print(json.dumps(row))
    result = {"setting": setting, "epochs": args.epochs, "ktp_config": KTPConfig().__dict__,
              "ktp_extra": extra,
              "device": "cpu", "machine": platform.machine(), "rows": rows}
    (args.out / "unlearn_vs_retrain.json").write_text(json.dumps(result, indent=2))
    md = [
        "# KTP unlearning vs retraining from scratch",
        "",
        f"`python benchmarks/unlearn_vs_retrain.py "
        f"{' '.join(shlex.quote(a) for a in sys.argv[1:])}` ({setting}; original and "
        f"retrained models: {args.epochs} epochs of `erm_surgery.train`; KTP: "
        f"{args.ktp_epochs} distillation epochs, defaults otherwise, or the overrides of "
        "its row).",
        "",
        "| forget | KTP | batch (steps) | forget acc train / test | retain acc test (KTP / "
        "original / retrained) | probe on forget classes (KTP / retrained / original) | "
        "channels prohibited | KTP s | retrain s | wall ratio | CPU-time ratio |",
        "| --- " * 11 + "|",
    ]
    for r in rows:
        md.append(
            f"| {r['forget']} | {r.get('ktp', 'defaults')} | {r.get('batch_size', 32)} "
            f"({r.get('steps', '?')}) "
            f"| {r['forget_acc_train']:.3f} / {r['forget_acc_test']:.3f} "
            f"| {r['retain_acc_test']:.4f} / {r['original_retain_acc_test']:.4f} / "
            f"{r['retrained_retain_acc_test']:.4f} | {r['probe_forget_ktp']:.3f} / "
            f"{r['probe_forget_retrained']:.3f} / {r['probe_forget_original']:.3f} | "
            f"{r['prohibited_channels']} of {r['num_channels']} | {r['ktp_seconds']:.1f} | "
            f"{r['retrain_seconds']:.1f} | {r['time_ratio']:.3f} | {r['cpu_time_ratio']:.3f} |")
    (args.out / "unlearn_vs_retrain.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
