"""Try ``erm_surgery.attach`` on every timm and torchvision image classifier.

For each model name (``timm.list_models()`` and
``torchvision.models.list_models(module=torchvision.models)``), in a forked worker process
with a wall-clock limit:

1. build it with random weights and ``num_classes=10`` (nothing is downloaded); models with
   more than ``--max-params`` parameters (counted on the meta device first) are skipped;
2. attach with a probe input ``(3, S, S)``: S is timm's ``pretrained_cfg`` input
   size capped at ``--max-size`` (224), or the full size for fixed-size models
   (``fixed_input_size``, or when the model rejects the capped size); torchvision uses 224;
3. check, in eval mode on a random batch of 2 at that size, that
   - the STD path ``m(x)`` is bit-identical to the original (``torch.equal``),
   - the ERM path ``m(x, labels=y)`` with a random ``G`` changes the output,
   - with ``G = 0`` the ERM output no longer depends on the input (nothing bypasses the mask);
   and in train mode (a graph of its own), with the same seed, that the STD output is
   bit-identical and that the masked map has the eval-mode map's shape.

Each model ends as ``pass``, ``rejected`` (``SurgeryError`` saying there is no conv feature
map: the expected, correct refusal for transformers and MLP-mixers; or that the output is
not ``(N, C)`` logits: an encoder without a classifier), ``fail`` (any other
exception, or a failed check; a timeout is a fail too) or ``skipped`` (cannot be built, too
big, or the *original* model fails on the probe input or has input-independent logits).

Random weights need two adjustments, both recorded in the model's ``notes``: all-zero weight
matrices (zero-initialised heads) get small random values, and when the eval-mode logits do
not depend on the input (activations vanish over depth, e.g. cspnext), BatchNorm statistics
are set from the probe batch, as a warm-up would; otherwise no check could see the mask.

Writes ``attach_sweep.json`` (one record per model) and ``attach_sweep.md`` (summary) under
``--out``; records are appended to ``attach_sweep.partial.jsonl`` while running, so an
interrupted sweep can go on with ``--resume``.

Order and subsets: timm models run round-robin over *families* (see :func:`timm_family`:
the timm module that defines the model plus the leading letters of its name, e.g.
``resnet:resnet`` and ``resnet:seresnext`` are two families, ``resnet18`` and
``resnet50d`` one): the first member (alphabetically) of each family first, then the
torchvision models, then each family's second member, and so on. ``--budget MIN`` stops
starting models after MIN minutes, so a cut-short sweep still covers every family;
``--subset family`` runs one member per family only (the next member when the first one is
skipped as too big or unbuildable).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import nn
from tqdm import tqdm

import erm_surgery
from erm_surgery import SurgeryError

RESULTS = Path(__file__).resolve().parent / "results"
NUM_CLASSES = 10
BATCH = 2
# SurgeryError messages that are correct refusals, and the reason recorded for them
REJECT_MARKERS = {
    "no convolutional feature map": "rejected: no conv feature map",
    "no conv feature map": "rejected: no conv feature map",
    "expected logits (N, C)": "rejected: not a classifier (output is not (N, C) logits)",
    # attention-pooling ViTs: (N, heads, L, D) attention tensors pass the 4-D filter, the
    # bypass check then refuses them and says why
    "ERM needs a CNN": "rejected: transformer (attention tensors, no conv feature map)",
}


@dataclass
class Record:
    """Outcome of one model."""

    name: str
    source: str  # "timm" | "torchvision"
    status: str = "fail"  # "pass" | "rejected" | "fail" | "skipped"
    reason: str = ""
    feature_node: str | None = None
    K: int | None = None
    seconds: float | None = None  # attach() wall time
    total_seconds: float | None = None  # build + attach + checks in the worker
    params_m: float | None = None
    input_size: list[int] | None = None
    channel_dim: int | None = None
    feature_shape: list[int] | None = None
    head: str | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- model lists


def timm_family(name: str) -> str:
    """``<timm module>:<leading letters of the name>``, e.g. ``resnet:seresnext``."""
    module = timm.models._registry._model_to_module.get(name, "?")  # noqa: SLF001
    letters = re.match(r"[a-z]*", name).group(0) or name
    return f"{module}:{letters}"


def model_specs(name_filter: str | None, limit: int | None,
                sources: Iterable[str]) -> list[tuple[str, str]]:
    """``(source, name)`` pairs to sweep, in the order they are run.

    timm names are ordered round-robin over families: the first member (alphabetically) of
    every family, then every family's second member, and so on, so a sweep cut short by
    ``--budget`` has covered the families evenly. torchvision models come after the first
    round of timm families.
    """
    timm_rounds: list[list[tuple[str, str]]] = []
    if "timm" in sources:
        names = [n for n in timm.list_models() if not name_filter or name_filter in n]
        families: dict[str, list[str]] = defaultdict(list)
        for n in names:
            families[timm_family(n)].append(n)
        for members in families.values():
            for i, n in enumerate(members):
                if i == len(timm_rounds):
                    timm_rounds.append([])
                timm_rounds[i].append(("timm", n))
    tv: list[tuple[str, str]] = []
    if "torchvision" in sources:
        tv = [("torchvision", n) for n in torchvision.models.list_models(module=torchvision.models)
              if not name_filter or name_filter in n]
    specs = (timm_rounds[0] if timm_rounds else []) + tv
    for r in timm_rounds[1:]:
        specs += r
    return specs[:limit] if limit is not None else specs


# --------------------------------------------------------------------------- one model


def _count_params_meta(source: str, name: str) -> int | None:
    """Parameter count without allocating memory (None when meta construction fails)."""
    try:
        with torch.device("meta"):
            model = _build(source, name)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - some constructors do real work at init time
        return None


def _build(source: str, name: str) -> nn.Module:
    if source == "timm":
        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)


def _probe_sizes(source: str, model: nn.Module, max_size: int) -> list[int]:
    """Square probe sides to try, best first."""
    if source != "timm":
        return [224]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") or (3, 224, 224)
    full = max(int(size[1]), int(size[2]))
    if cfg.get("fixed_input_size"):
        return [full]
    capped = min(full, max_size)
    return [capped] if capped == full else [capped, full]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _reinit_zero_weights(model: nn.Module) -> int:
    """Give all-zero weight matrices (zero-initialised heads) small random values.

    A head initialised to zero makes the logits input-independent, so no check could tell
    a working mask from a broken one. Returns how many tensors were changed.
    """
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and p.numel() and not p.any():
                p.normal_(0.0, 0.02)
                n += 1
    return n


def _input_independent(model: nn.Module, x: torch.Tensor, ref: torch.Tensor,
                       gen: torch.Generator) -> bool:
    """True when the eval-mode logits hardly change for another input."""
    with torch.no_grad():
        other = model(torch.randn(x.shape, generator=gen))
    return _max_diff(other, ref) <= 1e-4 * max(float(ref.abs().max()), 1e-30)


def _calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> bool:
    """Set BatchNorm running statistics to those of ``x`` (one train-mode forward)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, that batch's statistics
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return True


def check_model(source: str, name: str, max_params: float, max_size: int) -> Record:
    """Build, attach and check one model (runs inside the worker process)."""
    rec = Record(name=name, source=source)
    t_start = time.perf_counter()
    torch.manual_seed(0)

    n_meta = _count_params_meta(source, name)
    if n_meta is not None and n_meta > max_params:
        rec.status, rec.params_m = "skipped", round(n_meta / 1e6, 2)
        rec.reason = f"skipped: > {max_params / 1e6:.0f}M parameters ({n_meta / 1e6:.0f}M)"
        return rec
    try:
        model = _build(source, name)
    except Exception as err:  # noqa: BLE001
        rec.status, rec.reason = "skipped", f"skipped: build failed: {_first_line(err)}"
        return rec
    n_params = sum(p.numel() for p in model.parameters())
    rec.params_m = round(n_params / 1e6, 2)
    if n_params > max_params:
        rec.status = "skipped"
        rec.reason = f"skipped: > {max_params / 1e6:.0f}M parameters ({n_params / 1e6:.0f}M)"
        return rec
    if _reinit_zero_weights(model):
        rec.notes.append("all-zero weight tensors re-initialised (zero-init head)")
    model.eval()

    # input: the capped size if the original model accepts it, else the full size
    gen = torch.Generator().manual_seed(0)
    chans = 3  # built with the default in_chans (csatv2's first Conv2d takes 64 DCT planes)
    x = ref = None
    errors = []
    for side in _probe_sizes(source, model, max_size):
        x = torch.randn(BATCH, chans, side, side, generator=gen)
        try:
            with torch.no_grad():
                ref = model(x)
            rec.input_size = [chans, side, side]
            break
        except Exception as err:  # noqa: BLE001
            errors.append(f"{side}px: {_first_line(err)}")
    if ref is None:
        rec.status = "skipped"
        rec.reason = f"skipped: the original model fails on the probe ({'; '.join(errors)})"
        return rec
    if not isinstance(ref, torch.Tensor):
        rec.notes.append(f"original returns {type(ref).__name__} in eval mode")
    elif _input_independent(model, x, ref, gen):
        # random init can make the eval-mode logits input-free (activations vanish over
        # depth, e.g. cspnext: features ~1e-10, logits = the fc bias): then no check could
        # see the mask. Calibrate BatchNorm statistics on the probe, as a warm-up would.
        if _calibrate_batchnorm(model, x):
            with torch.no_grad():
                ref = model(x)
            rec.notes.append("BatchNorm statistics calibrated: logits were input-free")
        if _input_independent(model, x, ref, gen):
            rec.status = "skipped"
            rec.reason = "skipped: the original model's logits do not depend on the input"
            return rec

    # attach
    t0 = time.perf_counter()
    try:
        erm = erm_surgery.attach(model, input_size=tuple(rec.input_size))
    except SurgeryError as err:
        rec.seconds = round(time.perf_counter() - t0, 3)
        msg = str(err)
        marker = next((m for m in REJECT_MARKERS if m in msg), None)
        if marker is not None:
            rec.status, rec.reason = "rejected", REJECT_MARKERS[marker]
            rec.notes.append(msg.splitlines()[0][:300])
        else:
            rec.status, rec.reason = "fail", f"fail: {_first_line(err)}"
        return rec
    except Exception as err:  # noqa: BLE001
        rec.seconds = round(time.perf_counter() - t0, 3)
        rec.status, rec.reason = "fail", f"fail: {_first_line(err)}"
        rec.notes.append(traceback.format_exc(limit=-3)[-1500:])
        return rec
    rec.seconds = round(time.perf_counter() - t0, 3)
    info = erm.surgery
    rec.feature_node, rec.K, rec.head = info.feature_node, info.num_channels, info.head
    rec.channel_dim, rec.feature_shape = info.channel_dim, list(info.feature_shape)
    nf = getattr(model, "num_features", None)
    if source == "timm" and isinstance(nf, int) and nf != info.num_channels:
        rec.notes.append(f"K={info.num_channels} != timm num_features={nf}")

    # checks
    erm.eval()
    try:
        failure = _run_checks(erm, x, ref, gen)
    except Exception as err:  # noqa: BLE001
        failure = f"fail: attached model raises {_first_line(err)}"
        rec.notes.append(traceback.format_exc(limit=-3)[-1500:])
    if failure is None:
        try:
            failure = _run_train_checks(model, erm, x, rec)
        except Exception as err:  # noqa: BLE001
            failure = f"fail: train mode: attached model raises {_first_line(err)}"
            rec.notes.append(traceback.format_exc(limit=-3)[-1500:])
    rec.status, rec.reason = ("fail", failure) if failure else ("pass", "")
    rec.total_seconds = round(time.perf_counter() - t_start, 3)
    return rec


def _run_checks(erm: erm_surgery.ERMModel, x: torch.Tensor, ref: torch.Tensor,
                gen: torch.Generator) -> str | None:
    """The three checks; a ``fail: ...`` reason, or None when all pass."""
    with torch.no_grad():
        std = erm(x)
        if not isinstance(ref, torch.Tensor) or not torch.equal(std, ref):
            diff = _max_diff(std, ref) if isinstance(ref, torch.Tensor) else float("nan")
            return f"fail: STD path not bit-identical (max abs diff {diff:.3g})"
        labels = torch.randint(0, NUM_CLASSES, (x.shape[0],), generator=gen)
        # relative tolerances: some random-init models (zero-init last BN of every block)
        # have logits of 1e-7, so an absolute threshold would call every change "none"
        scale = max(float(std.abs().max()), 1e-30)
        erm.erm.G.copy_(torch.rand(erm.erm.G.shape, generator=gen))
        out = erm(x, labels=labels)
        d = _max_diff(out, std)
        if d <= 1e-4 * scale:
            return (f"fail: ERM path with a random G does not change the output (max diff "
                    f"{d:.3g}, max |logit| {scale:.3g})")
        erm.erm.G.zero_()
        a = erm(x, labels=labels)
        b = erm(torch.randn(x.shape, generator=gen), labels=labels)
        d = _max_diff(a, b)
        if d > 1e-5 * scale:
            return (f"fail: with G=0 the output still depends on the input (max diff {d:.3g}, "
                    f"max |logit| {scale:.3g})")
    return None


def _same(a: Any, b: Any) -> bool:
    """``torch.equal`` through tuples, lists and namedtuples (inception's aux outputs)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return all(_same(u, v) for u, v in zip(a, b, strict=True))
    return False


def _run_train_checks(model: nn.Module, erm: erm_surgery.ERMModel, x: torch.Tensor,
                      rec: Record) -> str | None:
    """Train mode runs its own graph: same seed, same output; the mask on the same map.

    ``model`` is the user's model (attach copied it, so running it in train mode here does
    not touch ``erm``). A train graph whose node names shifted (extra ops from drop-path
    traced through) would put the mask on another node; its feature shape tells.
    """
    model.train()
    try:
        torch.manual_seed(1)
        with torch.no_grad():
            ref = model(x)
    except Exception as err:  # noqa: BLE001 - the original itself cannot run in train mode
        rec.notes.append(f"train-mode checks skipped: original raises {_first_line(err)}")
        return None
    finally:
        model.eval()
    erm.train()
    try:
        torch.manual_seed(1)
        with torch.no_grad():
            std = erm(x)
            feats = erm.forward_features(x)
    finally:
        erm.eval()
    if not _same(std, ref):
        return "fail: train mode: STD path not bit-identical to the original (same seed)"
    expected = (x.shape[0], *erm.surgery.feature_shape)
    if tuple(feats.shape) != expected:
        return (f"fail: train mode: the mask sits on another node (map {tuple(feats.shape)}, "
                f"eval-mode map {expected})")
    return None


# --------------------------------------------------------------------------- workers


def _worker(conn: Connection, source: str, name: str, max_params: float,
            max_size: int) -> None:
    torch.set_num_threads(1)
    try:
        rec = check_model(source, name, max_params, max_size)
    except BaseException as err:  # noqa: BLE001 - report anything, the parent classifies
        rec = Record(name=name, source=source, reason=f"fail: {_first_line(err)}")
        rec.notes.append(traceback.format_exc(limit=-3)[-1500:])
    conn.send(asdict(rec))
    conn.close()


@dataclass
class _Job:
    source: str
    name: str
    proc: Any
    conn: Connection
    started: float


def _not_run(spec: tuple[str, str], reason: str) -> dict:
    return asdict(Record(name=spec[1], source=spec[0], status="not-run",
                         reason=f"not run: {reason}"))


def run_sweep(specs: list[tuple[str, str]], args: argparse.Namespace, partial: Path,
              done: dict[tuple[str, str], dict]) -> list[dict]:
    """Run every spec in its own forked process, at most ``args.workers`` at a time.

    With ``args.subset == "family"`` a timm model runs only if no other member of its
    family has run (a member skipped as too big or unbuildable does not count). No new
    model starts after ``args.budget`` minutes; the rest are recorded as ``not-run``.
    """
    ctx = mp.get_context("fork")
    results: dict[tuple[str, str], dict] = dict(done)
    family_mode = args.subset == "family"
    represented: dict[str, str] = {}  # family -> the member that ran (or is running)
    for (src, nm), r in done.items():
        if src == "timm" and r["status"] not in ("skipped", "not-run"):
            represented[timm_family(nm)] = nm
    todo = [s for s in specs if s not in results]
    deferred: dict[str, list[tuple[str, str]]] = defaultdict(list)
    running: list[_Job] = []
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), unit="model",
               dynamic_ncols=True, mininterval=2.0)
    t_start = time.perf_counter()
    deadline = t_start + args.budget * 60 if args.budget else float("inf")

    def record(spec: tuple[str, str], rec: dict) -> None:
        results[spec] = rec
        with partial.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.update(1)
        counts = Counter(r["status"] for r in results.values())
        bar.set_postfix({k: counts[k] for k in ("pass", "rejected", "fail", "skipped")})

    def finish(job: _Job, rec: dict) -> None:
        rec["seconds_wall"] = round(time.perf_counter() - job.started, 2)
        record((job.source, job.name), rec)
        if family_mode and job.source == "timm":
            fam = timm_family(job.name)
            if rec["status"] == "skipped":  # the family's next member gets a chance
                represented.pop(fam, None)
                todo[:0] = deferred.pop(fam, [])
            else:
                for s in deferred.pop(fam, []):
                    record(s, _not_run(s, f"another member of its family ran ({job.name})"))

    def launch(spec: tuple[str, str]) -> None:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(child, *spec, args.max_params,
                                                 args.max_size), daemon=True)
        proc.start()
        child.close()
        running.append(_Job(*spec, proc, parent, time.perf_counter()))

    try:
        while todo or running:
            while todo and len(running) < args.workers and time.perf_counter() < deadline:
                spec = todo.pop(0)
                if family_mode and spec[0] == "timm":
                    fam = timm_family(spec[1])
                    if fam in represented:
                        if any(j.name == represented[fam] for j in running):
                            deferred[fam].append(spec)
                        else:
                            record(spec, _not_run(spec, "another member of its family ran "
                                                        f"({represented[fam]})"))
                        continue
                    represented[fam] = spec[1]
                launch(spec)
            if time.perf_counter() >= deadline and todo:
                for s in todo:
                    record(s, _not_run(s, f"time budget of {args.budget:g} min used up"))
                todo.clear()
            time.sleep(0.05)
            for job in list(running):
                rec = None
                if job.conn.poll():
                    try:
                        rec = job.conn.recv()
                    except EOFError:
                        rec = None
                    job.proc.join(5)
                elif not job.proc.is_alive():
                    rec = asdict(Record(
                        name=job.name, source=job.source,
                        reason=f"fail: worker died (exit code {job.proc.exitcode})"))
                elif time.perf_counter() - job.started > args.timeout:
                    job.proc.kill()
                    job.proc.join(5)
                    rec = asdict(Record(name=job.name, source=job.source,
                                        reason=f"fail: TimeoutError: over {args.timeout:.0f} s"))
                else:
                    continue
                if rec is None:
                    rec = asdict(Record(name=job.name, source=job.source,
                                        reason="fail: worker closed the pipe without a result"))
                running.remove(job)
                job.conn.close()
                finish(job, rec)
    finally:
        for job in running:
            job.proc.kill()
        bar.close()
    for fam_specs in deferred.values():  # every member of these families was skipped
        for s in fam_specs:
            results.setdefault(s, _not_run(s, "family member"))
    order = {s: i for i, s in enumerate(specs)}
    return sorted(results.values(), key=lambda r: order.get((r["source"], r["name"]), 1 << 30))


# --------------------------------------------------------------------------- report


def reason_group(reason: str) -> str:
    """A failure reason with model-specific details (names, numbers, shapes) removed."""
    text = reason
    text = re.sub(r"torch\.fx cannot trace \w+", "torch.fx cannot trace <Model>", text)
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\[[^\]]*\]", "[…]", text)
    text = re.sub(r"\([^()]*\)", "(…)", text)
    text = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "N", text)
    # the fx message's generic advice after the cause adds nothing to the group
    text = text.split(". Models with data-dependent")[0]
    return text[:220]


def summarize(records: list[dict], args: argparse.Namespace, wall: float) -> str:
    """The markdown report."""
    tried = [r for r in records if r["status"] != "not-run"]
    counts = Counter(r["status"] for r in tried)
    by_source = {src: Counter(r["status"] for r in tried if r["source"] == src)
                 for src in ("timm", "torchvision")}
    n_pass, n_fail = counts["pass"], counts["fail"]
    rate = n_pass / (n_pass + n_fail) if n_pass + n_fail else float("nan")
    timeouts = sum(r["reason"].startswith("fail: TimeoutError") for r in tried)
    rate_no_to = (n_pass / (n_pass + n_fail - timeouts) if n_pass + n_fail - timeouts
                  else float("nan"))
    lines = [
        "# attach() sweep over timm and torchvision classifiers",
        "",
        f"Generated by `benchmarks/attach_sweep.py` ({time.strftime('%Y-%m-%d %H:%M')}); "
        f"torch {torch.__version__}, timm {timm.__version__}, torchvision "
        f"{torchvision.__version__}; CPU, 1 thread per worker, {args.workers} workers, "
        f"{args.timeout:.0f} s limit per model; wall time {wall / 60:.1f} min.",
        f"Subset: `{args.subset}`"
        + (" (one timm model per family: timm module + leading letters of the name)"
           if args.subset == "family" else "")
        + (f", filter `{args.filter}`" if args.filter else "")
        + (f", limit {args.limit}" if args.limit else "")
        + (f", no model started after {args.budget:g} min" if args.budget else "")
        + f"; max {args.max_params / 1e6:.0f}M parameters, probe side capped at "
          f"{args.max_size} px (fixed-size models at their own size).",
        "",
        f"**Pass rate among CNN models: {n_pass}/{n_pass + n_fail} = {rate:.1%}** "
        f"(pass / (pass + fail); {rate_no_to:.1%} not counting {timeouts} timeouts)",
        "",
        "| | pass | rejected (correct refusal) | fail | skipped | total tried |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for src, c in (*by_source.items(), ("all", counts)):
        lines.append(f"| {src} | {c['pass']} | {c['rejected']} | {c['fail']} | "
                     f"{c['skipped']} | {sum(c.values())} |")
    not_run = Counter(r["reason"].split(" (")[0] for r in records if r["status"] == "not-run")
    families = {timm_family(r["name"]) for r in records if r["source"] == "timm"}
    tested = {timm_family(r["name"]) for r in tried
              if r["source"] == "timm" and r["status"] in ("pass", "rejected", "fail")}
    if families:
        lines += ["", f"timm families (see the script's docstring) with a tested member: "
                      f"{len(tested)} of {len(families)}"
                  + (f"; untested: {', '.join(sorted(families - tested))}"
                     if families - tested else "") + "."]
    if not_run:
        lines += ["", "Not run: " + "; ".join(f"{n} ({reason.removeprefix('not run: ')})"
                                             for reason, n in not_run.items()) + "."]

    reruns = [r for r in records if r.get("rerun_of")]
    if reruns:
        lines += ["", f"{len(reruns)} models were re-run after the main sweep (`--redo`); "
                      "their first result:", "",
                  "| model | first result | now |", "| --- | --- | --- |"]
        lines += [f"| `{r['name']}` | {_md(r['rerun_of'][:120])} | {r['status']} |"
                  for r in reruns]

    fails = [r for r in tried if r["status"] == "fail"]
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in fails:
        groups[reason_group(r["reason"])].append(r)
    lines += ["", "## Failures by reason", "",
              "| # | reason (normalised) | examples |", "| --- | --- | --- |"]
    for reason, recs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        examples = ", ".join(f"`{r['name']}`" + (" (tv)" if r["source"] == "torchvision"
                                                 else "") for r in recs[:6])
        more = f" +{len(recs) - 6}" if len(recs) > 6 else ""
        lines.append(f"| {len(recs)} | {_md(reason)} | {examples}{more} |")

    skipped = Counter(reason_group(r["reason"]) for r in tried if r["status"] == "skipped")
    lines += ["", "## Skipped", "", "| # | reason |", "| --- | --- |"]
    lines += [f"| {n} | {_md(reason)} |" for reason, n in skipped.most_common()]

    rejected = [r for r in tried if r["status"] == "rejected"]
    lines += ["", "## Rejected (correct refusals)"]
    for reason in sorted({r["reason"] for r in rejected}):
        names = [f"`{r['name']}`" for r in rejected if r["reason"] == reason]
        lines += ["", f"{reason.removeprefix('rejected: ')} ({len(names)}): " + ", ".join(names)]
    if not rejected:
        lines += ["", "none"]

    notes = [r for r in tried if r["status"] == "pass"
             and any(n.startswith("K=") for n in r.get("notes", []))]
    lines += ["", "## Passing models whose K differs from timm's `num_features`", "",
              "Not necessarily wrong (a head conv after pooling, a final norm), but the feature "
              "node is worth a look.", "",
              "| model | feature node | K | note |", "| --- | --- | --- | --- |"]
    lines += [f"| `{r['name']}` | `{r['feature_node']}` | {r['K']} | "
              f"{_md('; '.join(n for n in r['notes'] if n.startswith('K=')))} |"
              for r in notes] or ["| none | | | |"]

    secs = sorted(r["seconds"] for r in tried if r["status"] == "pass" and r["seconds"])
    if secs:
        lines += ["", f"attach() time of passing models (1 CPU thread, probe batch {BATCH}): "
                      f"median {secs[len(secs) // 2]:.2f} s, max {secs[-1]:.2f} s."]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="only the first N models")
    p.add_argument("--filter", default=None, help="only names containing this substring")
    p.add_argument("--workers", type=int, default=2, help="parallel worker processes")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    p.add_argument("--subset", choices=("all", "family"), default="all",
                   help="all timm models, or one per family (see the module docstring)")
    p.add_argument("--source", choices=("all", "timm", "torchvision"), default="all")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per model")
    p.add_argument("--max-params", type=float, default=150e6)
    p.add_argument("--max-size", type=int, default=224, help="cap on the probe side")
    p.add_argument("--budget", type=float, default=None,
                   help="minutes after which no new model starts (the rest: not-run)")
    p.add_argument("--resume", action="store_true",
                   help="keep the records of attach_sweep.json and attach_sweep.partial.jsonl "
                        "in --out and run the models without one (not-run included)")
    p.add_argument("--redo", metavar="REGEX", default=None,
                   help="with the records of an earlier run in --out, re-run only the models "
                        "whose reason matches REGEX (e.g. 'fails on the probe')")
    return p.parse_args(argv)


def _previous_records(args: argparse.Namespace, partial: Path, specs: list[tuple[str, str]]
                      ) -> tuple[dict[tuple[str, str], dict], float]:
    """Records to keep from an earlier run (``--resume``/``--redo``) and its wall time.

    Only models in ``specs`` (after ``--filter``/``--limit``) are re-run; the records of
    all others are kept as they are.
    """
    done: dict[tuple[str, str], dict] = {}
    previous_wall = 0.0
    if not (args.resume or args.redo):
        partial.unlink(missing_ok=True)
        return done, previous_wall
    final, report = args.out / "attach_sweep.json", args.out / "attach_sweep.md"
    if final.exists():
        for r in json.loads(final.read_text()):
            done[(r["source"], r["name"])] = r
        found = report.exists() and re.search(r"wall time ([\d.]+) min", report.read_text())
        previous_wall = float(found.group(1)) * 60 if found else 0.0
    if partial.exists():
        for line in partial.read_text().splitlines():
            r = json.loads(line)
            done[(r["source"], r["name"])] = r
    selected = set(specs)
    if args.redo:
        # re-run only the records whose reason matches; every other record stays as it is
        rerun = {k for k, r in done.items() if re.search(args.redo, r["reason"])}
    else:
        rerun = {k for k, r in done.items() if r["status"] == "not-run"}
    return {k: r for k, r in done.items() if k not in rerun or k not in selected}, previous_wall


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    sources = ("timm", "torchvision") if args.source == "all" else (args.source,)
    specs = model_specs(args.filter, args.limit, sources)
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "attach_sweep.partial.jsonl"
    done, previous_wall = _previous_records(args, partial, specs)
    previous: dict[tuple[str, str], str] = {}
    if args.redo:
        final = args.out / "attach_sweep.json"
        old = {(r["source"], r["name"]): r for r in json.loads(final.read_text())} \
            if final.exists() else {}
        specs = [s for s in specs if s not in done]
        previous = {s: old[s]["reason"] or old[s]["status"] for s in specs if s in old}
    print(f"{len(specs)} models, {args.workers} workers, OMP/torch threads per worker: 1",
          file=sys.stderr)
    t0 = time.perf_counter()
    records = run_sweep(specs, args, partial, done)
    for r in records:  # a re-run keeps what the first run said, for the report
        if (r["source"], r["name"]) in previous:
            r["rerun_of"] = previous[(r["source"], r["name"])]
    wall = time.perf_counter() - t0 + previous_wall
    order = {s: i for i, s in enumerate(model_specs(None, None, sources))}
    records.sort(key=lambda r: order.get((r["source"], r["name"]), len(order)))
    (args.out / "attach_sweep.json").write_text(json.dumps(records, indent=1) + "\n")
    report = summarize(records, args, wall)
    (args.out / "attach_sweep.md").write_text(report)
    partial.unlink(missing_ok=True)
    print(report.split("\n## ")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
