"""``erm-surgery train``: ERM-train (or plainly train) a fresh model and save a checkpoint."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from ..common import (
    PROG,
    CLIError,
    Formatter,
    UsageError,
    echo,
    format_table,
    named_classes,
    nonneg_int,
    parse_classes,
    positive_float,
    positive_int,
    wrap,
)
from ..data import DEFAULT_IMAGE_SIZE, add_data_flags, check_data_root, load_data, resolve_workers
from ..models import ModelSpec, build_model, check_model_name, save_checkpoint

NAME = "train"

DESCRIPTION = ("Build a model (never pretrained), put the ERM mask on its last conv feature "
               "map and train it with ERM training (erm_surgery.train). Runs on the "
               "CPU, a GPU, or every GPU under accelerate launch / torchrun.")

EPILOG = f"""\
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


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, parents=[common], formatter_class=Formatter,
                              help="train a fresh model with ERM and save a checkpoint",
                              description=wrap(DESCRIPTION), epilog=EPILOG)
    p.add_argument("--model", required=True,
                   help="timm model name (resnet18, test_resnet, ...) or tv:<torchvision "
                   "builder> (tv:resnet18)")
    add_data_flags(p, from_checkpoint=False)
    p.add_argument("--image-size", type=positive_int, metavar="N",
                   help="side of the square input images (default: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_IMAGE_SIZE.items()) + ")")
    p.add_argument("--epochs", type=positive_int, default=16, metavar="N",
                   help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=128, metavar="N",
                   help="batch size (per process)")
    p.add_argument("--lr", type=positive_float, metavar="LR",
                   help="learning rate, cosine schedule to 0 (default: the model family's: "
                   "SGD 0.05 for BatchNorm CNNs, AdamW 2e-3 for LayerNorm ones)")
    p.add_argument("--weight-decay", type=float, metavar="WD",
                   help="weight decay (default: SGD 5e-4, AdamW 0.05)")
    p.add_argument("--erm-every", type=positive_int, metavar="N",
                   help="one ERM epoch every N epochs (default: 1, every epoch after the "
                        "warm-up; an ERM step also trains the standard path; 2 = the "
                        "paper's alternate training)")
    p.add_argument("--warmup-epochs", type=nonneg_int, metavar="N",
                   help="plain epochs before the first ERM epoch (default: 1)")
    p.add_argument("--density", type=positive_float, default=0.1, metavar="D",
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
    p.add_argument("--checkpoint-every", type=nonneg_int, default=0, metavar="N",
                   help="save a resumable training state every N epochs (0: never)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the state in RUN_DIR/checkpoint")
    p.set_defaults(func=run)
    return p


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def run(args: argparse.Namespace) -> int:
    """ERM-train (or plainly train) a fresh model and save an erm-surgery checkpoint."""
    import torch

    from ...data import split_by_class
    from ...surgery import attach
    from ...training import ERMConfig, make_accelerator, train

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
            schedule = {"erm_every": args.erm_every, "warmup_epochs": args.warmup_epochs}
            config = ERMConfig(target_density=args.density,  # unset: ERMConfig's defaults
                               **{k: v for k, v in schedule.items() if v is not None})
    except ValueError as err:
        raise UsageError(f"{err} (--density is a fraction in (0, 1])") from err

    accelerator = make_accelerator(args.mixed_precision)
    main = accelerator.is_main_process
    if main:
        echo(f"data:  {data.describe()}"
             + (f"; training without classes {named_classes(excluded, data.class_names)}"
                if excluded else ""))
    torch.manual_seed(args.seed)
    model = attach(build_model(spec))
    if main:
        s = model.surgery
        echo(f"model: {args.model} ({sum(p.numel() for p in model.model.parameters()):,} "
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
        num_workers=resolve_workers(args.workers, args.dataset),
        resume_from=run_dir / "checkpoint" if args.resume else None)
    seconds = time.perf_counter() - start
    if main:
        extra: dict[str, Any] = {"training": result.to_dict()}
        if excluded:
            extra["trained_without"] = excluded
        save_checkpoint(result.model, out, spec, data.to_meta(), **extra)
        rows = [[str(h.epoch + 1), h.path, f"{h.loss:.3f}", f"{100 * h.train_accuracy:.1f}%",
                 f"{100 * h.val_accuracy:.1f}%" if h.val_accuracy is not None else "-",
                 f"{h.csi:.2f}", f"{h.l1_density:.3f}", f"{h.seconds:.1f}"]
                for h in result.history]
        echo()
        echo(format_table(["epoch", "path", "loss", "train acc", "test acc", "CSI",
                           "L1 density", "s"], rows))
        echo()
        echo(f"saved {out} ({seconds:.0f} s of training; history in {run_dir}/history.json)")
        echo(f"next:  {PROG} unlearn {out} --classes <ids to forget>")
    return 0
