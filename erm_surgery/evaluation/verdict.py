"""The verdict: forgotten, not forgotten, inconclusive or broken, with the reason.

Every metric value is placed on one scale per metric: 0 = the original model's value,
1 = the retrained reference's (a model trained without the forget classes, the gold
standard). The noise band is how far apart retrained references land: the spread of the
retrained seeds when several are given (``evaluate(..., retrained=[r1, r2])``), widened
to the confidence interval of the difference model - retrained (few-shot probe: the two
95% half-widths combined in quadrature) and to a floor (:data:`MIN_BAND`).

Only *calibrated* metrics (:data:`CALIBRATED`) decide. A metric is calibrated when, on
the calibration benchmark (``benchmarks/verdict_calibration.py``: an original, a
"logit-only" model whose head blocks the forget classes but whose features are the
original's, and two retrained seeds, on 3 seeds), both the original and the logit-only
model sit at least 3x the seed-to-seed spread away from the retrained model. Metrics
that read only the logits cannot pass: the logit-only model looks forgotten to them.
A metric on which the logit-only model lands beyond the retrained one (entropy MIA, ZRF)
fails too, however far: the verdict reads "beyond retrained" as forgotten. The others are
still placed on the scale, labelled diagnostics. On MNIST-5k the few-shot probe at k = 5
separates best (worst seed 16x the seed spread; k = 10: 4.8x), so it alone decides.

Rules, in order (the first that applies wins):

1. **broken**: the model's retain test accuracy is more than ``retain_drop`` (10 points
   by default) below the original's (the retrained reference's without an original).
   A model that forgot everything has not unlearned a class.
2. **inconclusive**: no retrained reference or no original (no scale), no calibrated
   metric measured, or none that separates the original from the retrained reference by
   at least 3 noise bands on this data.
3. **forgotten**: every usable calibrated metric puts the model within one noise band of
   the retrained reference, or beyond it.
4. **not forgotten**: otherwise; the reason says whether the model is indistinguishable
   from the original (within a band of it) or only part of the way to the retrained one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the report imports this module
    from .report import UnlearningReport

__all__ = ["Verdict", "MetricPosition", "judge", "CALIBRATED", "MIN_BAND", "STATUSES",
           "SEPARATION"]

#: Overall outcomes.
STATUSES: tuple[str, ...] = ("forgotten", "not forgotten", "inconclusive", "broken")

#: Metrics the verdict rests on (they passed the calibration benchmark, see the module doc).
CALIBRATED: frozenset[str] = frozenset({"fewshot@5"})

#: Smallest noise band per metric unit (fractions; relearn in epochs): a metric value
#: differing by less is read as the same, however close two retrained seeds happened to be.
MIN_BAND: dict[str, float] = {"relearn": 1.0}
_DEFAULT_MIN_BAND = 0.02

#: A metric separates the original from the retrained reference when their distance is at
#: least this many noise bands.
SEPARATION = 3.0


@dataclass
class MetricPosition:
    """Where the model falls on one metric, between the original (0) and retrained (1).

    Attributes:
        name: metric key (``"fewshot@5"``, ``"probe"``, ``"entropy_mia"``...).
        reads: what the metric looks at: ``"features"``, ``"logits"`` or
            ``"representation"`` (CKA, k-NN), or ``"weights"`` (relearn time).
        calibrated: the verdict rests on it (else a diagnostic).
        model: the model's value.
        original: the original's value.
        retrained: the (first) retrained reference's value.
        retrained_seeds: the other retrained references' values.
        band: noise band in the metric's unit (None without a retrained reference).
        position: ``(model - original) / (retrained - original)``; None when undefined.
        call: ``"like retrained"``, ``"like original"``, ``"between"``, ``"not separable"``
            (original and retrained closer than :data:`SEPARATION` bands) or ``"n/a"``.
    """

    name: str
    reads: str
    calibrated: bool
    model: float | None
    original: float | None
    retrained: float | None
    retrained_seeds: list[float] = field(default_factory=list)
    band: float | None = None
    position: float | None = None
    call: str = "n/a"


@dataclass
class Verdict:
    """The overall call on the model, and every metric's position.

    Attributes:
        status: one of :data:`STATUSES`.
        reason: one line saying why.
        rule: the rule that was applied, in words (for the report).
        retain_acc: retain test accuracy per role, as the ``broken`` rule read it.
        metrics: every metric's :class:`MetricPosition` (calibrated ones first).
    """

    status: str
    reason: str
    rule: str
    retain_acc: dict[str, float] = field(default_factory=dict)
    metrics: list[MetricPosition] = field(default_factory=list)

    def line(self) -> str:
        """``"Verdict: FORGOTTEN - reason"``: what the CLI and the demo print."""
        return f"Verdict: {self.status.upper()} - {self.reason}"


def _ok(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------- reading the report
def _values(report: UnlearningReport) -> list[tuple[str, str, dict[str, float]]]:
    """``(metric, reads, {role: value})`` for every metric the report holds."""
    out: list[tuple[str, str, dict[str, float]]] = []

    def per_role(name: str, reads: str, table: Mapping[str, Any],
                 get: Callable[[Any], float | None]) -> None:
        vals = {r: get(v) for r, v in table.items()}
        vals = {r: float(v) for r, v in vals.items() if _ok(v)}
        if vals:
            out.append((name, reads, vals))

    shots = sorted({k for res in report.fewshot.values() for k in res.shots})
    for k in shots:
        per_role(f"fewshot@{k}", "features", report.fewshot,
                 lambda res, k=k: res.at(k) if k in res.shots else None)
    per_role("probe", "features", report.probe, lambda res: res.forget_acc)
    per_role("forget_acc", "logits", report.accuracy, lambda res: res.forget_test)
    per_role("mia", "logits", report.mia, lambda res: res.accuracy)
    per_role("entropy_mia", "logits", report.entropy_mia, lambda res: res.member_fraction)
    per_role("zrf", "logits", report.zrf, lambda res: res.score)
    cka_orig = {"original": 1.0}
    cka_ret = {"retrained": 1.0}
    for key, res in report.cka.items():
        a, b = key.split("~")
        if res.values:
            if b == "original":
                cka_orig[a] = res.values[-1]
            elif b == "retrained":
                cka_ret[a] = res.values[-1]
    if len(cka_orig) > 1:
        out.append(("cka_to_original", "representation", cka_orig))
    if len(cka_ret) > 1:
        out.append(("cka_to_retrained", "representation", cka_ret))
    knn = {"retrained": 1.0}
    for key, res in report.knn.items():
        knn[key.split("~")[0]] = res.agreement
    if len(knn) > 1:
        out.append(("knn", "representation", knn))
    relearn = {r: float(res.epochs_to_threshold if res.epochs_to_threshold is not None
                        else res.budget + 1) for r, res in report.relearn.items()}
    if relearn:
        out.append(("relearn", "weights", relearn))
    return out


def _difference_width(report: UnlearningReport, name: str) -> float:
    """Confidence half-width of ``model - retrained`` on a few-shot metric (0 otherwise):
    both values are means over a few draws, so both carry noise."""
    return math.hypot(_half_width(report, name, "model"), _half_width(report, name, "retrained"))


def _half_width(report: UnlearningReport, name: str, role: str) -> float:
    """The few-shot probe's confidence half-width of ``role`` (0 for other metrics)."""
    if not name.startswith("fewshot@") or role not in report.fewshot:
        return 0.0
    hw = report.fewshot[role].half_width(int(name.split("@")[1]))
    return hw if _ok(hw) else 0.0


def _position(report: UnlearningReport, name: str, reads: str, vals: dict[str, float],
              seeds: list[str]) -> MetricPosition:
    o, r, m = vals.get("original"), vals.get("retrained"), vals.get("model")
    seed_vals = [vals[s] for s in seeds if s in vals]
    pos = MetricPosition(name=name, reads=reads, calibrated=name in CALIBRATED, model=m,
                         original=o, retrained=r, retrained_seeds=seed_vals)
    if r is None:
        return pos
    spread = max([r, *seed_vals]) - min([r, *seed_vals])
    pos.band = max(spread, _difference_width(report, name),
                   MIN_BAND.get(name, _DEFAULT_MIN_BAND))
    if o is None or m is None:
        return pos
    gap = abs(r - o)
    if gap > 0:
        pos.position = (m - o) / (r - o)
    if gap < SEPARATION * pos.band:
        pos.call = "not separable"
    elif pos.position is not None and pos.position >= 1 - pos.band / gap:
        pos.call = "like retrained"
    elif pos.position is not None and pos.position <= pos.band / gap:
        pos.call = "like original"
    else:
        pos.call = "between"
    return pos


# --------------------------------------------------------------- the verdict
def _rule(retain_drop: float) -> str:
    return (f"broken if retain test accuracy is more than {100 * retain_drop:.0f} points below "
            "the original's; forgotten if every calibrated metric "
            f"({', '.join(sorted(CALIBRATED))}) is within one noise band of the retrained "
            "reference or beyond it; inconclusive without a retrained reference and an "
            f"original, or when no calibrated metric separates them by {SEPARATION:g} bands")


def judge(report: UnlearningReport, retain_acc: Mapping[str, float], *,
          retain_drop: float = 0.10, seeds: list[str] | None = None) -> Verdict:
    """The verdict on ``report.models``' ``"model"`` (see the module doc for the rules).

    Args:
        report: the metrics measured (the verdict reads them, computes nothing new).
        retain_acc: retain-class test accuracy per role (``"model"``, ``"original"``,
            ``"retrained"``), for the broken rule.
        retain_drop: the largest retain-accuracy loss against the original that is not
            "broken" (a fraction).
        seeds: roles of the extra retrained references (noise band), e.g.
            ``["retrained_2"]``.
    """
    seeds = list(seeds or [])
    positions = [_position(report, name, reads, vals, seeds)
                 for name, reads, vals in _values(report)]
    positions.sort(key=lambda p: not p.calibrated)
    verdict = Verdict(status="inconclusive", reason="", rule=_rule(retain_drop),
                      retain_acc={r: float(v) for r, v in retain_acc.items() if _ok(v)},
                      metrics=positions)
    acc = verdict.retain_acc
    ref_role = "original" if "original" in acc else "retrained"
    if "model" in acc and ref_role in acc and acc["model"] < acc[ref_role] - retain_drop:
        verdict.status = "broken"
        verdict.reason = (f"retain accuracy collapsed: {100 * acc['model']:.1f}% against the "
                          f"{ref_role}'s {100 * acc[ref_role]:.1f}% (more than "
                          f"{100 * retain_drop:.0f} points lower)")
        return verdict
    if "retrained" not in report.models:
        verdict.reason = ("no retrained reference given (retrained=): nothing says what "
                          "'forgotten' looks like on this data, so no verdict is claimed")
        return verdict
    if "original" not in report.models:
        verdict.reason = ("no original given (original=): nothing says what 'not forgotten' "
                          "looks like on this data, so no verdict is claimed")
        return verdict
    calibrated = [p for p in positions if p.calibrated and p.call != "n/a"]
    if not calibrated:
        verdict.reason = ("no calibrated metric was measured (the few-shot probe needs the "
                          "metric 'fewshot' with shots 5 or 10 and a classifier layer)")
        return verdict
    usable = [p for p in calibrated if p.call != "not separable"]
    if not usable:
        p = calibrated[0]
        verdict.reason = (f"the original and the retrained reference are too close to tell "
                          f"apart on this data ({p.name}: {p.original:.3f} vs "
                          f"{p.retrained:.3f}, noise band {p.band:.3f})")
        return verdict
    worst = min(usable, key=lambda p: p.position if p.position is not None else -math.inf)
    text = (f"{worst.name} {worst.model:.3f}: original {worst.original:.3f}, retrained "
            f"{worst.retrained:.3f} +/- {worst.band:.3f} (position {worst.position:.2f})")
    if all(p.call == "like retrained" for p in usable):
        verdict.status = "forgotten"
        verdict.reason = f"like the retrained reference: {text}"
    elif any(p.call == "like original" for p in usable):
        verdict.status = "not forgotten"
        verdict.reason = f"not distinguishable from the original: {text}"
    else:
        verdict.status = "not forgotten"
        verdict.reason = f"only part of the way from the original to the retrained model: {text}"
    return verdict
