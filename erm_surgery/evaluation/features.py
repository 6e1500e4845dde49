"""One inference pass per model per split, shared by every metric.

Accuracy and MIA need logits; the probe, k-NN and pooled CKA need the pooled
penultimate features (the classifier's input). Both come out of the same forward pass:
the logits are the model's output and the features are captured by a forward pre-hook on
the classifier. :class:`FeatureCache` runs that pass at most once per (model, split), so
evaluating seven metrics on three models costs six passes over the data, not dozens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import as_dataset, make_loader
from .config import EvaluationError
from .models import find_classifier, model_device, pool_classifier_input, split_batch

__all__ = ["SplitOutputs", "FeatureCache", "ordered_loader", "subset_loader", "class_indices",
           "progress", "logits_of"]


def progress(iterable: Iterable[Any], desc: str, enabled: bool, total: int | None = None
             ) -> Iterable[Any]:
    """``iterable`` wrapped in a tqdm bar when ``enabled`` (tqdm is imported lazily)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def ordered_loader(data: Dataset | DataLoader, batch_size: int) -> DataLoader:
    """A loader over ``data`` in dataset order.

    A user's ``DataLoader`` may shuffle; per-sample metrics (k-NN agreement between two
    models, train/test membership) need the same order on every pass, so a new loader is
    built over the same dataset, keeping its ``collate_fn``, workers and batch size.
    """
    if isinstance(data, DataLoader):
        return DataLoader(
            data.dataset,
            batch_size=data.batch_size or batch_size,
            shuffle=False,
            num_workers=data.num_workers,
            collate_fn=data.collate_fn,
            pin_memory=data.pin_memory,
        )
    return make_loader(as_dataset(data), batch_size=batch_size, shuffle=False)


def subset_loader(data: Dataset | DataLoader, indices: Sequence[int], batch_size: int
                  ) -> DataLoader:
    """An ordered loader over ``indices`` of ``data`` (keeping a DataLoader's collate_fn)."""
    subset = Subset(as_dataset(data), list(indices))
    if isinstance(data, DataLoader):
        return DataLoader(subset, batch_size=data.batch_size or batch_size, shuffle=False,
                          num_workers=data.num_workers, collate_fn=data.collate_fn,
                          pin_memory=data.pin_memory)
    return make_loader(subset, batch_size=batch_size, shuffle=False)


def class_indices(labels: torch.Tensor, classes: Sequence[int]) -> list[int]:
    """Positions of the samples whose label is in ``classes``, in dataset order."""
    keep = torch.isin(labels.cpu().long(), torch.as_tensor(list(classes), dtype=torch.long))
    return torch.nonzero(keep).flatten().tolist()


@dataclass
class SplitOutputs:
    """What one pass of one model over one split produced (CPU tensors, dataset order).

    Attributes:
        logits: ``(N, C)`` float32.
        labels: ``(N,)`` int64.
        features: ``(N, D)`` float32 pooled classifier inputs, or None when no classifier
            layer was found.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.labels.numel())


class FeatureCache:
    """Logits and pooled features of registered models on registered splits, computed once.

    >>> cache = FeatureCache(batch_size=256)
    >>> cache.add_model("model", model); cache.add_split("test", test_data)
    >>> out = cache.get("model", "test")  # runs the pass; later calls are free

    ``passes`` counts the inference passes actually run (tests assert one per pair).
    """

    def __init__(self, *, batch_size: int = 256, classifier: str | None = None,
                 num_classes: int | None = None, show_progress: bool = False) -> None:
        self.batch_size = batch_size
        self.classifier_name = classifier
        self.num_classes = num_classes
        self.show_progress = show_progress
        self.models: dict[str, nn.Module] = {}
        self.splits: dict[str, Dataset | DataLoader] = {}
        self._store: dict[tuple[str, str], SplitOutputs] = {}
        self.passes = 0

    def add_model(self, role: str, model: nn.Module) -> None:
        """Register ``model`` under ``role`` (``"model"``, ``"original"``, ``"retrained"``)."""
        self.models[role] = model

    def add_split(self, name: str, data: Dataset | DataLoader) -> None:
        """Register a data split (``"train"``, ``"test"``)."""
        self.splits[name] = data

    def classifier(self, role: str) -> tuple[str, nn.Module] | None:
        """The classifier layer whose input is the pooled feature vector of ``role``."""
        return find_classifier(self.models[role], self.num_classes, self.classifier_name)

    def get(self, role: str, split: str) -> SplitOutputs:
        """Outputs of model ``role`` on ``split``, running the pass on first use."""
        key = (role, split)
        if key not in self._store:
            if role not in self.models:
                raise EvaluationError(f"no model registered as {role!r}")
            if split not in self.splits:
                raise EvaluationError(f"no data split registered as {split!r}")
            self._store[key] = self._extract(role, split)
        return self._store[key]

    def features(self, role: str, split: str) -> torch.Tensor:
        """Pooled features of ``role`` on ``split``; an error when there is no classifier."""
        out = self.get(role, split)
        if out.features is None:
            raise EvaluationError(
                f"no classifier layer found in the {role} model, so its pooled features are "
                "unknown; name it with EvalConfig(classifier='fc')")
        return out.features

    @torch.no_grad()
    def _extract(self, role: str, split: str) -> SplitOutputs:
        model = self.models[role]
        device = model_device(model)
        found = self.classifier(role)
        captured: list[torch.Tensor] = []
        handle = None
        if found is not None:
            head = found[1]

            def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
                # the last call wins: a head called twice per forward (distillation
                # tokens) reports what produced the returned logits
                captured[:] = [pool_classifier_input(args[0].detach(), head)]

            handle = head.register_forward_pre_hook(hook)
        logits, labels, feats = [], [], []
        loader = ordered_loader(self.splits[split], self.batch_size)
        try:
            for batch in progress(loader, f"{role}/{split}", self.show_progress):
                x, y = split_batch(batch)
                captured.clear()
                out = logits_of(model(x.to(device, non_blocking=True)))
                logits.append(out.float().cpu())
                labels.append(y.reshape(-1).long().cpu())
                if handle is not None:
                    if not captured:
                        raise EvaluationError(
                            f"the classifier {found[0]!r} of the {role} model was not called "
                            "in forward(); name the right layer with EvalConfig(classifier=)")
                    feats.append(captured[0].float().cpu())
        finally:
            if handle is not None:
                handle.remove()
        self.passes += 1
        if not logits:
            raise EvaluationError(f"the {split} data is empty")
        return SplitOutputs(
            logits=torch.cat(logits),
            labels=torch.cat(labels),
            features=torch.cat(feats) if feats else None,
        )


def logits_of(out: Any) -> torch.Tensor:
    """The logits tensor of a forward output (a tensor, or timm/HF-style containers)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise EvaluationError(f"the model returned {type(out).__name__}, expected a logits tensor")

