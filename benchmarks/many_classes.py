"""ERM and KTP with 100 classes: two-digit numbers built from real MNIST-5k digits (issue 13).

Data: :func:`erm_surgery.data.load_two_digit_mnist` (class ``10a + b``, an image of two
digits side by side; train pairs from the train digits, test pairs from the test digits).
Per model: ERM training with ``train()`` defaults; channels per class, how much the rows of
``G`` overlap (mean Jaccard of the used channels, for pairs of classes that share a digit
and for pairs that share none), the prohibition table; then KTP forgetting ``--forget``
(the design card's ``[12, 40]``) against a model retrained without them: forget / retain
accuracy, the report's probe and few-shot probe, and unlearn time / retrain time.

    OMP_NUM_THREADS=1 python benchmarks/many_classes.py --models test_resnet resnet18

Writes ``benchmarks/results/many_classes.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import timm
import torch

import erm_surgery
from erm_surgery.data import load_two_digit_mnist, split_by_class
from erm_surgery.training import g_metrics
from erm_surgery.training.prohibition import prohibition_accuracy

RESULTS = Path(__file__).parent / "results"


def overlap(G: torch.Tensor) -> dict[str, float]:
    """Mean Jaccard index of the used channels (G > 0) over class pairs that share a digit
    (12 and 13, 12 and 42) and over pairs that share none (12 and 34)."""
    used = (G > 0).float()
    inter = used @ used.T
    union = used.sum(1, keepdim=True) + used.sum(1) - inter
    jac = inter / union.clamp_min(1)
    share, apart = [], []
    for a in range(100):
        for b in range(a + 1, 100):
            shares = a // 10 == b // 10 or a % 10 == b % 10
            (share if shares else apart).append(float(jac[a, b]))
    return {"jaccard_share_a_digit": sum(share) / len(share),
            "jaccard_share_none": sum(apart) / len(apart)}


@torch.no_grad()
def accuracy(model, data, classes, keep: bool) -> float:
    x, y = data.tensors
    chosen = torch.isin(y, torch.tensor(classes)) == keep
    model.eval()
    pred = torch.cat([model(xb).argmax(1) for xb in x[chosen].split(500)])
    return float((pred == y[chosen]).float().mean())


def run_one(name: str, args, train_set, test_set) -> dict:
    def fresh():
        torch.manual_seed(args.seed)
        return erm_surgery.attach(timm.create_model(name, num_classes=100, in_chans=1))

    model = fresh()
    kw = dict(epochs=args.epochs, seed=args.seed, show_progress=False)
    start = time.perf_counter()
    erm_surgery.train(model, train_set, **kw)
    train_seconds = time.perf_counter() - start
    G = model.erm.G.detach()
    table = prohibition_accuracy(model, test_set)
    row = {"model": name, "K": G.shape[1], "epochs": args.epochs,
           "std_acc": table.std_accuracy, "prohibited": table.mean_prohibited,
           "permitted": table.mean_permitted, "csi": float(g_metrics.csi(G)),
           "density": float(g_metrics.l1_density(G)),
           "channels_per_class": float((G > 0).sum(1).float().mean()),
           "prohibited_of_forget": {c: table.prohibited[c] for c in args.forget}
           if hasattr(table, "prohibited") else None,
           **overlap(G), "train_seconds": train_seconds}
    print("   ERM:", {k: v for k, v in row.items() if not isinstance(v, dict)}, flush=True)
    start = time.perf_counter()
    student = erm_surgery.unlearn(model, args.forget, train_set, show_progress=False)
    row["unlearn_seconds"] = time.perf_counter() - start
    info = student.unlearning_info
    row["retain_channels_lost_max"] = max(info.retain_channels_lost.values(), default=0.0)
    retain_set, _ = split_by_class(train_set, args.forget)
    retrained = fresh()
    start = time.perf_counter()
    erm_surgery.train(retrained, retain_set, **kw)
    row["retrain_seconds"] = time.perf_counter() - start
    row["time_ratio"] = row["unlearn_seconds"] / row["retrain_seconds"]
    for role, m in (("student", student), ("original", model), ("retrained", retrained)):
        row[f"{role}_forget"] = accuracy(m, test_set, args.forget, True)
        row[f"{role}_retain"] = accuracy(m, test_set, args.forget, False)
    report = erm_surgery.evaluate(student, args.forget, train_set, test_set, original=model,
                                  retrained=retrained, metrics=["accuracy", "probe", "fewshot"])
    row["report"] = report.to_dict()
    verdict = getattr(report, "verdict", None)
    row["verdict"] = (None if verdict is None
                      else {"status": verdict.status, "reason": verdict.reason})
    print("   KTP:", {k: v for k, v in row.items() if k != "report"}, flush=True)
    return row


def verdict_line(row: dict) -> str:
    """One sentence: the evaluation's verdict on the student and why."""
    verdict = row.get("verdict")
    if not verdict:
        return f"{row['model']}: no verdict (no retrained reference)"
    return f"{row['model']}: verdict **{verdict['status']}**: {verdict['reason']}."


def to_markdown(rows, argv, args) -> str:
    lines = [
        "# 100 classes: two-digit numbers from MNIST-5k", "",
        f"`python benchmarks/many_classes.py {' '.join(argv)}` ({args.per_class_train} train / "
        f"{args.per_class_test} test pairs per class, 1x32x64, `train()` defaults for "
        f"{args.epochs} epochs, KTP defaults forgetting {args.forget}; torch "
        f"{torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s)).", "",
        "| model | K | STD acc | channels/class | Jaccard (share a digit / none) | "
        "prohibited | permitted | KTP forget | retain: KTP / original / retrained | "
        "unlearn / retrain time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['K']} | {r['std_acc']:.3f} | {r['channels_per_class']:.1f} | "
            f"{r['jaccard_share_a_digit']:.3f} / {r['jaccard_share_none']:.3f} | "
            f"{r['prohibited']:.3f} | {r['permitted']:.3f} | {r['student_forget']:.3f} | "
            f"{r['student_retain']:.3f} / {r['original_retain']:.3f} / "
            f"{r['retrained_retain']:.3f} | {r['time_ratio']:.2f} |")
    for r in rows:
        lines += ["", verdict_line(r)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["test_resnet", "resnet18"])
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--per-class-train", type=int, default=40)
    parser.add_argument("--per-class-test", type=int, default=10)
    parser.add_argument("--forget", type=int, nargs="+", default=[12, 40])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="many_classes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_set, test_set = load_two_digit_mnist(args.per_class_train, args.per_class_test)
    rows = [run_one(name, args, train_set, test_set) for name in args.models]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(rows, indent=2, default=str))
    (RESULTS / f"{args.out}.md").write_text(to_markdown(rows, argv, args))
    print(to_markdown(rows, argv, args))


if __name__ == "__main__":
    main()
