"""Retrofit: attach ERM to an already-trained model, ERM fine-tune, then unlearn (issue 14).

Most users have a trained model. The recipe: plain training (the user's, here
``--plain-epochs`` of ``erm_surgery.train`` with no ERM epoch, which leaves ``G`` untouched:
the same as attaching a plainly trained model) -> ``attach`` -> a short ERM fine-tune with
``ERMConfig.retrofit()`` (every epoch on the ERM path) at a smaller lr -> KTP.

Per model and seed: the prohibited / permitted accuracy (paper Table 2, test split) after
each fine-tune epoch, the epochs needed to reach prohibited <= 5% as a fraction of the
original training budget, then KTP forgetting ``--forget``: forget and retain accuracy vs
the original and the fine-tune's wall time vs the plain training's.

    OMP_NUM_THREADS=1 python benchmarks/retrofit.py --models test_resnet resnet18

Writes ``benchmarks/results/retrofit.{json,md}``.
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
from erm_surgery.data import load_mnist5k
from erm_surgery.training import ERMConfig
from erm_surgery.training.prohibition import prohibition_accuracy
from erm_surgery.training.trainer import ERMTrainer

RESULTS = Path(__file__).parent / "results"
TARGET = 0.05


@torch.no_grad()
def accuracy(model, data, classes, keep: bool) -> float:
    x, y = data.tensors
    chosen = torch.isin(y, torch.tensor(classes, dtype=y.dtype)) == keep
    model.eval()
    pred = torch.cat([model(xb).argmax(1) for xb in x[chosen].split(500)])
    return float((pred == y[chosen]).float().mean())


class Traced(ERMTrainer):
    """Records the prohibition table after every epoch."""

    def __init__(self, *args, test_set=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.test_set, self.trace = test_set, []

    def _run_epoch(self, epoch, progress):
        out = super()._run_epoch(epoch, progress)
        table = prohibition_accuracy(self.model, self.test_set)
        self.trace.append({"epoch": epoch + 1, "std_acc": table.std_accuracy,
                           "prohibited": table.mean_prohibited,
                           "permitted": table.mean_permitted})
        self.model.train()
        print("   ", {k: round(v, 4) for k, v in self.trace[-1].items()}, flush=True)
        return out


def run_one(name: str, seed: int, args, train_set, test_set) -> dict:
    torch.manual_seed(seed)
    model = erm_surgery.attach(timm.create_model(name, num_classes=10, in_chans=1))
    kw = dict(batch_size=args.batch_size, seed=seed, show_progress=False)
    start = time.perf_counter()
    erm_surgery.train(model, train_set, epochs=args.plain_epochs,
                      config=ERMConfig(erm_every=10**6, warmup_epochs=0), **kw)
    plain_seconds = time.perf_counter() - start
    plain_acc = prohibition_accuracy(model, test_set).std_accuracy
    # the user's trained network, attached afresh (G = 0.5 everywhere)
    model = erm_surgery.attach(erm_surgery.detach(model))
    start = time.perf_counter()
    trainer = Traced(model, train_set, epochs=args.retrofit_epochs, lr=args.lr,
                     config=ERMConfig.retrofit(), test_set=test_set, **kw)
    trainer.fit()
    retrofit_seconds = time.perf_counter() - start
    reached = next((t["epoch"] for t in trainer.trace if t["prohibited"] <= TARGET), None)
    start = time.perf_counter()
    student = erm_surgery.unlearn(model, args.forget, train_set, show_progress=False)
    ktp_seconds = time.perf_counter() - start
    return {
        "model": name, "K": model.erm.G.shape[1], "seed": seed,
        "plain_epochs": args.plain_epochs, "plain_acc": plain_acc,
        "plain_seconds": plain_seconds, "retrofit_epochs": args.retrofit_epochs,
        "retrofit_seconds": retrofit_seconds, "trace": trainer.trace,
        "epochs_to_target": reached,
        "fraction_of_budget": None if reached is None else reached / args.plain_epochs,
        "final": trainer.trace[-1],
        "ktp_forget": accuracy(student, test_set, args.forget, True),
        "ktp_retain": accuracy(student, test_set, args.forget, False),
        "retrofit_retain": accuracy(model, test_set, args.forget, False),
        "ktp_seconds": ktp_seconds,
    }


def to_markdown(rows, argv, args) -> str:
    lines = [
        "# Retrofit: ERM fine-tune of a plainly trained model, then KTP", "",
        f"`python benchmarks/retrofit.py {' '.join(argv)}` (MNIST-5k, {args.n_train} train / "
        f"1000 test digits at 32x32; plain training {args.plain_epochs} epochs at lr 0.05; "
        f"ERM fine-tune `ERMConfig.retrofit()` at lr {args.lr}; KTP defaults forgetting "
        f"{args.forget}; torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} thread(s)).", "",
        "| model | K | seed | plain acc | fine-tune epochs to prohibited <= 5% (fraction of "
        "budget) | after fine-tune: STD / prohibited / permitted | KTP forget | KTP retain "
        "(teacher) | fine-tune s / plain s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        f = r["final"]
        reached = ("not reached" if r["epochs_to_target"] is None
                   else f"{r['epochs_to_target']} ({r['fraction_of_budget']:.2f})")
        lines.append(
            f"| {r['model']} | {r['K']} | {r['seed']} | {r['plain_acc']:.3f} | {reached} | "
            f"{f['std_acc']:.3f} / {f['prohibited']:.3f} / {f['permitted']:.3f} | "
            f"{r['ktp_forget']:.3f} | {r['ktp_retain']:.3f} ({r['retrofit_retain']:.3f}) | "
            f"{r['retrofit_seconds'] / r['plain_seconds']:.2f} |")
    lines += ["", "Per epoch of the fine-tune (STD / prohibited / permitted):", ""]
    for r in rows:
        trace = ", ".join(f"{t['epoch']}: {t['std_acc']:.3f} / {t['prohibited']:.3f} / "
                          f"{t['permitted']:.3f}" for t in r["trace"])
        lines.append(f"- {r['model']} seed {r['seed']}: {trace}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["test_resnet", "resnet18"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--plain-epochs", type=int, default=16)
    parser.add_argument("--retrofit-epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--forget", type=int, nargs="+", default=[3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="retrofit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_set, test_set = load_mnist5k(n_train=args.n_train)
    rows = []
    for name in args.models:
        for seed in args.seeds:
            print(f"{name} seed {seed}", flush=True)
            rows.append(run_one(name, seed, args, train_set, test_set))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / f"{args.out}.md").write_text(to_markdown(rows, argv, args))
    print(to_markdown(rows, argv, args))


if __name__ == "__main__":
    main()
