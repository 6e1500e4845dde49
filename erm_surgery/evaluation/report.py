"""The result of :func:`evaluate`: plain data, with JSON / Markdown / HTML / PNG output."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .accuracy import AccuracyResult
from .cka import CKAResult
from .entropy_mia import EntropyMIAResult
from .erm import ERMDiagnostics
from .fewshot import FewShotResult
from .files import atomic_write_bytes, atomic_write_text
from .knn import KNNResult
from .mia import MIAResult
from .probe import ProbeResult
from .relearn import RelearnResult
from .resources import ResourceUsage
from .verdict import Verdict
from .zrf import ZRFResult

__all__ = ["UnlearningReport", "pair_key", "ROLES"]

#: The models a report can hold, in column order.
ROLES: tuple[str, ...] = ("model", "original", "retrained")


def pair_key(a: str, b: str) -> str:
    """Key of a model pair in :attr:`UnlearningReport.cka` / ``knn`` (``"model~original"``)."""
    return f"{a}~{b}"


def _plain(obj: Any) -> Any:
    """``obj`` as JSON-ready data: dataclasses to dicts, NaN/inf to None, tensors to lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.compare}  # compare=False marks bulky fields (the G matrix)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _plain(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def _num(x: float | None) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if _num(x) else "n/a"


def _f3(x: float | None) -> str:
    if x is not None and isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.3f}" if _num(x) else "n/a"


def _ci(res: FewShotResult, k: int) -> str:
    """``"74.7% [71.6, 77.8]"``: the mean and its confidence interval at ``k`` shots."""
    if k not in res.shots:
        return "n/a"
    i = res.shots.index(k)
    if not (_num(res.ci_low[i]) and _num(res.ci_high[i])):
        return _pct(res.mean[i])
    return f"{_pct(res.mean[i])} [{100 * res.ci_low[i]:.1f}, {100 * res.ci_high[i]:.1f}]"


def _signed_pts(x: float | None) -> str:
    return f"{100 * x:+.1f} pts" if _num(x) else "n/a"


@dataclass
class UnlearningReport:
    """Everything :func:`evaluate` measured. Dicts are keyed by model role
    (``"model"``, ``"original"``, ``"retrained"``) or by a model pair (:func:`pair_key`).

    Attributes:
        forget_classes: the classes that should be forgotten.
        num_classes: C.
        models: roles that were evaluated.
        metrics: metrics that were requested.
        accuracy: per role.
        accuracy_deltas: per role, the change against ``original`` (fractions).
        mia: per role, loss-based MIA on forget-train vs forget-test.
        entropy_mia: per role, the SSD-style entropy MIA (a diagnostic: logits only).
        zrf: per role, the ZRF score (a diagnostic: logits only).
        probe: per role, the linear probe (knowledge retention).
        fewshot: per role, the few-shot probe (forget-class accuracy per number of shots).
        cka: per pair, layer-wise CKA on forget-class test samples.
        knn: per pair, k-NN retrieval agreement.
        relearn: per role, epochs to relearn the forget classes.
        erm: diagnostics of the model's ``G`` (None when it has none).
        resources: wall time and peak memory of the evaluation.
        config: the :class:`EvalConfig` used, as a dict.
        notes: metrics skipped and why, and other warnings.
        retrained_seeds: roles of the extra retrained references (``"retrained_2"``...):
            their per-model metrics are in the dicts above; they set the verdict's noise
            band.
        verdict: forgotten / not forgotten / inconclusive / broken, with the reason and
            each metric's position between the original and the retrained reference
            (None only on a report built by hand).
    """

    forget_classes: list[int]
    num_classes: int
    models: list[str]
    metrics: list[str]
    accuracy: dict[str, AccuracyResult] = field(default_factory=dict)
    accuracy_deltas: dict[str, dict[str, float]] = field(default_factory=dict)
    mia: dict[str, MIAResult] = field(default_factory=dict)
    entropy_mia: dict[str, EntropyMIAResult] = field(default_factory=dict)
    zrf: dict[str, ZRFResult] = field(default_factory=dict)
    probe: dict[str, ProbeResult] = field(default_factory=dict)
    fewshot: dict[str, FewShotResult] = field(default_factory=dict)
    cka: dict[str, CKAResult] = field(default_factory=dict)
    knn: dict[str, KNNResult] = field(default_factory=dict)
    relearn: dict[str, RelearnResult] = field(default_factory=dict)
    erm: ERMDiagnostics | None = None
    resources: ResourceUsage | None = None
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    retrained_seeds: list[str] = field(default_factory=list)
    verdict: Verdict | None = None

    # ----------------------------------------------------------------- plain data
    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (NaN becomes None; ``G`` is left out)."""
        return _plain(self)

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a JSON string (strict JSON: no NaN)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    # ----------------------------------------------------------------- summary table
    def _cka_pooled(self, a: str, b: str) -> float | None:
        res = self.cka.get(pair_key(a, b)) or self.cka.get(pair_key(b, a))
        return res.values[-1] if res is not None and res.values else None

    def _knn(self, a: str, b: str) -> float | None:
        res = self.knn.get(pair_key(a, b)) or self.knn.get(pair_key(b, a))
        return res.agreement if res is not None else None

    def summary_rows(self) -> list[tuple[str, list[str]]]:
        """``(row label, one formatted cell per role in self.models)`` of the main table."""
        roles = self.models
        rows: list[tuple[str, list[str]]] = []

        def add(label: str, cell: Any) -> None:
            rows.append((label, [cell(r) for r in roles]))

        if self.accuracy:
            for key, label in (("forget_test", "Forget acc (test)"),
                               ("forget_train", "Forget acc (train)"),
                               ("retain_test", "Retain acc (test)"),
                               ("retain_train", "Retain acc (train)")):
                add(label, lambda r, k=key: _pct(getattr(self.accuracy[r], k))
                    if r in self.accuracy else "n/a")
        if self.probe:
            add("Probe acc, forget classes (KR)",
                lambda r: _pct(self.probe[r].forget_acc) if r in self.probe else "n/a")
            add("Probe acc, retain classes",
                lambda r: _pct(self.probe[r].retain_acc) if r in self.probe else "n/a")
        if self.fewshot:
            shots = sorted({k for res in self.fewshot.values() for k in res.shots})
            for k in shots:
                add(f"Few-shot probe, forget classes (k={k})",
                    lambda r, k=k: _ci(self.fewshot[r], k) if r in self.fewshot else "n/a")
        if self.mia:
            add("MIA attack acc (0.5 = none)",
                lambda r: _f3(self.mia[r].accuracy) if r in self.mia else "n/a")
        if self.entropy_mia:
            add("Entropy MIA, members called (diagnostic)",
                lambda r: _f3(self.entropy_mia[r].member_fraction)
                if r in self.entropy_mia else "n/a")
        if self.zrf:
            add("ZRF (diagnostic)", lambda r: _f3(self.zrf[r].score) if r in self.zrf else "n/a")
        if self.cka:
            for ref in ("original", "retrained"):
                if any(ref in k.split("~") for k in self.cka):
                    add(f"CKA to {ref} (pooled)", lambda r, ref=ref: (
                        "1 (self)" if r == ref else _f3(self._cka_pooled(r, ref))))
        if self.knn:
            add("k-NN agreement with retrained",
                lambda r: "1 (self)" if r == "retrained" else _f3(self._knn(r, "retrained")))
        if self.relearn:
            def relearn_cell(r: str) -> str:
                res = self.relearn.get(r)
                if res is None:
                    return "n/a"
                if res.epochs_to_threshold is None:
                    return f"> {res.budget} (not reached)"
                return str(res.epochs_to_threshold)

            add("Relearn epochs to threshold", relearn_cell)
        return rows

    def to_markdown(self, images: list[str] | None = None) -> str:
        """A readable summary: side-by-side table, details, cost, notes.

        ``images``: PNG file names to link at the end (``save`` passes the plots it wrote).
        """
        lines = ["# Unlearning report", ""]
        lines.append(f"Forget classes: {self.forget_classes} of {self.num_classes}. "
                     f"Models: {', '.join(self.models)}.")
        lines.append("")
        if self.verdict is not None:
            lines += self._verdict_markdown()
        rows = self.summary_rows()
        if rows:
            lines += ["## Summary", "", _md_table(["Metric", *self.models], rows), ""]
        if self.accuracy_deltas:
            lines += ["## Accuracy change against the original", ""]
            keys = ("forget_test", "forget_train", "retain_test", "retain_train")
            lines.append(_md_table(["Model", *keys], [
                (r, [_signed_pts(d.get(k)) for k in keys]) for r, d in self.accuracy_deltas.items()
            ]))
            lines.append("")
        if self.accuracy:
            lines += ["## Per-class test accuracy (* = forget class)", ""]
            acc_rows = []
            for c in range(self.num_classes):
                mark = "*" if c in self.forget_classes else ""
                acc_rows.append((f"{c}{mark}", [
                    _pct(self.accuracy[r].per_class_test[c]) if r in self.accuracy else "n/a"
                    for r in self.models]))
            lines += [_md_table(["Class", *self.models], acc_rows), ""]
        if self.cka:
            lines += ["## Layer-wise CKA on forget-class test samples", ""]
            for key, res in self.cka.items():
                a, b = key.split("~")
                lines.append(f"**{a} vs {b}** ({res.n_samples} samples)")
                lines.append("")
                lines.append(_md_table([f"Layer ({a})", f"Layer ({b})", "CKA"], [
                    (la, [lb, _f3(v)])
                    for la, lb, v in zip(res.layers, res.reference_layers, res.values, strict=True)
                ]))
                lines.append("")
        if self.mia:
            lines += ["## Membership inference (forget-train vs forget-test losses)", ""]
            lines.append(_md_table(
                ["Model", "attack acc", "std", "n per side", "folds", "loss train", "loss test"],
                [(r, [_f3(m.accuracy), _f3(m.std), str(m.n_per_side), str(m.folds),
                      _f3(m.member_loss_mean), _f3(m.nonmember_loss_mean)])
                 for r, m in self.mia.items()]))
            lines.append("")
        if self.relearn:
            lines += ["## Relearn curves (forget-class test accuracy per epoch)", ""]
            for r, res in self.relearn.items():
                curve = ", ".join(_pct(v) for v in res.curve)
                lines.append(f"- {r}: {curve} (threshold {_pct(res.threshold)}, budget "
                             f"{res.budget} epochs, {res.seconds:.1f} s)")
            lines.append("")
        if self.erm is not None:
            e = self.erm
            lines += ["## ERM mask G", ""]
            lines.append(f"- shape {e.shape[0]} x {e.shape[1]}, L1 density {_f3(e.l1_density)}, "
                         f"CSI {_f3(e.csi)}, channels > 0.5 per class {e.ones_per_row:.2f}")
            lines.append(f"- zero rows: {e.zero_rows}; flagged forgotten: {e.forgotten}; "
                         f"every forget row zero: {'yes' if e.forget_rows_zero else 'no'}")
            lines.append("")
        if self.resources is not None:
            res = self.resources
            lines += ["## Cost of this evaluation", ""]
            mem = (f"{res.peak_memory_bytes / 2**20:.0f} MiB ({res.memory_source})"
                   if res.peak_memory_bytes is not None else "unknown")
            lines.append(f"- wall time {res.wall_time_s:.1f} s; peak memory {mem}")
            if res.peak_memory_increase_bytes is not None:
                lines.append(f"- process peak grew by {res.peak_memory_increase_bytes / 2**20:.0f}"
                             " MiB during the evaluation")
            if res.metric_seconds:
                lines.append("- per metric: " + ", ".join(
                    f"{k} {v:.1f} s" for k, v in res.metric_seconds.items()))
            lines.append("")
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        if images:
            lines += ["## Plots", ""] + [f"![{Path(i).stem}]({i})" for i in images] + [""]
        return "\n".join(lines)

    def verdict_rows(self) -> list[tuple[str, list[str]]]:
        """One row per metric of the verdict: kind, values, band, position, call."""
        if self.verdict is None:
            return []
        rows = []
        for p in self.verdict.metrics:
            seeds = ", ".join(_f3(v) for v in p.retrained_seeds)
            rows.append((p.name, [
                "verdict" if p.calibrated else f"diagnostic ({p.reads})",
                _f3(p.model), _f3(p.original),
                _f3(p.retrained) + (f" ({seeds})" if seeds else ""),
                _f3(p.band), _f3(p.position), p.call]))
        return rows

    def _verdict_markdown(self) -> list[str]:
        v = self.verdict
        assert v is not None
        lines = ["## Verdict", "", f"**{v.status.upper()}**: {v.reason}", "",
                 f"Rule: {v.rule}.", ""]
        rows = self.verdict_rows()
        if rows:
            lines += [_md_table(["Metric", "used as", "model", "original (0)",
                                 "retrained (1)", "noise band", "position", "call"], rows),
                      ""]
        return lines

    # ----------------------------------------------------------------- files
    def save(self, directory: str | os.PathLike[str], *, plots: bool = True,
             html: bool = True) -> dict[str, Path]:
        """Write ``report.json``, ``report.md``, the PNG plots and ``report.html``.

        Every file is written atomically (temporary file in the same folder, then
        ``os.replace``). ``html`` embeds the plots as base64, so the one file can be
        mailed around. Returns the paths written, keyed by file name.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        images: dict[str, bytes] = {}
        if plots:
            from .plots import render_plots  # matplotlib only when plots are wanted

            images = render_plots(self)
            for name, data in images.items():
                written[f"{name}.png"] = atomic_write_bytes(out / f"{name}.png", data)
        written["report.json"] = atomic_write_text(out / "report.json", self.to_json())
        written["report.md"] = atomic_write_text(
            out / "report.md", self.to_markdown([f"{n}.png" for n in images]))
        if html:
            from .html import render_html

            written["report.html"] = atomic_write_text(out / "report.html",
                                                       render_html(self, images))
        return written


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _md_table(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    out = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for label, cells in rows:
        out.append("| " + " | ".join(_md_cell(c) for c in [label, *cells]) + " |")
    return "\n".join(out)
