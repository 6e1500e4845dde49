"""Pieces shared by the commands (``erm_surgery.cli.commands``) and the demo: errors with
exit codes, argparse types and the help formatter, class-id parsing, output lines and
plain-text tables.

Nothing in the library imports this module; it imports nothing heavy (no torch), so the
command line can check its arguments before paying for the imports.
"""

from __future__ import annotations

import argparse
import os
import re
import textwrap
from collections.abc import Iterable, Sequence

__all__ = ["PROG", "CLIError", "UsageError", "parse_classes", "format_table", "one_line",
           "Formatter", "wrap", "positive_int", "nonneg_int", "positive_float", "echo",
           "is_main_process", "named_classes"]

#: the program name in help texts and error lines
PROG = "erm-surgery"


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
    from ..data import check_class_ids  # the library's one class-id check

    names = list(class_names or [])
    out: list[int] = []
    for token in (t for v in values for t in re.split(r"[,\s]+", str(v)) if t):
        if re.fullmatch(r"-?\d+", token):
            c = int(token)  # checked with the names' ids below
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
    return sorted(set(check_class_ids(out, num_classes, error=UsageError)))


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


# --------------------------------------------------------------------------- argparse


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's examples as written; adds a flag's default to its help when it
    has one worth showing and the help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False \
            or action.default == argparse.SUPPRESS
        if action.option_strings and not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


def wrap(text: str) -> str:
    """``text`` filled to the width of the help texts (a description)."""
    return textwrap.fill(text, width=90)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


# --------------------------------------------------------------------------- output


def echo(text: str = "") -> None:
    """One line of results on stdout, flushed (progress bars go to stderr)."""
    print(text, flush=True)


def is_main_process() -> bool:
    """False on the non-zero ranks of ``torchrun`` / ``accelerate launch``."""
    return os.environ.get("RANK", "0") == "0"


def named_classes(classes: Sequence[int], names: Sequence[str]) -> str:
    """``3 (cat), 5 (dog)`` when the classes have names other than their ids, else ``3, 5``."""
    if names and any(names[c] != str(c) for c in classes):
        return ", ".join(f"{c} ({names[c]})" for c in classes)
    return ", ".join(str(c) for c in classes)
