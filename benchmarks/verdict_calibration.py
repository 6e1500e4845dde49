"""Which metrics can tell forgotten from not forgotten? The verdict's calibration cases.

For each of 3 seeds, on MNIST-5k (4,000 train / 1,000 test real digits, 32x32) with timm
``test_resnet`` (in_chans=1), forgetting classes 3 and 8:

- (a) the original: ``erm_surgery.train`` (ERM alternate training) for ``--epochs``;
- (b) logit-only: (a) with the forget classes' classifier rows blocked
  (``erm_surgery.evaluation.logit_only``), every feature the original's;
- (c) retrained without the classes: ``unlearn(a, ..., method="retrain")`` (same recipe,
  re-initialised, the retain data only), seed 100 + s;
- (d) a second retraining, seed 200 + s.

Every metric of ``erm_surgery.evaluate`` is measured on the four models the way the
report measures it (one ``evaluate`` call with model=(b), original=(a),
retrained=[(c), (d)]; a second one for (d)'s pairwise metrics, CKA and k-NN, and a direct
``relearn`` call for (d)). A metric *separates* when both |a - c| and |b - c| are at least
3x |c - d| (the seed-to-seed spread) on every seed, with (a) and (b) on the same side of
(c) (the verdict reads "beyond the retrained model" as forgotten, so a fake that lands
beyond it fools the metric however far); only such metrics may carry the verdict. The
verdict itself is then computed for (a) and (b) against [(c), (d)] and for (c) against
(d).

    OMP_NUM_THREADS=1 python benchmarks/verdict_calibration.py          # ~12 min, 1 core
    OMP_NUM_THREADS=1 python benchmarks/verdict_calibration.py --quick  # smoke run
    OMP_NUM_THREADS=1 python benchmarks/verdict_calibration.py --ktp --seeds 0

Writes benchmarks/results/verdict_calibration.{json,md} (``--quick``: ``.quick.``).
``--ktp`` instead judges a KTP student (``unlearn(a, ...)``, ``KTPConfig()`` defaults)
against the same kind of references, and writes ``verdict_calibration.ktp.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import timm
import torch
from torch.utils.data import Subset, TensorDataset

import erm_surgery as E
from erm_surgery.data import load_mnist5k
from erm_surgery.evaluation import (
    CALIBRATED,
    METRICS,
    EvalConfig,
    UnlearningReport,
    evaluate,
    judge,
    logit_only,
    relearn,
)
from erm_surgery.evaluation.features import class_indices, subset_loader

RESULTS = Path(__file__).parent / "results"
FORGET = [3, 8]
CASES = ("a", "b", "c", "d")
CASE_NAMES = {"a": "original", "b": "logit-only", "c": "retrained", "d": "retrained (seed 2)"}
PER_ROLE = ("accuracy", "mia", "entropy_mia", "zrf", "probe", "fewshot")
RATIO = 3.0


def _train_original(train: Any, epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = E.attach(timm.create_model("test_resnet", num_classes=10, in_chans=1))
    E.train(model, train, epochs=epochs, seed=seed, show_progress=False)
    return model.eval()


def _retrain(original: torch.nn.Module, train: Any, epochs: int, seed: int) -> torch.nn.Module:
    with warnings.catch_warnings():  # leaving the forget classes out is the point
        warnings.simplefilter("ignore")
        return E.unlearn(original, FORGET, train, method="retrain", epochs=epochs, seed=seed,
                         show_progress=False).eval()


def _per_role_values(rep: UnlearningReport, role: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    if role in rep.fewshot:
        res = rep.fewshot[role]
        for k in res.shots:
            out[f"fewshot@{k}"] = res.at(k)
    out["probe"] = rep.probe[role].forget_acc if role in rep.probe else None
    out["forget_acc"] = rep.accuracy[role].forget_test if role in rep.accuracy else None
    out["mia"] = rep.mia[role].accuracy if role in rep.mia else None
    out["entropy_mia"] = (rep.entropy_mia[role].member_fraction if role in rep.entropy_mia
                          else None)
    out["zrf"] = rep.zrf[role].score if role in rep.zrf else None
    return out


def _relearn_value(res: Any) -> float:
    # not reached within the budget: budget + 1 (the scale the verdict uses)
    return float(res.epochs_to_threshold if res.epochs_to_threshold is not None
                 else res.budget + 1)


def _rekeyed(rep: UnlearningReport, model: str, refs: list[str]) -> UnlearningReport:
    """``rep``'s per-model metrics with ``model`` as the evaluated model and ``refs`` as the
    retrained references: what evaluate(model, original=a, retrained=refs) would measure
    for them (the per-model metrics do not depend on the other roles)."""
    roles = {"model": model, "original": "original"}
    roles.update({("retrained" if i == 0 else f"retrained_{i + 1}"): r
                  for i, r in enumerate(refs)})
    out = UnlearningReport(forget_classes=rep.forget_classes, num_classes=rep.num_classes,
                           models=["model", "original", "retrained"],
                           metrics=[m for m in rep.metrics if m in PER_ROLE],
                           retrained_seeds=[r for r in roles if r.startswith("retrained_")])
    for name in PER_ROLE:
        table = getattr(rep, name)
        setattr(out, name, {new: table[old] for new, old in roles.items() if old in table})
    return out


def run_seed(seed: int, train: Any, test: Any, epochs: int, cfg: EvalConfig,
             log: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    a = _train_original(train, epochs, seed)
    b = logit_only(a, FORGET)
    c = _retrain(a, train, epochs, 100 + seed)
    d = _retrain(a, train, epochs, 200 + seed)
    t_train = time.perf_counter() - t0
    log(f"seed {seed}: trained a, c, d in {t_train:.0f} s")

    t0 = time.perf_counter()
    rep = evaluate(b, FORGET, train, test, original=a, retrained=[c, d],
                   metrics=[m for m in METRICS if m != "erm"], config=cfg)
    rep_d = evaluate(d, FORGET, train, test, original=a, retrained=c, metrics=["cka", "knn"],
                     config=cfg)
    idx = class_indices(torch.as_tensor(test.tensors[1]), FORGET)
    relearn_d = relearn(d, train, subset_loader(test, idx, cfg.batch_size),
                        epochs=cfg.relearn_epochs, lr=cfg.relearn_lr,
                        momentum=cfg.relearn_momentum, threshold=cfg.relearn_threshold,
                        batch_size=cfg.batch_size, seed=cfg.seed)
    t_eval = time.perf_counter() - t0
    log(f"seed {seed}: evaluated in {t_eval:.0f} s")

    roles = {"a": "original", "b": "model", "c": "retrained", "d": "retrained_2"}
    values = {case: _per_role_values(rep, role) for case, role in roles.items()}

    def pooled(r: UnlearningReport, key: str) -> float | None:
        res = r.cka.get(key)
        return res.values[-1] if res is not None and res.values else None

    values["a"].update(cka_to_original=1.0, cka_to_retrained=pooled(rep, "retrained~original"),
                       knn=rep.knn["original~retrained"].agreement,
                       relearn=_relearn_value(rep.relearn["original"]))
    values["b"].update(cka_to_original=pooled(rep, "model~original"),
                       cka_to_retrained=pooled(rep, "model~retrained"),
                       knn=rep.knn["model~retrained"].agreement,
                       relearn=_relearn_value(rep.relearn["model"]))
    values["c"].update(cka_to_original=pooled(rep, "retrained~original"), cka_to_retrained=1.0,
                       knn=1.0, relearn=_relearn_value(rep.relearn["retrained"]))
    values["d"].update(cka_to_original=pooled(rep_d, "model~original"),
                       cka_to_retrained=pooled(rep_d, "model~retrained"),
                       knn=rep_d.knn["model~retrained"].agreement,
                       relearn=_relearn_value(relearn_d))

    verdicts = {}
    retain = {r: res.retain_test for r, res in rep.accuracy.items()}
    for case, model_role, refs in (("a", "original", ["retrained", "retrained_2"]),
                                   ("b", "model", ["retrained", "retrained_2"]),
                                   ("c", "retrained", ["retrained_2"])):
        sub = _rekeyed(rep, model_role, refs)
        acc = {"model": retain[model_role], "original": retain["original"]}
        v = judge(sub, acc, retain_drop=cfg.retain_drop, seeds=sub.retrained_seeds)
        verdicts[case] = {"status": v.status, "reason": v.reason}
        log(f"seed {seed}: ({case}) {CASE_NAMES[case]}: {v.line()}")
    retain_acc = {case: retain.get(role) for case, role in roles.items()}
    return {"seed": seed, "values": values, "verdicts": verdicts, "retain_acc": retain_acc,
            "seconds": {"train": t_train, "evaluate": t_eval,
                        "evaluate_metrics": rep.resources.metric_seconds}}


def separation(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per metric: |a-c|, |b-c|, |c-d| per seed, the worst ratio, and whether it passes."""
    names = list(runs[0]["values"]["a"])
    out = {}
    for name in names:
        per_seed = []
        for run in runs:
            v = run["values"]
            x = {case: v[case].get(name) for case in CASES}
            if any(val is None or not math.isfinite(val) for val in x.values()):
                per_seed.append(None)
                continue
            ac, bc, cd = abs(x["a"] - x["c"]), abs(x["b"] - x["c"]), abs(x["c"] - x["d"])
            ratio = min(ac, bc) / cd if cd > 0 else (math.inf if min(ac, bc) > 0 else 0.0)
            same_side = (x["a"] - x["c"]) * (x["b"] - x["c"]) > 0
            per_seed.append({"a_c": ac, "b_c": bc, "c_d": cd, "ratio": ratio,
                             "same_side": same_side})
        ok = [s for s in per_seed if s is not None]
        worst = min((s["ratio"] for s in ok), default=None)
        sides = len(ok) == len(runs) and all(s["same_side"] for s in ok)
        out[name] = {"per_seed": per_seed, "worst_ratio": worst, "same_side": sides,
                     "passes": (len(ok) == len(runs) and worst is not None and worst >= RATIO
                                and sides),
                     "calibrated_in_library": name in CALIBRATED}
    return out


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return "inf" if math.isinf(x) else f"{x:.3f}"


def to_markdown(result: dict[str, Any]) -> str:
    runs, sep = result["runs"], result["separation"]
    lines = ["# Verdict calibration", "",
             f"`python benchmarks/verdict_calibration.py{' --quick' if result['quick'] else ''}`"
             f"; MNIST-5k ({result['n_train']} train / {result['n_test']} test), test_resnet, "
             f"{result['epochs']} epochs, forget {FORGET}, seeds {result['seeds']}, "
             f"{result['threads']} thread(s), {result['seconds']:.0f} s in all.", "",
             "Cases: (a) original, (b) logit-only (head rows blocked, original features), "
             "(c) retrained without the classes, (d) a second retrained seed. A metric "
             f"passes when min(|a-c|, |b-c|) >= {RATIO:g} x |c-d| on every seed, with (a) "
             "and (b) on the same side of (c).", "",
             "## Separation per metric (mean over seeds; worst ratio over seeds)", "",
             "| metric | a | b | c | d | abs(a-c) | abs(b-c) | abs(c-d) | worst ratio "
             "| a, b same side of c | passes | verdict uses it |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for name, s in sep.items():
        def mean_case(case: str, name: str = name) -> float | None:
            vals = [r["values"][case].get(name) for r in runs]
            vals = [v for v in vals if v is not None and math.isfinite(v)]
            return sum(vals) / len(vals) if vals else None

        def mean_gap(key: str, s: dict[str, Any] = s) -> float | None:
            vals = [p[key] for p in s["per_seed"] if p is not None]
            return sum(vals) / len(vals) if vals else None

        lines.append(f"| {name} | " + " | ".join(_fmt(mean_case(c)) for c in CASES) + " | "
                     + " | ".join(_fmt(mean_gap(k)) for k in ("a_c", "b_c", "c_d"))
                     + f" | {_fmt(s['worst_ratio'])} | {'yes' if s['same_side'] else 'no'}"
                     f" | {'yes' if s['passes'] else 'no'} | "
                     f"{'yes' if s['calibrated_in_library'] else 'no (diagnostic)'} |")
    lines += ["", "## Verdicts", "", "| seed | (a) original | (b) logit-only | (c) retrained |",
              "|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['seed']} | " + " | ".join(r["verdicts"][c]["status"]
                                                      for c in ("a", "b", "c")) + " |")
    lines += ["", "Reasons:", ""]
    for r in runs:
        for c in ("a", "b", "c"):
            lines.append(f"- seed {r['seed']} ({c}): {r['verdicts'][c]['reason']}")
    lines.append("")
    return "\n".join(lines)


def run_ktp(seed: int, train: Any, test: Any, epochs: int, cfg: EvalConfig,
            log: Any) -> dict[str, Any]:
    """The verdict on a KTP student (default config) of the seed's original."""
    from erm_surgery.methods.ktp import KTPConfig

    a = _train_original(train, epochs, seed)
    c = _retrain(a, train, epochs, 100 + seed)
    d = _retrain(a, train, epochs, 200 + seed)
    t0 = time.perf_counter()
    student = E.unlearn(a, FORGET, train, config=KTPConfig(seed=seed, show_progress=False))
    t_ktp = time.perf_counter() - t0
    rep = evaluate(student.eval(), FORGET, train, test, original=a, retrained=[c, d],
                   metrics=["accuracy", "mia", "entropy_mia", "zrf", "probe", "fewshot"],
                   config=cfg)
    log(f"seed {seed}: KTP ({t_ktp:.0f} s): {rep.verdict.line()}")
    return {"seed": seed, "ktp_seconds": t_ktp,
            "verdict": {"status": rep.verdict.status, "reason": rep.verdict.reason},
            "values": {case: _per_role_values(rep, role) for case, role in
                       (("ktp", "model"), ("a", "original"), ("c", "retrained"),
                        ("d", "retrained_2"))},
            "retain_acc": {r: res.retain_test for r, res in rep.accuracy.items()}}


def ktp_markdown(result: dict[str, Any]) -> str:
    lines = ["# Verdict on a KTP student", "",
             f"`python benchmarks/verdict_calibration.py --ktp --seeds "
             f"{' '.join(map(str, result['seeds']))}`; MNIST-5k, test_resnet, "
             f"{result['epochs']} epochs, forget {FORGET}, KTPConfig() defaults, "
             f"{result['seconds']:.0f} s in all.", "",
             "| seed | verdict | few-shot k=5: KTP / original / retrained / retrained 2 "
             "| retain acc KTP / original | reason |", "|---|---|---|---|---|"]
    for r in result["runs"]:
        v = r["values"]
        fs = " / ".join(_fmt(v[c].get("fewshot@5")) for c in ("ktp", "a", "c", "d"))
        ra = r["retain_acc"]
        lines.append(f"| {r['seed']} | {r['verdict']['status']} | {fs} | "
                     f"{_fmt(ra.get('model'))} / {_fmt(ra.get('original'))} | "
                     f"{r['verdict']['reason']} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true",
                        help="1,200 train / 400 test digits, 2 epochs, one seed")
    parser.add_argument("--ktp", action="store_true",
                        help="judge a KTP student instead of the calibration cases")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    start = time.perf_counter()
    train, test = load_mnist5k()
    epochs, seeds = args.epochs, args.seeds
    if args.quick:
        train = TensorDataset(*(t[:1200] for t in train.tensors))
        test = TensorDataset(*(t[:400] for t in test.tensors))
        epochs, seeds = 2, seeds[:1]
    assert not isinstance(train, Subset)
    cfg = EvalConfig(relearn_epochs=2, seed=0)

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {text}", flush=True)

    if args.ktp:
        runs = [run_ktp(s, train, test, epochs, cfg, log) for s in seeds]
        result = {"epochs": epochs, "seeds": seeds, "forget": FORGET, "runs": runs,
                  "threads": torch.get_num_threads(), "seconds": time.perf_counter() - start}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "verdict_calibration.ktp.json").write_text(
            json.dumps(_clean(result), indent=2, allow_nan=False))
        md = ktp_markdown(result)
        (args.out / "verdict_calibration.ktp.md").write_text(md)
        print(md)
        return
    runs = [run_seed(s, train, test, epochs, cfg, log) for s in seeds]
    result = {"quick": args.quick, "epochs": epochs, "seeds": seeds, "forget": FORGET,
              "n_train": len(train), "n_test": len(test), "threads": torch.get_num_threads(),
              "machine": platform.machine(), "config": cfg.to_dict(), "runs": runs,
              "separation": separation(runs), "seconds": time.perf_counter() - start}
    suffix = ".quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"verdict_calibration{suffix}.json").write_text(
        json.dumps(_clean(result), indent=2, allow_nan=False))
    md = to_markdown(result)
    (args.out / f"verdict_calibration{suffix}.md").write_text(md)
    print(md)


def _clean(x: Any) -> Any:
    """Strict JSON: an infinite ratio (no seed spread at all) as "inf", NaN as null."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else (None if math.isnan(x) else "-inf")
    return x


if __name__ == "__main__":
    main()
