"""PNG plots of a report, drawn headless.

``matplotlib.figure.Figure`` is used directly (no ``pyplot``): it renders with the Agg
canvas, needs no display, and leaves the caller's pyplot backend and state untouched.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from .report import UnlearningReport

__all__ = ["render_plots", "plot_erm_mask", "plot_per_class_accuracy", "plot_cka",
           "plot_relearn", "plot_mia"]

_COLORS = {"model": "#d62728", "original": "#1f77b4", "retrained": "#2ca02c"}
# curves of different models often coincide (0% forget accuracy, CKA 1.0): distinct
# markers and line styles keep the one drawn underneath visible
_STYLE = {"model": ("o", "-", 5), "original": ("s", ":", 7), "retrained": ("^", "--", 10)}
_PAIR_STYLE = {"model~original": ("#d62728", "-", "o", 5),
               "model~retrained": ("#9467bd", "-", "o", 5),
               "retrained~original": ("#7f7f7f", "--", "s", 9)}
_FORGET_SHADE = "#fde0dd"


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def plot_erm_mask(report: UnlearningReport) -> bytes | None:
    """Heatmap of ``G`` (classes x channels); 0 is white, so forgotten rows look empty."""
    if report.erm is None:
        return None
    G = report.erm.G.numpy()
    C, K = G.shape
    fig = _figure(min(12.0, 4.0 + K / 40), min(9.0, 2.0 + 0.35 * C))
    ax = fig.add_subplot()
    im = ax.imshow(G, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=1)
    step = max(1, math.ceil(C / 30))  # at most ~30 class labels stay readable
    ticks = list(range(0, C, step))
    ax.set_yticks(ticks, [f"{c} (forget)" if c in report.forget_classes else str(c)
                          for c in ticks])
    for label, c in zip(ax.get_yticklabels(), ticks, strict=True):
        if c in report.forget_classes:
            label.set_color("#d62728")
            label.set_fontweight("bold")
    for c in report.forget_classes:  # frame the rows that should be empty
        ax.add_patch(_rect(c, K))
    ax.set_xlabel(f"channel (K = {K})")
    ax.set_ylabel("class")
    ax.set_title(f"ERM mask G (density {report.erm.l1_density:.3f}, CSI {report.erm.csi:.2f});"
                 " forget rows framed in red")
    fig.colorbar(im, ax=ax, label="G[c, k]", shrink=0.9)
    return _png(fig)


def _rect(row: int, width: int) -> Rectangle:
    from matplotlib.patches import Rectangle

    return Rectangle((-0.5, row - 0.5), width, 1, fill=False, edgecolor="#d62728", lw=1.5)


def plot_per_class_accuracy(report: UnlearningReport) -> bytes | None:
    """Grouped bars: test accuracy of every class for each model; forget classes shaded."""
    roles = [r for r in report.models if r in report.accuracy]
    if not roles:
        return None
    C = report.num_classes
    fig = _figure(min(14.0, 3.0 + 0.45 * C * max(1, len(roles)) / 1.5), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / len(roles)
    for c in report.forget_classes:
        ax.axvspan(c - 0.5, c + 0.5, color=_FORGET_SHADE, zorder=0)
    for i, role in enumerate(roles):
        accs = [100 * a if math.isfinite(a) else 0.0 for a in report.accuracy[role].per_class_test]
        xs = [c - 0.4 + width * (i + 0.5) for c in range(C)]
        ax.bar(xs, accs, width=width, color=_COLORS.get(role), label=role, zorder=2)
        for x, a in zip(xs, accs, strict=True):
            if a < 3:  # a 0% bar is invisible: write its value so "0" reads as measured
                ax.text(x, 1, f"{a:.0f}", ha="center", va="bottom", fontsize=7,
                        color=_COLORS.get(role), zorder=3)
    step = max(1, math.ceil(C / 40))
    ax.set_xticks(list(range(0, C, step)))
    ax.set_xlim(-0.6, C - 0.4)
    ax.set_ylim(0, 105)
    ax.set_xlabel("class (shaded = forget class)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Per-class test accuracy")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9)
    ax.grid(axis="y", alpha=0.3, zorder=1)
    return _png(fig)


def plot_cka(report: UnlearningReport) -> bytes | None:
    """CKA on forget-class test samples by layer, one line per model pair."""
    if not report.cka:
        return None
    longest = max(report.cka.values(), key=lambda r: len(r.layers))
    fig = _figure(max(6.0, 1.1 * len(longest.layers) + 2), 4.2)
    ax = fig.add_subplot()
    # the reference pair goes underneath, with bigger hollow markers
    for key in sorted(report.cka, key=lambda k: not k.startswith("retrained")):
        res = report.cka[key]
        a, b = key.split("~")
        color, line, marker, size = _PAIR_STYLE.get(key, (None, "-", "o", 5))
        ys = [v if math.isfinite(v) else float("nan") for v in res.values]
        ax.plot(range(len(ys)), ys, line, marker=marker, markersize=size, color=color,
                markerfacecolor="none" if size > 5 else color, label=f"{a} vs {b}")
    ax.set_xticks(range(len(longest.layers)), longest.layers, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer (of the evaluated model; last = pooled features)")
    ax.set_ylabel("linear CKA")
    ax.set_title("Layer-wise CKA on forget-class test samples")
    ax.legend(loc="lower left", framealpha=0.9)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_relearn(report: UnlearningReport) -> bytes | None:
    """Forget-class test accuracy against fine-tuning epochs, with the threshold."""
    if not report.relearn:
        return None
    fig = _figure(7.5, 4.0)
    ax = fig.add_subplot()
    threshold = budget = None
    # bigger hollow markers first, so a coinciding smaller curve stays visible on top
    for role in sorted(report.relearn, key=lambda r: -_STYLE.get(r, ("o", "-", 5))[2]):
        res = report.relearn[role]
        marker, line, size = _STYLE.get(role, ("o", "-", 5))
        ys = [100 * v if math.isfinite(v) else float("nan") for v in res.curve]
        ax.plot(range(len(ys)), ys, line, marker=marker, markersize=size, color=_COLORS.get(role),
                markerfacecolor="none" if size > 5 else _COLORS.get(role), label=role)
        threshold, budget = res.threshold, res.budget
    if threshold is not None:
        ax.axhline(100 * threshold, ls="--", color="grey",
                   label=f"threshold {100 * threshold:.0f}%")
    ax.set_xlim(-0.2, max(1, budget or 1) + 0.2)
    ax.set_xticks(range(0, max(1, budget or 1) + 1))
    ax.set_ylim(-4, 105)  # markers at 0% stay whole
    ax.set_xlabel("fine-tuning epoch on the full training set")
    ax.set_ylabel("forget-class test accuracy (%)")
    ax.set_title("Relearn time (curves stop at the threshold)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_mia(report: UnlearningReport) -> bytes | None:
    """Attack accuracy per model with fold std as error bars; 0.5 = chance."""
    roles = [r for r in report.models if r in report.mia]
    if not roles:
        return None
    fig = _figure(max(4.0, 1.4 * len(roles) + 1.5), 4.0)
    ax = fig.add_subplot()
    vals = [report.mia[r].accuracy for r in roles]
    errs = [report.mia[r].std if math.isfinite(report.mia[r].std) else 0.0 for r in roles]
    heights = [v if math.isfinite(v) else 0.0 for v in vals]
    ax.bar(roles, heights, yerr=errs, capsize=6, color=[_COLORS.get(r) for r in roles], zorder=2)
    for i, v in enumerate(vals):
        ax.text(i, (heights[i] + errs[i]) + 0.02, f"{v:.3f}" if math.isfinite(v) else "n/a",
                ha="center", va="bottom")
    ax.axhline(0.5, ls="--", color="grey", label="chance (0.5)", zorder=3)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("attack accuracy")
    ax.set_title("Membership inference on the forget set")
    ax.legend(loc="upper right", framealpha=0.9)
    ax.grid(axis="y", alpha=0.3, zorder=1)
    return _png(fig)


_PLOTS: dict[str, Callable[[UnlearningReport], bytes | None]] = {
    "erm_mask": plot_erm_mask,
    "per_class_accuracy": plot_per_class_accuracy,
    "cka_by_layer": plot_cka,
    "relearn_curves": plot_relearn,
    "mia": plot_mia,
}


def render_plots(report: UnlearningReport) -> dict[str, bytes]:
    """Every plot the report has data for, as ``{name: PNG bytes}``."""
    out = {}
    for name, draw in _PLOTS.items():
        data = draw(report)
        if data is not None:
            out[name] = data
    return out
