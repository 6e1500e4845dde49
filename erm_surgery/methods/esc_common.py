"""Plumbing shared by the ESC, ESC-T and EC methods: configs from keyword arguments."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

from torch.utils.data import Dataset, Subset

__all__ = ["resolve_config", "subset"]

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


def subset(dataset: Dataset, idx: Sequence[int]) -> Subset:
    return Subset(dataset, list(idx))
