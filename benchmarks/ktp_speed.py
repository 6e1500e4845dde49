"""A KTP epoch against a training epoch: seconds, ratio, peak memory, retain accuracy.

For each model: ERM-train a teacher on MNIST-5k (4,000 train / 1,000 test digits at
32x32), then, on the same retain data (all classes but the forget set):

- a training epoch: plain supervised training of a fresh copy of the model at
  :func:`erm_surgery.train`'s batch 128 (``--train-epochs`` epochs, seconds / epoch), in
  float32 and NCHW (the library's default) and in each student's setup: bfloat16
  autocast (``mixed_precision="bf16"``) for a bfloat16 student, NHWC
  (``channels_last=True``) for an NHWC one;
- a KTP epoch: ``ktp`` with each KTP recipe below, its total time (teacher pass, cache,
  distillation) divided by its epochs, so the teacher pass is amortised.

Training references and KTP recipes are timed in ``--rounds`` interleaved rounds (medians
reported), so that a change in machine load hits both sides of a ratio alike. Seconds are
this process's CPU seconds (``time.process_time``: robust when other jobs
share the machine; run with ``OMP_NUM_THREADS=1`` so that CPU time is compute time) and
wall seconds. Peak memory: the process's resident set during the call and its rise over
the resident set before it, and on CUDA ``max_memory_allocated``, both measured the same
way for training and KTP (:class:`erm_surgery.methods.ktp.memory.PeakMemory`, which also
fills ``KTPInfo.peak_rss_mib`` / ``cuda_peak_mib``).

    OMP_NUM_THREADS=1 python benchmarks/ktp_speed.py --models test_resnet,resnet18

Writes benchmarks/results/ktp_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from statistics import median

import torch
from accelerate.state import AcceleratorState
from torch.utils.data import Subset, TensorDataset
from unlearn_vs_retrain import STD_ONLY, Clock, fresh  # sibling script

import erm_surgery
from erm_surgery.data import load_mnist5k
from erm_surgery.evaluation import evaluate
from erm_surgery.methods.ktp import KTPConfig, ktp
from erm_surgery.methods.ktp.layout import student_wants_channels_last
from erm_surgery.methods.ktp.memory import PeakMemory
from erm_surgery.training import ERMConfig

RESULTS = Path(__file__).parent / "results"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: KTP before issue 18: batch 32 whatever the data, lr 0.005
OLD = KTPConfig(batch_size=32, max_batch_size=32, lr=0.005, show_progress=False)
RECIPES = {"before (batch 32)": replace(OLD, teacher_channels_last=False,
                                       teacher_precision="float32"),
           # the default before the linear rule and the NHWC teacher pass (issue 18)
           "min_steps 200, sqrt, teacher NCHW": KTPConfig(
               min_steps=200, lr_scaling="sqrt", warmup_steps=0,
               teacher_channels_last=False, teacher_precision="float32",
               show_progress=False),
           "default": KTPConfig(show_progress=False),
           "default, teacher NCHW": KTPConfig(teacher_channels_last=False,
                                              show_progress=False),
           # the default before teacher_precision="auto" (bfloat16 where fast)
           "default, teacher float32": KTPConfig(teacher_precision="float32",
                                                 show_progress=False),
           # the default before student_precision="auto" (bfloat16 steps where fast)
           "default, student float32": KTPConfig(student_precision="float32",
                                                 show_progress=False),
           # bfloat16 steps whatever the model ("auto" keeps float32 for depthwise
           # convolutions on a CPU)
           "default, student bfloat16": KTPConfig(student_precision="bfloat16",
                                                  show_progress=False),
           # the student in NHWC too: timed against a training epoch in NHWC
           "default, student NHWC": KTPConfig(channels_last=True, show_progress=False),
           # the student's steps in NCHW (the default before channels_last="auto" took
           # NHWC on a CPU)
           "default, student NCHW": KTPConfig(channels_last=False, show_progress=False),
           # the best trade-off measured (ktp_batch_warmup/ktp_recipe.md): batch 64 on
           # MNIST-5k's nine cases, lr 0.005 * 64 / 32 with a 20-step warmup
           "batch 64, linear lr, warmup 20": KTPConfig(min_steps=64, max_batch_size=64,
                                                       lr_scaling="linear",
                                                       warmup_steps=20,
                                                       show_progress=False),
           # the fastest recipe tried: 56 steps at batch 128, linear lr with a warmup
           "batch 128, lr 0.02, warmup 10": KTPConfig(batch_size=128, max_batch_size=128,
                                                      lr=0.02, warmup_steps=10,
                                                      show_progress=False)}


def _memory(peak: PeakMemory) -> dict:
    """A :class:`PeakMemory` block's figures for the JSON (MiB)."""
    return {"rss_peak_mib": peak.peak_rss_mib,
            "rss_rise_mib": peak.peak_rss_mib - peak.rss_before_mib,
            "cuda_peak_mib": peak.cuda_peak_mib}


def _shifted_copies(images: torch.Tensor, labels: torch.Tensor, copies: int,
                    seed: int) -> TensorDataset:
    """``images`` and ``copies - 1`` copies of them, each shifted by a random offset of up
    to 2 px (one offset per copy and image, seeded; the digits' zero border wraps round)."""
    g = torch.Generator().manual_seed(seed)
    parts = [images]
    for _ in range(copies - 1):
        shifts = torch.randint(-2, 3, (len(images), 2), generator=g).tolist()
        parts.append(torch.stack([img.roll((dy, dx), dims=(-2, -1))
                                  for img, (dy, dx) in zip(images, shifts, strict=True)]))
    return TensorDataset(torch.cat(parts), labels.repeat(copies))


def _train_epoch(name: str, retain: Subset, key: tuple[str, bool],
                 args: argparse.Namespace) -> tuple[Clock, PeakMemory]:
    """Plain supervised training of a fresh copy of ``name`` on ``retain``, timed: ``key`` =
    (Accelerate's mixed precision, channels_last)."""
    mixed_precision, nhwc = key
    plain = fresh(name, args.seed + 1)
    # Accelerate allows one mixed-precision setting per process: a fresh state for each
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with Clock() as clock, PeakMemory(DEVICE) as peak, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "classes [3] have no samples": on purpose
            erm_surgery.train(plain, retain, epochs=args.train_epochs, config=STD_ONLY,
                              seed=args.seed, show_progress=False, channels_last=nhwc,
                              mixed_precision=mixed_precision)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return clock, peak


def render(data: dict) -> list[str]:
    """The Markdown table of one run's JSON."""
    md = ["# A KTP epoch against a training epoch", "",
          f"`{data.get('command', 'python benchmarks/ktp_speed.py')}` ({data['setting']}).",
          *([data["note"]] if "note" in data else []), "",
          "Training epoch: plain supervised training of the same model on the same retain "
          "data with `erm_surgery.train` at batch 128, float32 and NCHW: the library's "
          "default (results from before 2026-12-04: in the student's layout). KTP "
          "epoch: the whole `ktp` call (teacher pass included) / its epochs. CPU seconds of "
          "this process, median of the interleaved rounds; ratio = KTP / training (wall "
          "ratio in brackets); 'same setup' = KTP / a training epoch in the student's "
          "arithmetic and layout (`mixed_precision='bf16'` for a bfloat16 student, "
          "`channels_last=True` for an NHWC one); 'steps only' = "
          "the student's steps alone per epoch / that same-setup training epoch, and "
          "'pass + setup' = "
          "the share of the call spent on the teacher pass and the setup (wall, from "
          "`KTPInfo.teacher_pass_s / distill_s / total_s`). Memory: peak "
          "resident set during the call and its rise over the set before it, MiB.", "",
          "| model | recipe | batch | steps | student | train s/epoch | KTP s/epoch | ratio | "
          "same setup | steps only | pass + setup | train RSS peak (rise) | "
          "KTP RSS peak (rise) | cache MiB | retain acc (teacher) |",
          "| --- " * 15 + "|"]
    for r in data["rows"]:
        t, m = r["train"], r["ktp_memory"]
        p = r.get("ktp_wall_s_parts")  # absent in results from before the field
        steps_only = f"{r['ratio_wall_steps_only']:.2f}" if p else "-"
        overhead = f"{1 - p['steps'] / sum(p.values()):.0%}" if p else "-"
        same_setup = r.get("ratio_cpu_same_setup",  # before 2026-12-04: precision only
                           r.get("ratio_cpu_same_precision", r["ratio_cpu"]))
        md.append(
            f"| {r['model']} ({r.get('retain_samples', 3588)} retain) | {r['recipe']} | "
            f"{r['batch_size']} | {r['steps']} | {r.get('student_precision', 'float32')}"
            f"{' NHWC' if r.get('student_channels_last') else ''} | "
            f"{t['cpu_s_per_epoch']:.1f} | {r['ktp_cpu_s_per_epoch']:.1f} | "
            f"{r['ratio_cpu']:.2f} ({r['ratio_wall']:.2f}) | "
            f"{same_setup:.2f} | "
            f"{steps_only} | {overhead} | "
            f"{t['rss_peak_mib']:.0f} ({t['rss_rise_mib']:+.0f}) | "
            f"{m['rss_peak_mib']:.0f} ({m['rss_rise_mib']:+.0f}) | {r['cache_mib']:.1f} | "
            f"{r['retain_acc_test']:.3f} ({r['teacher_retain_acc_test']:.3f}) |")
    return md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="test_resnet,resnet18,resnet50")
    parser.add_argument("--epochs", default="test_resnet=16,resnet18=8,resnet50=4",
                        help="teacher ERM epochs per model (model=epochs, ','-separated)")
    parser.add_argument("--train-epochs", type=int, default=2,
                        help="epochs of the timed training run")
    parser.add_argument("--forget", default="3")
    parser.add_argument("--recipes", default="",
                        help="';'-separated RECIPES names (exact) or substrings of them "
                             "(default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2,
                        help="timings per training reference and recipe, interleaved; "
                             "the medians are reported")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", default="",
                        help="training digits per model, of the 4,000 (model=n, "
                             "','-separated; default all): to fit a large model's run")
    parser.add_argument("--copies", type=int, default=1,
                        help="the training digits and N-1 copies of them shifted by up to "
                             "2 px: data past 6,400 retain samples, where the batch policy "
                             "takes batch 128")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="ktp_speed", help="result file stem")
    parser.add_argument("--hand-g", default="",
                        help="','-separated models whose G is set by hand after training "
                             "(K // C disjoint channels per class): a timing run for a "
                             "model that ERM does not separate in the epochs it can afford")
    parser.add_argument("--render", type=Path, default=None,
                        help="only rewrite the .md next to this result .json")
    args = parser.parse_args()
    if args.render is not None:
        md = render(json.loads(args.render.read_text()))
        args.render.with_suffix(".md").write_text("\n".join(md) + "\n")
        print("\n".join(md))
        return
    torch.set_num_threads(args.threads)
    teacher_epochs = {k: int(v) for k, v in (p.split("=") for p in args.epochs.split(","))}
    forget = [int(c) for c in args.forget.split(",")]
    wanted = [w for w in args.recipes.split(";") if w]
    # a recipe's full name selects it alone; any other string, every name containing it
    recipes = {k: v for k, v in RECIPES.items()
               if not wanted or k in wanted or any(w in k for w in wanted if w not in RECIPES)}
    samples = {k: int(v) for k, v in (p.split("=") for p in args.samples.split(",") if p)}
    all_train, test_set = load_mnist5k()
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for name in args.models.split(","):
        epochs = teacher_epochs.get(name, 4)
        n = samples.get(name, len(all_train))
        train_set = _shifted_copies(*(t[:n] for t in all_train.tensors), args.copies,
                                    args.seed)
        labels = train_set.tensors[1]
        retain = Subset(train_set, [i for i, y in enumerate(labels.tolist())
                                    if y not in forget])
        teacher = fresh(name, args.seed)
        with Clock() as clock:
            erm_surgery.train(teacher, train_set, epochs=epochs, config=ERMConfig(),
                              seed=args.seed, show_progress=False)
        erm_epoch = clock.cpu / epochs
        hand_g = name in args.hand_g.split(",")
        train_rows: dict = {}
        train_memory: dict = {}
        results: dict = {}
        if hand_g:  # KTP refuses an unseparated G; timing needs only a separated one
            with torch.no_grad():
                G = teacher.erm.G
                own = G.shape[1] // G.shape[0]
                G.zero_()
                for c in range(G.shape[0]):
                    G[c, own * c:own * (c + 1)] = 1.0
        # the training epochs a recipe is compared with: float32 NCHW (the library's
        # default, what a retrain with erm_surgery.train runs), and training with the
        # student's arithmetic (bfloat16 autocast for a bfloat16 student) and layout
        # (no model here refuses NHWC, so the layout asked for is the one that runs)
        layouts = {False} | {student_wants_channels_last(r.channels_last, torch.device(DEVICE))
                             for r in recipes.values()}
        references = [(mp, nhwc) for nhwc in sorted(layouts) for mp in ("no", "bf16")]
        cpu_s: dict = {key: [] for key in [*references, *recipes]}
        parts: dict = {key: [] for key in recipes}  # KTPInfo's wall seconds per round
        wall_s: dict = {key: [] for key in [*references, *recipes]}
        for _ in range(args.rounds):  # interleaved: machine load hits both sides alike
            for key in references:
                clock, peak = _train_epoch(name, retain, key, args)
                cpu_s[key].append(clock.cpu / args.train_epochs)
                wall_s[key].append(clock.wall / args.train_epochs)
                train_memory[key] = _memory(peak)
            for label, recipe in recipes.items():
                config = replace(recipe, seed=args.seed)
                with warnings.catch_warnings():  # entanglement warnings: expected here
                    warnings.simplefilter("ignore")
                    with Clock() as clock, PeakMemory(DEVICE) as peak:
                        student, info = ktp(teacher, forget, train_set, config=config)
                cpu_s[label].append(clock.cpu / info.epochs)
                wall_s[label].append(clock.wall / info.epochs)
                results[label] = (student, info, _memory(peak))
                parts[label].append((info.teacher_pass_s, info.distill_s, info.total_s))
        for key in references:
            train_rows[key] = {"cpu_s_per_epoch": median(cpu_s[key]),
                               "wall_s_per_epoch": median(wall_s[key]),
                               "cpu_s_per_epoch_rounds": cpu_s[key],
                               "mixed_precision": key[0], "channels_last": key[1],
                               **train_memory[key]}
            print(json.dumps({"model": name, "train": train_rows[key]}), flush=True)
        for label, (student, info, memory) in results.items():
            report = evaluate(student, forget, train_set, test_set, original=teacher,
                              metrics=("accuracy",))
            acc = report.accuracy
            default = train_rows[("no", False)]
            same = train_rows[("bf16" if info.student_precision == "bfloat16" else "no",
                               info.student_channels_last)]
            ktp_cpu, ktp_wall = median(cpu_s[label]), median(wall_s[label])
            pass_s, steps_s, total_s = (median(p[i] for p in parts[label]) for i in range(3))
            steps_epoch = steps_s / info.epochs
            row = {"model": name, "teacher_epochs": epochs, "recipe": label,
                   "train_samples": n, "retain_samples": len(retain), "hand_g": hand_g,
                   "batch_size": info.batch_size, "lr": info.lr,
                   "warmup_steps": info.warmup_steps,
                   "teacher_channels_last": info.teacher_channels_last,
                   "student_channels_last": info.student_channels_last,
                   "teacher_precision": info.teacher_precision,
                   "student_precision": info.student_precision,
                   "ktp_epochs": info.epochs, "samples": info.samples,
                   "steps": info.steps, "cached_samples": info.cached_samples,
                   "cache_mib": info.cache_bytes / (1 << 20),
                   "erm_train_cpu_s_per_epoch": erm_epoch,
                   "train": default, "train_same_setup": same,
                   "ktp_cpu_s_per_epoch": ktp_cpu, "ktp_wall_s_per_epoch": ktp_wall,
                   "ktp_cpu_s_per_epoch_rounds": cpu_s[label],
                   "ratio_cpu": ktp_cpu / default["cpu_s_per_epoch"],
                   "ratio_wall": ktp_wall / default["wall_s_per_epoch"],
                   "ratio_cpu_same_setup": ktp_cpu / same["cpu_s_per_epoch"],
                   # where the call's time went (KTPInfo, wall): the steps alone
                   # against a training epoch, and the teacher pass + setup on top
                   "ktp_wall_s_parts": {"teacher_pass": pass_s, "steps": steps_s,
                                        "setup": total_s - pass_s - steps_s},
                   "ratio_wall_steps_only": steps_epoch / same["wall_s_per_epoch"],
                   "ktp_memory": memory,
                   "info_peak_rss_mib": info.peak_rss_mib,
                   "info_cuda_peak_mib": info.cuda_peak_mib,
                   "retain_acc_test": acc["model"].retain_test,
                   "teacher_retain_acc_test": acc["original"].retain_test,
                   "forget_acc_test": acc["model"].forget_test}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del teacher

    setting = (f"MNIST-5k: the first n of {len(all_train)} train digits (n per row, default "
               f"all; x{args.copies} with shifted copies) / {len(test_set)} test at 32x32, "
               f"forget {forget}, {DEVICE}, "
               f"{args.threads} thread(s), torch {torch.__version__}, seed {args.seed}")
    command = (f"OMP_NUM_THREADS={args.threads} python benchmarks/ktp_speed.py "
               + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    data = {"setting": setting, "command": command,
            "recipes": {k: v.__dict__ for k, v in recipes.items()}, "rows": rows}
    (args.out / f"{args.name}.json").write_text(json.dumps(data, indent=2))
    md = render(data)
    (args.out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
