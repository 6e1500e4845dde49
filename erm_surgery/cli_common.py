"""Pieces shared by the command line (``erm_surgery.cli``) and the demo: errors with exit
codes, class-id parsing, plain-text tables.

Nothing in the library imports this module; it imports nothing heavy (no torch), so the
command line can check its arguments before paying for the imports.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = ["CLIError", "UsageError", "parse_classes", "format_table", "one_line"]


class CLIError(Exception):
    """A failure the command line reports in one line, without a traceback (exit code 1)."""

    exit_code = 1


class UsageError(CLIError):
    """The command line asks for something that cannot be (exit code 2, like argparse)."""

    exit_code = 2


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def parse_classes(values: Iterable[str], num_classes: int,
                  class_names: Sequence[str] | None = None) -> list[int]:
    """Class ids from command-line tokens: ids (``3``), names (``cat``), or ``3,7`` lists.

    Returns the sorted distinct ids. Raises :class:`UsageError` for an id out of
    ``0..num_classes - 1``, an unknown name, or an empty list.
    """
    names = list(class_names or [])
    out: list[int] = []
    for token in (t for v in values for t in re.split(r"[,\s]+", str(v)) if t):
        if re.fullmatch(r"-?\d+", token):
            c = int(token)
            if not 0 <= c < num_classes:
                raise UsageError(f"class id {c} is out of range: the model has {num_classes} "
                                 f"classes (ids 0..{num_classes - 1})")
        elif token in names:
            c = names.index(token)
        else:
            hint = (f"; class names are {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}"
                    if names else "")
            raise UsageError(f"unknown class {token!r}: pass class ids 0..{num_classes - 1}"
                             f"{hint}")
        out.append(c)
    if not out:
        raise UsageError("no class given: pass class ids, e.g. --classes 3 7")
    return sorted(set(out))


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    table = [list(map(str, header)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                         strict=True)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(table[0]), rule, *(fmt(r) for r in table[1:])])
