"""SalUn, l1-sparse, SCRUB, SSD, Bad Teacher and Boundary Shrink on the tests' digits
teacher, at their defaults and at the settings their docs compare them with.

The teacher is the one of ``tests/conftest.py`` (timm ``test_resnet``, in_chans=1, ERM
training, 8 epochs at batch 128 on scikit-learn's 1,400 8x8 digits at 16x16, seed 0;
without the Amnesiac recorder, which does not change the training). Classes 4 and 9 are
forgotten; accuracies are on the 397 test digits. Each setting is one ``unlearn`` call:

    OMP_NUM_THREADS=1 python benchmarks/new_baselines_digits.py             # ~2 min
    OMP_NUM_THREADS=1 python benchmarks/new_baselines_digits.py --defaults  # defaults only

Writes benchmarks/results/new_baselines_digits.md (``--defaults``: not written).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

import erm_surgery as E
from erm_surgery.data import load_digits8x8

RESULTS = Path(__file__).parent / "results"
FORGET = [4, 9]
RETAIN = [c for c in range(10) if c not in FORGET]

#: (method, overrides): the defaults first, then the settings docs/methods.md discusses
SETTINGS: list[tuple[str, dict]] = [
    ("salun", {}), ("l1_sparse", {}), ("scrub", {}), ("ssd", {}), ("bad_teacher", {}),
    ("boundary_shrink", {}),
]
VARIANTS: list[tuple[str, dict]] = [
    ("salun", {"seed": 1}), ("salun", {"epochs": 1}), ("salun", {"saliency_ratio": 1.0}),
    ("l1_sparse", {"l1_alpha": 0.0}), ("l1_sparse", {"l1_alpha": 5e-4}),
    ("l1_sparse", {"l1_alpha": 1e-3}), ("l1_sparse", {"lr": 0.05, "l1_alpha": 5e-4}),
    ("scrub", {"lr": 0.02, "max_epochs": 2}), ("scrub", {"lr": 0.002, "max_epochs": 2}),
    ("scrub", {"lr": 0.001, "max_epochs": 2}), ("scrub", {"seed": 1}),
    ("ssd", {"alpha": 12.0}), ("ssd", {"alpha": 15.0}), ("ssd", {"alpha": 20.0}),
    ("ssd", {"alpha": 50.0}), ("ssd", {"batch_size": 32}), ("ssd", {"batch_size": 128}),
    ("bad_teacher", {"lr": 1e-3}), ("bad_teacher", {"lr": 1e-4, "epochs": 1}),
    ("bad_teacher", {"seed": 1}),
    ("boundary_shrink", {"neighbours": "any"}), ("boundary_shrink", {"epochs": 3}),
    ("boundary_shrink", {"seed": 1}),
]


@torch.no_grad()
def accuracy(model: torch.nn.Module, data, classes: list[int]) -> float:
    model.eval()
    right = total = 0
    for x, y in DataLoader(data, batch_size=500):
        keep = torch.isin(y, torch.tensor(classes))
        right += int((model(x).argmax(1)[keep] == y[keep]).sum())
        total += int(keep.sum())
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defaults", action="store_true", help="the defaults only")
    args = parser.parse_args()
    torch.manual_seed(0)
    train_set, test_set = load_digits8x8()
    model = E.attach(timm.create_model("test_resnet", num_classes=10, in_chans=1))
    E.train(model, train_set, epochs=8, batch_size=128, show_progress=False)
    model.eval()
    lines = ["| method | settings | forget test | retain test | forget train | s |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| original | - | {accuracy(model, test_set, FORGET):.3f} | "
             f"{accuracy(model, test_set, RETAIN):.3f} | "
             f"{accuracy(model, train_set, FORGET):.3f} | - |"]
    print(lines[-1], flush=True)
    for name, overrides in SETTINGS + ([] if args.defaults else VARIANTS):
        start = time.perf_counter()
        out = E.unlearn(model, FORGET, train_set, method=name, show_progress=False,
                        **overrides)
        seconds = time.perf_counter() - start
        shown = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
        lines.append(f"| `{name}` | {shown} | {accuracy(out, test_set, FORGET):.3f} | "
                     f"{accuracy(out, test_set, RETAIN):.3f} | "
                     f"{accuracy(out, train_set, FORGET):.3f} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    if not args.defaults:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "new_baselines_digits.md").write_text(
            "Written by `OMP_NUM_THREADS=1 python benchmarks/new_baselines_digits.py` "
            f"({time.strftime('%Y-%m-%d')}, CPU, 1 thread, on a shared machine).\n\n"
            + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
