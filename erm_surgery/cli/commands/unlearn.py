"""``erm-surgery unlearn``: forget classes of a checkpoint with any registered method.

The method list and each method's options come from the registry
(:mod:`erm_surgery.unlearning.registry`): ``--method`` offers the methods whose
``MethodSpec.cli`` is True, and their settings are built from their config classes by
:mod:`erm_surgery.cli.method_options` (``--epochs``, ``--lr``, ... and ``--set FIELD=VALUE``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..common import (
    PROG,
    CLIError,
    Formatter,
    UsageError,
    echo,
    named_classes,
    parse_classes,
    positive_float,
    positive_int,
    wrap,
)
from ..data import (
    add_data_flags,
    data_for_checkpoint,
    load_matching_data,
    recorded_class_names,
    resolve_workers,
)
from ..method_options import CONVENIENCE_FLAGS, describe_fields, method_config, parse_assignment
from ..models import DATA_KEY, SPEC_KEY, load_checkpoint, read_checkpoint, save_checkpoint

NAME = "unlearn"
DEFAULT_METHOD = "ktp"

DESCRIPTION = ("Forget classes of a model trained by 'erm-surgery train'. The default "
               "method, KTP, distils a fresh student from the channels the forget classes "
               "do not use. The original checkpoint is kept unless --in-place.")

_EPILOG_HEAD = """\
The data (dataset, root, image size) and the architecture come from the checkpoint;
--dataset / --data-root override them (e.g. when the data moved).
"""

_EPILOG_OPTIONS = """\
method options: --epochs, --batch-size, --lr, --threshold and --distill-on set the field
of that name in the method's config (an error when it has none); --set FIELD=VALUE
(repeatable) sets any field listed above. --seed, --no-progress and --workers set seed,
show_progress and num_workers where the config has them. --recipe is KTP's.
"""

_EPILOG_EXAMPLES = f"""\
examples:
  {PROG} unlearn runs/model.safetensors --classes 3 7
  {PROG} unlearn runs/model.safetensors --classes cat dog --out runs/no-pets.safetensors
  {PROG} unlearn runs/model.safetensors --classes 2 --in-place   # no copy left behind
  {PROG} unlearn runs/model.safetensors --classes 3 --method finetune
  {PROG} unlearn runs/model.safetensors --classes 3 --method finetune --epochs 1 \\
      --set lr=0.05 --set optimizer=adam
  {PROG} unlearn runs/model.safetensors --classes 3 --method ktp_ec --set ktp.epochs=1
"""


def cli_methods() -> list[str]:
    """The methods ``--method`` offers: the default first, then the others by name (those
    whose ``MethodSpec.cli`` is False need state a checkpoint does not hold)."""
    from ...unlearning import available_methods, get_method

    names = [m for m in available_methods() if get_method(m).cli]
    return sorted(names, key=lambda m: (m != DEFAULT_METHOD, m))


def _methods_help(width: int = 90) -> str:
    """The epilog's list: each CLI method, its summary and its config's fields."""
    from ...unlearning import available_methods, get_method

    names = cli_methods()
    column = max(len(m) for m in names) + 4
    lines = ["methods (--method NAME; the fields --set takes, with their defaults):"]
    for name in names:
        spec = get_method(name)
        notes = [n for n, on in (("the default", name == DEFAULT_METHOD),
                                 ("needs ERM training", spec.needs_attached)) if on]
        summary = spec.summary + (f" [{'; '.join(notes)}]" if notes else "")
        lines += textwrap.wrap(summary, width, initial_indent=f"  {name:<{column - 2}}",
                               subsequent_indent=" " * column)
        lines += textwrap.wrap(describe_fields(spec.config_cls), width,
                               initial_indent=" " * (column + 2),
                               subsequent_indent=" " * (column + 2), break_on_hyphens=False)
    others = [m for m in available_methods() if not get_method(m).cli]
    if others:
        lines += textwrap.wrap(f"({', '.join(others)}: Python API only; they need state from "
                               "training that a checkpoint does not hold)", width,
                               initial_indent="  ", subsequent_indent="   ")
    return "\n".join(lines) + "\n"


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ...methods.ktp import KTPConfig

    ktp = KTPConfig()
    epilog = "\n".join([_EPILOG_HEAD, _methods_help(), _EPILOG_OPTIONS, _EPILOG_EXAMPLES])
    p = subparsers.add_parser(NAME, parents=[common], formatter_class=Formatter,
                              help="forget classes of a checkpoint",
                              description=wrap(DESCRIPTION), epilog=epilog)
    p.add_argument("checkpoint", help="a checkpoint written by erm-surgery train")
    p.add_argument("--classes", nargs="+", required=True, metavar="ID",
                   help="class ids (or names, e.g. cat) to forget")
    methods = cli_methods()
    p.add_argument("--method", choices=methods, default=DEFAULT_METHOD, metavar="NAME",
                   help=f"unlearning method, one of {', '.join(methods)} (listed below; "
                   "docs/methods.md, docs/baselines.md)")
    p.add_argument("--epochs", type=positive_int, metavar="N",
                   help=f"the method's epochs (KTP's default: {ktp.epochs} distillation "
                   "epochs)")
    p.add_argument("--batch-size", type=positive_int, metavar="N",
                   help=f"the method's batch size (KTP's default: {ktp.batch_size})")
    p.add_argument("--lr", type=positive_float, metavar="LR",
                   help=f"the method's learning rate (KTP's default: {ktp.lr})")
    p.add_argument("--threshold", type=float, metavar="T",
                   help="the method's threshold; KTP: a channel is prohibited when a forget "
                   f"class has G > T (default: {ktp.threshold})")
    p.add_argument("--recipe", choices=("default", "paper"),
                   help="KTP: 'default' adds a retain-label term to the feature "
                   "distillation (Adam lr 0.005); 'paper' is the reference code's feature MSE "
                   "only (SGD lr 0.1); both 2 epochs. --epochs/--lr/... override either "
                   "(default: default)")
    p.add_argument("--distill-on", choices=("retain", "all"),
                   help=f"KTP: distil on the retain data or on all data (default: "
                   f"{ktp.distill_on})")
    p.add_argument("--set", action="append", type=parse_assignment, metavar="FIELD=VALUE",
                   dest="set",
                   help="set a field of the method's config (repeatable), parsed by its type: "
                   "3, 0.5, true/false, text, None, a,b for lists; a nested config's field "
                   "as ktp.epochs=1")
    add_data_flags(p, from_checkpoint=True)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="Accelerate mixed precision (GPUs)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")
    p.add_argument("--out", metavar="PATH",
                   help="checkpoint to write (default: CHECKPOINT-forget-<ids>.safetensors)")
    p.add_argument("--in-place", action="store_true",
                   help="replace CHECKPOINT atomically (no copy of the original is left)")
    p.set_defaults(func=run)
    return p


# --------------------------------------------------------------------------- run


def _had_erm_epochs(meta: dict[str, Any]) -> bool:
    """Whether the checkpoint's recorded training ran an ERM epoch (True when unrecorded)."""
    history = ((meta.get("extra") or {}).get("training") or {}).get("history")
    if not history:
        return True
    return any(h.get("path") == "erm" for h in history)


def _test_accuracy(model: Any, data: Any, classes: Sequence[int], batch_size: int = 256,
                   workers: int = 0) -> tuple[float, float]:
    """(forget-class, retain-class) accuracy of ``model`` on ``data`` (one pass)."""
    import torch
    from torch.utils.data import DataLoader

    from ...evaluation.accuracy import class_set_accuracy
    from ...surgery import model_device, num_classes_of

    model.eval()
    device = model_device(model)
    preds, labels = [], []
    with torch.no_grad():
        for x, y in DataLoader(data, batch_size=batch_size, num_workers=workers):
            preds.append(model(x.to(device)).argmax(1).cpu())
            labels.append(y)
    pred, label = torch.cat(preds), torch.cat(labels)
    retain = [c for c in range(num_classes_of(model)) if c not in set(classes)]
    return class_set_accuracy(pred, label, classes), class_set_accuracy(pred, label, retain)


def _check_method(spec: Any, args: argparse.Namespace, meta: dict[str, Any]) -> None:
    """Refuse, before any loading, a method the checkpoint or the command cannot serve."""
    if not spec.reloadable:
        raise UsageError(f"method {spec.name!r} returns a model that erm_surgery.load() cannot "
                         "rebuild from the base model, so the command line cannot save it"
                         f"{' in place' if args.in_place else ''}; run it from Python "
                         "(erm_surgery.unlearn) and keep the result in memory")
    if spec.needs_attached and not _had_erm_epochs(meta):
        from ...unlearning import get_method

        free = [m for m in cli_methods() if not get_method(m).needs_attached]
        raise UsageError(f"{args.checkpoint} was trained without an ERM epoch (--plain, or "
                         "fewer epochs than the warm-up): its mask G is untrained, and method "
                         f"{spec.name!r} reads G (KTP would prohibit every channel). Train it "
                         "with ERM epochs, or pick a --method that does not need G: "
                         f"{', '.join(free)}")


def _check_request(classes: Sequence[int], meta: dict[str, Any], num_classes: int,
                   checkpoint: str) -> None:
    """Refuse classes the checkpoint has already forgotten, or forgetting every class."""
    done = set(meta.get("forgotten_classes") or [])
    already = sorted(set(classes) & done)
    if already:
        raise UsageError(f"classes {already} are already forgotten in {checkpoint}")
    if len(set(classes) | done) >= num_classes:
        raise UsageError("the request would forget every class; keep at least one")


def _check_output(src: Path, out: Path, in_place: bool) -> None:
    """Refuse, before any work, an output that would replace the original without
    --in-place, or that cannot be written (a folder, a parent that cannot be created)."""
    if in_place:
        return
    real = Path(os.path.realpath(out))
    if real == Path(os.path.realpath(src)):
        raise UsageError(f"--out {out} is the checkpoint itself; pass --in-place (without "
                         "--out) to replace it")
    if real.is_dir():
        raise UsageError(f"--out {out} is a folder; pass a file path such as "
                         f"{out / src.name}")
    parent = real.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write --out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write --out {out}: no permission to write in {parent}")


def run(args: argparse.Namespace) -> int:
    """Forget classes of a checkpoint; write the unlearned model to a new file (or in place)."""
    with contextlib.ExitStack() as hold:  # the --in-place write lock, if taken
        return _run(args, hold)


def _run(args: argparse.Namespace, hold: contextlib.ExitStack) -> int:
    from ...checkpoint import file_lock, other_links
    from ...surgery import is_attached
    from ...training import make_accelerator
    from ...unlearning import get_method, record_unlearning, unlearn

    method = get_method(args.method)
    meta, spec = read_checkpoint(args.checkpoint)
    names = recorded_class_names(meta)
    classes = parse_classes(args.classes, spec.num_classes, names)
    _check_request(classes, meta, spec.num_classes, args.checkpoint)
    options = {"flags": {field: getattr(args, field) for field in CONVENIENCE_FLAGS},
               "sets": args.set or [], "recipe": args.recipe}
    run_settings = {"seed": args.seed, "show_progress": not args.no_progress}
    method_config(method, **options, run=run_settings)  # every option error, before the data
    if args.in_place and args.out:
        raise UsageError("pass --out or --in-place, not both")
    src = Path(args.checkpoint)
    out = src if args.in_place else Path(
        args.out or src.with_name(f"{src.stem}-forget-{'-'.join(map(str, classes))}"
                                  f"{src.suffix}"))
    _check_output(src, out, args.in_place)
    _check_method(method, args, meta)
    dataset, root = data_for_checkpoint(args, meta)
    run_settings["num_workers"] = resolve_workers(args.workers, dataset)
    config = method_config(method, **options, run=run_settings)

    data = load_matching_data(dataset, root, spec, args.max_samples)
    accelerator = make_accelerator(args.mixed_precision)
    main = accelerator.is_main_process
    if args.in_place and main:
        # held from reading the teacher to the rename: a concurrent --in-place run waits,
        # then unlearns this run's result
        hold.enter_context(file_lock(src))
    model, meta, spec = load_checkpoint(src)
    if args.in_place:  # another run may have replaced the file since the checks above
        _check_request(classes, meta, spec.num_classes, args.checkpoint)
    if method.default_config is not None:
        # the method's defaults depend on the model (e.g. SISA's training config)
        config = method_config(method, **options, run=run_settings, model=model)
    if main:
        echo(f"data:  {data.describe()}")
        echo(f"model: {spec.model} from {src}; forgetting classes "
             f"{named_classes(classes, names)} with {args.method}")
    start = time.perf_counter()
    student = unlearn(model, classes, data.train_eval, method=args.method, config=config,
                      accelerator=accelerator)
    seconds = time.perf_counter() - start
    if not is_attached(student):
        raise CLIError(f"method {args.method!r} returned a plain {type(student).__name__}; "
                       "the command line saves attached models only (use the Python API)")
    if not main:
        return 0
    info = student.__dict__.get("unlearning_info")
    kept = {k: v for k, v in (meta.get("extra") or {}).items() if k not in (SPEC_KEY, DATA_KEY)}
    extra = record_unlearning(kept, info if info is not None else args.method,
                              source=str(src))
    links = other_links(out)  # hard links keep the original: say so (the library warns)
    save_checkpoint(student, out, spec, data.to_meta(), **extra)
    hold.close()
    forget_acc, retain_acc = _test_accuracy(student, data.test, classes)
    echo()
    if info is not None and hasattr(info, "prohibited_channels"):
        per_class = ", ".join(f"class {c}: {n}"
                              for c, n in info.channels_per_forget_class.items())
        echo(f"prohibited {info.prohibited_channels} of {info.num_channels} channels "
             f"({per_class})")
        lost = {c: f for c, f in getattr(info, "retain_channels_lost", {}).items() if f > 0.3}
        if lost:
            echo("retain classes losing > 30% of their channels: "
                 + ", ".join(f"{c}: {f:.0%}" for c, f in lost.items()))
    echo(f"test accuracy: forget classes {100 * forget_acc:.1f}%, retain classes "
         f"{100 * retain_acc:.1f}%  ({seconds:.1f} s)")
    if args.in_place and links:
        echo(f"saved {out} (replaced in place, but {links} other hard link(s) to it still "
             "hold the original: delete them too)")
    else:
        echo(f"saved {out}" + (" (replaced in place: no copy of the original is left)"
                               if args.in_place else ""))
    echo(f"next:  {PROG} evaluate {out}" + ("" if args.in_place else f" --original {src}"))
    return 0
