"""A self-contained HTML page of a report: tables plus plots embedded as base64 PNGs."""

from __future__ import annotations

import base64
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # import cycle otherwise: report.save imports this module lazily
    from .report import UnlearningReport

__all__ = ["render_html"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 0.5em 0 2em; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
"""


def _table(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in [label, *cells]) + "</tr>"
        for label, cells in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: UnlearningReport, images: dict[str, bytes]) -> str:
    """One HTML page: the summary table, every plot, and the full Markdown text."""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>Unlearning report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Unlearning report</h1>",
        f"<p>Forget classes: {escape(str(report.forget_classes))} of {report.num_classes}. "
        f"Models: {escape(', '.join(report.models))}.</p>",
    ]
    verdict = report.verdict
    if verdict is not None:
        parts += ["<h2>Verdict</h2>",
                  f"<p><strong>{escape(verdict.status.upper())}</strong>: "
                  f"{escape(verdict.reason)}</p>",
                  f"<p>Rule: {escape(verdict.rule)}.</p>"]
        vrows = report.verdict_rows()
        if vrows:
            parts.append(_table(["Metric", "used as", "model", "original (0)",
                                 "retrained (1)", "noise band", "position", "call"], vrows))
    rows = report.summary_rows()
    if rows:
        parts += ["<h2>Summary</h2>", _table(["Metric", *report.models], rows)]
    if images:
        parts.append("<h2>Plots</h2>")
        for name, data in images.items():
            b64 = base64.b64encode(data).decode("ascii")
            parts.append(f"<h3>{escape(name.replace('_', ' '))}</h3>"
                         f"<img alt='{escape(name)}' src='data:image/png;base64,{b64}'>")
    if report.notes:
        parts.append("<h2>Notes</h2><ul>"
                     + "".join(f"<li>{escape(n)}</li>" for n in report.notes) + "</ul>")
    parts += ["<h2>Details</h2>", f"<pre>{escape(report.to_markdown())}</pre>",
              "</body></html>"]
    return "\n".join(parts)
