"""``erm-surgery evaluate``: the evidence of forgetting for a checkpoint, and a report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..common import (
    PROG,
    Formatter,
    UsageError,
    echo,
    format_table,
    is_main_process,
    named_classes,
    nonneg_int,
    one_line,
    parse_classes,
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
from ..models import load_checkpoint, read_checkpoint

NAME = "evaluate"

DESCRIPTION = ("Measure how well a checkpoint forgot its classes (erm_surgery.evaluate): "
               "accuracy, membership inference, linear and few-shot probes, CKA and k-NN "
               "agreement with the references, relearn time, ERM mask diagnostics (entropy "
               "MIA and ZRF as labelled diagnostics), and a verdict: forgotten / not "
               "forgotten / inconclusive / broken. Writes report.json, report.md, "
               "report.html and PNG plots.")

EPILOG = f"""\
The forget classes default to those the checkpoint records as forgotten. Metrics that
need a reference (CKA, k-NN) are skipped with a note when --original / --retrained are
missing. The table's columns are the evaluated model and the references. The verdict
needs both --original and --retrained (inconclusive otherwise); two --retrained
checkpoints (two seeds) give it a measured noise band.

examples:
  {PROG} evaluate runs/model-forget-3-7.safetensors --original runs/model.safetensors
  {PROG} evaluate runs/model-forget-3-7.safetensors --original runs/model.safetensors \\
      --retrained runs/retrained.safetensors runs/retrained-seed2.safetensors \\
      --out reports/3-7
  {PROG} evaluate runs/model-forget-3-7.safetensors --metrics accuracy probe mia
"""


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ...evaluation import METRICS, EvalConfig

    ev = EvalConfig()
    p = subparsers.add_parser(NAME, parents=[common], formatter_class=Formatter,
                              help="measure the evidence of forgetting and write a report",
                              description=wrap(DESCRIPTION), epilog=EPILOG)
    p.add_argument("checkpoint", help="the unlearned model's checkpoint")
    p.add_argument("--classes", nargs="+", metavar="ID",
                   help="forget classes (default: those the checkpoint records as forgotten)")
    p.add_argument("--original", metavar="CKPT", help="the model before unlearning")
    p.add_argument("--retrained", metavar="CKPT", nargs="+",
                   help="a model retrained without the forget classes (erm-surgery train "
                   "--exclude-classes ... --plain); a second one (another seed) sets the "
                   "verdict's noise band")
    p.add_argument("--metrics", nargs="+", choices=METRICS, metavar="NAME",
                   default=list(METRICS),
                   help=f"metrics to compute (default: all of {', '.join(METRICS)})")
    p.add_argument("--relearn-epochs", type=nonneg_int, default=ev.relearn_epochs,
                   metavar="N", help="fine-tuning budget of the relearn-time metric")
    p.add_argument("--probe-epochs", type=positive_int, default=ev.probe_epochs,
                   metavar="N", help="epochs of the linear probe")
    p.add_argument("--batch-size", type=positive_int, default=ev.batch_size, metavar="N",
                   help="batch size of the evaluation passes")
    add_data_flags(p, from_checkpoint=True)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")
    p.add_argument("--out", metavar="DIR",
                   help="report folder (default: CHECKPOINT without .safetensors, plus "
                   "-report)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Measure the evidence of forgetting and write the report folder."""
    if not is_main_process():
        return 0  # evaluation runs on one process; the other ranks have nothing to do
    import torch
    from torch.utils.data import DataLoader

    from ...evaluation import EvalConfig, evaluate

    meta, spec = read_checkpoint(args.checkpoint)
    retrained_paths = list(args.retrained or [])
    ref_paths = {"original": args.original} if args.original else {}
    for i, path in enumerate(retrained_paths):
        ref_paths["retrained" if i == 0 else f"retrained_{i + 1}"] = path
    refs = {role: read_checkpoint(p) for role, p in ref_paths.items()}
    for role, (_, ref_spec) in refs.items():
        if ref_spec.num_classes != spec.num_classes or ref_spec.in_chans != spec.in_chans:
            raise UsageError(f"--{role} has {ref_spec.num_classes} classes x "
                             f"{ref_spec.in_chans} channels; the model has "
                             f"{spec.num_classes} x {spec.in_chans}")
    names = recorded_class_names(meta)
    if args.classes:
        classes = parse_classes(args.classes, spec.num_classes, names)
    else:
        classes = sorted(meta.get("forgotten_classes") or [])
        if not classes:
            raise UsageError(f"{args.checkpoint} has forgotten no class: pass --classes")
    if len(classes) >= spec.num_classes:
        raise UsageError("--classes covers every class; keep at least one")
    dataset, root = data_for_checkpoint(args, meta)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise UsageError(f"bad --device {device!r}: {one_line(err)}") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is visible to torch")
    src = Path(args.checkpoint)
    out = Path(args.out or src.with_name(f"{src.stem}-report"))

    data = load_matching_data(dataset, root, spec, args.max_samples)
    model, _, _ = load_checkpoint(src)
    references = {role: load_checkpoint(p)[0] for role, p in ref_paths.items()}
    retrained = [references[r] for r in ref_paths if r.startswith("retrained")]
    echo(f"data:  {data.describe()}")
    ref_text = ", ".join(f"{role} {path}" for role, path in ref_paths.items()) or "none"
    echo(f"model: {src} ({spec.model}); forget classes {named_classes(classes, names)}; "
         f"references: {ref_text}; on {device}")
    workers = resolve_workers(args.workers, dataset)

    def loader(ds: Any) -> Any:
        return DataLoader(ds, batch_size=args.batch_size, num_workers=workers) if workers \
            else ds

    config = EvalConfig(batch_size=args.batch_size, probe_epochs=args.probe_epochs,
                        relearn_epochs=args.relearn_epochs, seed=args.seed,
                        show_progress=not args.no_progress)
    report = evaluate(model, classes, loader(data.train_eval), loader(data.test),
                      original=references.get("original"),
                      retrained=retrained or None, metrics=args.metrics,
                      config=config, device=device)
    written = report.save(out, plots=not args.no_plots)
    rows = [[label, *cells] for label, cells in report.summary_rows()]
    echo()
    if report.verdict is not None:
        echo(report.verdict.line())
        echo()
    echo(format_table(["", *report.models], rows))
    for note in report.notes:
        echo(f"note: {note}")
    echo()
    echo(f"report: {out}/ ({', '.join(sorted(written))})")
    return 0
