"""Plumbing shared by the ESC, ESC-T and EC methods: configs from kwargs, data splits."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import as_dataset, get_labels
from ..errors import UnlearningError
from ..surgery import ERMModel

__all__ = ["resolve_config", "split_request", "model_device"]

C = TypeVar("C")


def resolve_config(cls: type[C], config: C | None, overrides: dict[str, Any]) -> C:
    """``config`` (or the defaults) with keyword ``overrides`` applied.

    ``unlearn(m, [3], data, method="esc", k=4)`` is ``config=ESCConfig(k=4)``. A config of
    another method, or an unknown keyword, is a ``TypeError`` naming the accepted ones.
    """
    if config is None:
        config = cls()
    elif not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    if overrides:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for {cls.__name__}; accepted: "
                            f"{sorted(names)}")
        config = dataclasses.replace(config, **overrides)  # type: ignore[type-var]
    return config


def split_request(model: nn.Module, forget: Sequence[int], data: Dataset | DataLoader,
                  num_classes: int, *, need_retain: bool) -> tuple[Dataset, list[int], list[int]]:
    """``(dataset, forget_idx, retain_idx)``; retain excludes classes forgotten before.

    Raises ``UnlearningError`` for data without labels, labels out of range, no sample of
    the forget classes, or (``need_retain``) no sample of the classes to keep.
    """
    try:
        labels = get_labels(data)
    except (ValueError, TypeError) as err:
        raise UnlearningError(f"the data has no labels: {err}") from err
    dataset = as_dataset(data)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UnlearningError(f"the data has labels outside 0..{num_classes - 1}")
    gone = model.erm.forgotten_classes if isinstance(model, ERMModel) else []
    is_forget = torch.isin(labels, torch.as_tensor(list(forget), dtype=torch.long))
    is_gone = torch.isin(labels, torch.as_tensor(gone, dtype=torch.long))
    forget_idx = torch.nonzero(is_forget).flatten().tolist()
    retain_idx = torch.nonzero(~is_forget & ~is_gone).flatten().tolist()
    if not forget_idx:
        raise UnlearningError(f"the data has no samples of the forget classes {list(forget)}")
    if need_retain and not retain_idx:
        raise UnlearningError("the data has no samples of the classes to keep")
    return dataset, forget_idx, retain_idx


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (CPU for a parameter-free module)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def subset(dataset: Dataset, idx: Sequence[int]) -> Subset:
    return Subset(dataset, list(idx))
