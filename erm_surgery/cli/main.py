"""The ``erm-surgery`` command line: ``demo``, ``train``, ``unlearn``, ``evaluate``.

    erm-surgery demo                        # MNIST-5k: train, forget 2 classes, evidence
    erm-surgery train --model resnet18 --dataset cifar10 --data-root ~/data --epochs 30
    erm-surgery unlearn runs/resnet18-cifar10.safetensors --classes 3 5
    erm-surgery evaluate runs/resnet18-cifar10-forget-3-5.safetensors \\
        --original runs/resnet18-cifar10.safetensors

This module holds the top-level parser, its common flags and the error handling; each
command (its flags beside its handler) is a module of :mod:`erm_surgery.cli.commands`.

Exit codes: 0 success, 2 usage error (bad flag, unknown model, bad class id), 1 runtime
error (missing dataset or checkpoint, a failure while working); errors are one line on
stderr, ``--traceback`` shows the Python traceback. Multi-GPU: run the same command under
``accelerate launch -m erm_surgery.cli ...`` or ``torchrun --nproc_per_node N -m
erm_surgery.cli ...`` (docs/cli.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from .commands import COMMANDS
from .common import PROG, CLIError, Formatter, one_line, wrap

__all__ = ["main", "build_parser"]

_TRACEBACK_ENV = "ERM_SURGERY_TRACEBACK"

DESCRIPTION = ("Class-level machine unlearning for timm and torchvision CNNs: ERM training, "
               "KTP unlearning, and the evidence that a class is gone.")

EPILOG = f"""\
examples:
  {PROG} demo                 # 2-5 minutes on a laptop CPU: train, forget 3 and 7, report
  {PROG} train --model test_resnet --dataset mnist5k --epochs 8
  {PROG} unlearn runs/test_resnet-mnist5k.safetensors --classes 3 7
  {PROG} evaluate runs/test_resnet-mnist5k-forget-3-7.safetensors \\
      --original runs/test_resnet-mnist5k.safetensors

exit codes: 0 ok, 2 usage error, 1 runtime error (one line on stderr; --traceback for more)
multi-GPU:  accelerate launch -m erm_surgery.cli train ...   (or torchrun -m erm_surgery.cli)
docs:       docs/cli.md, docs/quickstart.md
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``erm-surgery`` and its four subcommands."""
    from .. import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_argument("--traceback", action="store_true",
                        help=f"show the Python traceback of an error (or set "
                        f"{_TRACEBACK_ENV}=1)")
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=Formatter,
                                     description=wrap(DESCRIPTION), epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub, common)
    return parser


# --------------------------------------------------------------------------- main


def _format_warning(message: Warning | str, category: type[Warning], filename: str,
                    lineno: int, line: str | None = None) -> str:
    return f"{PROG}: warning: {one_line(message)}\n"


def _error_text(err: Exception) -> tuple[int, str]:
    """The exit code and the message of an error that reached the top."""
    from ..errors import ERMError

    if isinstance(err, CLIError):
        return err.exit_code, str(err)
    if isinstance(err, ERMError):
        return 1, str(err)
    if isinstance(err, ImportError):  # an optional dependency (mlxtend, matplotlib...)
        return 1, (f"{err}; the demo and the reports need the optional packages: "
                   "pip install 'erm-surgery[data,report]'")
    return 1, f"{type(err).__name__}: {err} (--traceback shows where)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 runtime error, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    show_traceback = args.traceback or os.environ.get(_TRACEBACK_ENV, "") not in ("", "0")
    where = f"{PROG} {args.command}"
    handler: Callable[[argparse.Namespace], int] = args.func
    saved_format, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output was piped into a command that stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:
        if show_traceback:
            raise
        code, text = _error_text(err)
        print(f"{where}: error: {one_line(text)}", file=sys.stderr)
        return code
    finally:
        warnings.formatwarning = saved_format


if __name__ == "__main__":
    sys.exit(main())
