"""Measure ESC, ESC-T, EC and KTP(+EC) on one split with ``erm_surgery.evaluate``.

Run (the numbers in ``docs/methods.md`` come from this)::

    OMP_NUM_THREADS=1 python benchmarks/esc_ec.py --data mnist5k

It ERM-trains timm ``test_resnet`` (``in_chans=1``) on the chosen digits, runs every
method on the same model and split, and prints one Markdown table: time, forget / retain
accuracy (train and test), optionally the linear-probe knowledge retention (``--probe``),
and the layer-wise linear CKA of the forget-class test activations to the original model,
then ESC-T's threshold sweep. It lives in benchmarks/ because it imports the evaluation
layer, which methods must not.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset


def _data(name: str, n_train: int | None) -> tuple[Dataset, Dataset]:
    from erm_surgery.data import load_digits8x8, load_mnist5k

    if name == "digits":
        return load_digits8x8(n_train=n_train or 1400, size=16)
    return load_mnist5k(n_train=n_train or 4000, size=32)


def _row(name: str, seconds: float, model: nn.Module, forget: list[int], train: Dataset,
         test: Dataset, original: nn.Module, probe: bool,
         retrained: nn.Module | None = None) -> dict[str, Any]:
    from erm_surgery.evaluation import EvalConfig, evaluate

    metrics = ("accuracy", "cka", "probe") if probe else ("accuracy", "cka")
    report = evaluate(model, forget, train, test, original=original, retrained=retrained,
                      metrics=metrics, config=EvalConfig(batch_size=512))
    acc = report.accuracy["model"]
    row: dict[str, Any] = {
        "method": name, "seconds": round(seconds, 2),
        "forget_train": acc.forget_train, "forget_test": acc.forget_test,
        "retain_train": acc.retain_train, "retain_test": acc.retain_test,
    }
    if probe and "model" in report.probe:
        row["probe_forget"] = report.probe["model"].forget_acc
    cka = report.cka.get("model~original")
    if cka is not None:
        row["cka"] = dict(zip(cka.layers, cka.values, strict=True))
    to_retrained = report.cka.get("model~retrained")
    if to_retrained is not None:
        row["cka_retrained"] = dict(zip(to_retrained.layers, to_retrained.values, strict=True))
    return row


def main(argv: list[str] | None = None) -> None:
    import timm

    import erm_surgery as E
    from erm_surgery.methods.ec import ECConfig, KTPECConfig, ec, ktp_ec
    from erm_surgery.methods.esc import esc, esc_t
    from erm_surgery.methods.ktp import KTPConfig, ktp

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", choices=("digits", "mnist5k"), default="mnist5k")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--forget", type=int, nargs="+", default=[3])
    ap.add_argument("--epochs", type=int, default=8, help="ERM training epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe", action="store_true", help="also the linear probe (KR)")
    ap.add_argument("--retrained", action="store_true",
                    help="also train a model without the forget classes (same recipe) and "
                         "report CKA to it")
    ap.add_argument("--json", default=None, help="write the rows here too")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    train, test = _data(args.data, args.n_train)
    model = E.attach(timm.create_model("test_resnet", num_classes=10, in_chans=1))
    t0 = time.perf_counter()
    E.train(model, train, epochs=args.epochs, batch_size=64, show_progress=False,
            seed=args.seed)
    print(f"ERM training: {time.perf_counter() - t0:.1f} s")
    original = model.eval()
    forget = sorted(args.forget)
    retrained = None
    if args.retrained:
        from erm_surgery.data import split_by_class

        torch.manual_seed(args.seed)
        retrained = E.attach(timm.create_model("test_resnet", num_classes=10, in_chans=1))
        E.train(retrained, split_by_class(train, forget)[0], epochs=args.epochs,
                batch_size=64, show_progress=False, seed=args.seed)
        retrained.eval()
    quiet_ktp = KTPConfig(show_progress=False)
    quiet_ec = ECConfig(show_progress=False)
    runs: list[tuple[str, Callable[[], tuple[nn.Module, Any]]]] = [
        ("original", lambda: (original, None)),
        *([("retrained", lambda: (retrained, None))] if retrained is not None else []),
        ("esc (p=1.5)", lambda: esc(original, forget, train)),
        ("esc (k=4)", lambda: esc(original, forget, train, k=4)),
        ("esc_t (threshold 0.7)", lambda: esc_t(original, forget, train)),
        ("fine-tune on retain (EC without its losses)", lambda: ec(
            original, forget, train, config=ECConfig(
                show_progress=False, contrastive_weight=0.0, num_aux_layers=0))),
        ("ec", lambda: ec(original, forget, train, config=quiet_ec)),
        ("ktp", lambda: ktp(original, forget, train, config=quiet_ktp)),
        ("ktp_ec", lambda: ktp_ec(original, forget, train, config=KTPECConfig(
            ktp=quiet_ktp, ec=ECConfig(show_progress=False, train_head=False)))),
    ]
    rows = []
    for name, run in runs:
        t = time.perf_counter()
        out, _ = run()
        seconds = time.perf_counter() - t if name not in ("original", "retrained") else 0.0
        rows.append(_row(name, seconds, out, forget, train, test, original, args.probe,
                         retrained))
        print(json.dumps(rows[-1]), flush=True)

    sweep = []
    for thr in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        out, info = esc_t(original, forget, train, threshold=thr)
        r = _row(f"esc_t {thr}", info.seconds, out, forget, train, test, original, False)
        r["mask_kept_fraction"] = info.mask_kept_fraction
        r["removed_directions"] = info.removed_directions
        r["epochs_run"] = info.epochs_run
        sweep.append(r)

    layers = list(rows[0]["cka"]) if "cka" in rows[0] else []
    print(f"\n{args.data}, forget {forget}, test_resnet, {args.epochs} ERM epochs\n")
    head = ["method", "s", "forget train", "forget test", "retain train", "retain test"]
    if args.probe:
        head.append("probe forget")
    head += [f"CKA {n}" for n in layers]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for r in rows:
        cells = [r["method"], f"{r['seconds']:.2f}"] + [f"{r[k]:.3f}" for k in (
            "forget_train", "forget_test", "retain_train", "retain_test")]
        if args.probe:
            cells.append(f"{r.get('probe_forget', float('nan')):.3f}")
        cells += [f"{r.get('cka', {}).get(n, float('nan')):.3f}" for n in layers]
        print("| " + " | ".join(cells) + " |")
    if retrained is not None:
        print("\nCKA to the retrained model (higher = closer to the gold standard)\n")
        print("| method | " + " | ".join(layers) + " |")
        print("|" + " --- |" * (len(layers) + 1))
        for r in rows:
            vals = r.get("cka_retrained", {})
            print(f"| {r['method']} | "
                  + " | ".join(f"{vals.get(n, float('nan')):.3f}" for n in layers) + " |")
    print("\n| ESC-T threshold | entries kept | directions removed | epochs | forget train "
          "| forget test | retain test |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in sweep:
        print(f"| {r['method'].split()[-1]} | {r['mask_kept_fraction']:.4f} | "
              f"{r['removed_directions']} | {r['epochs_run']} | {r['forget_train']:.3f} | "
              f"{r['forget_test']:.3f} | {r['retain_test']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "esc_t_sweep": sweep, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
