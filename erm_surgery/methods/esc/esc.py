"""ESC and ESC-T: Erasing Space Concept (Lee et al., "ESC: Erasing Space Concept for
Knowledge Deletion", CVPR 2025, arXiv:2504.02199; reference code KU-VGI/ESC).

Training-free (ESC) or nearly so (ESC-T): the network's weights are never changed. The
pooled penultimate features (the classifier's input) of the forget-class training
samples are stacked into a ``D x N`` matrix and decomposed, ``F = U S V^T`` (no
centering, as in the reference code). Their dominant directions carry the forget
classes; a node inserted with torch.fx right before the head maps every feature vector
``x`` to

- ESC: ``x - U_k U_k^T x``, the top ``k = floor(D * p / 100)`` left singular vectors
  removed (reference default ``p = 1.5``);
- ESC-T: ``(U o M)(U o M)^T x`` with a learned elementwise mask ``M`` on the full ``D x D``
  basis, binarised at a threshold (reference 0.7).

Neither method guarantees 0% accuracy on the forget classes: the head is unchanged and a
forget sample whose features keep enough energy outside the removed subspace is still
classified correctly. ``info.guarantees_zero_forget_accuracy`` is ``False`` and the
measured forget accuracy must be checked (``erm_surgery.evaluate``). Logits are never
masked to fake it.

This module holds ESC, the preparation and info both methods share, and persistence;
ESC-T's mask training is :mod:`.esc_t`.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ...errors import SurgeryError, warn_user
from ...surgery import ERMModel, attach, model_device, num_classes_of, trace_model, unwrap
from ...unlearning.registry import register_method
from ...unlearning.request import MethodInfo, classifier_of, parse_request
from .graph import (
    SubspaceProjection,
    feature_dim_of,
    features_graph,
    insert_before_head,
)

__all__ = ["ESCConfig", "ESCInfo", "esc", "forget_features", "restore_projections",
           "NO_ZERO_GUARANTEE"]

#: The note every ESC / ESC-T info carries (and the docs repeat).
NO_ZERO_GUARANTEE = (
    "ESC does not guarantee 0% forget accuracy: it removes the forget classes' dominant "
    "feature directions before an unchanged head; check forget accuracy with "
    "erm_surgery.evaluate(). Logits are not masked.")


@dataclass
class ESCConfig:
    """Hyperparameters of ESC.

    Attributes:
        p: percentage of the feature dimension ``D`` to remove: ``k = floor(D * p / 100)``
            (reference default 1.5). Ignored when ``k`` is given.
        k: number of top left singular vectors to remove, overriding ``p``.
        batch_size: of the one feature-extraction pass over the forget samples.
    """

    p: float = 1.5
    k: int | None = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        if not 0.0 < float(self.p) <= 100.0:
            raise ValueError(f"p is a percentage of the feature dimension in (0, 100], "
                             f"got {self.p}")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int)
                                   or self.k < 1):
            raise ValueError(f"k must be a positive int or None, got {self.k!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(kw_only=True)
class ESCInfo(MethodInfo):
    """What one ESC / ESC-T request did (also set on the model as ``unlearning_info``).

    Attributes:
        method: ``"esc"`` or ``"esc_t"``.
        forget_classes: the class ids removed.
        head: module name of the classifier the projection feeds.
        num_features: ``D``, the classifier's input width.
        removed_directions: ESC: ``k``; ESC-T: ``D`` minus the rank of the kept map
            (usually 0: an elementwise mask shrinks directions without zeroing any; see
            ``energy_removed`` and ``mask_kept_fraction``).
        p: ESC's percentage (None when ``k`` was given, and for ESC-T).
        samples: forget samples whose features were decomposed.
        energy_removed: share of the forget features' squared norm in the removed
            directions (ESC; for ESC-T, ``1 - ||F_kept||^2 / ||F||^2``).
        singular_values: the largest singular values of the feature matrix (at most 16).
        seconds: wall time of the call.
        guarantees_zero_forget_accuracy: always False for ESC / ESC-T (see ``notes``).
        notes: caveats of this request.
        threshold, epochs_run, stopped_early, mask_kept_fraction, forget_train_accuracy,
        forget_accuracy_by_threshold: ESC-T only; the last is the forget-class *training*
            accuracy the learned mask gives when binarised at each of several thresholds.
    """

    head: str
    num_features: int
    removed_directions: int
    p: float | None
    samples: int
    energy_removed: float
    singular_values: list[float]
    guarantees_zero_forget_accuracy: bool = False
    notes: list[str] = field(default_factory=list)
    threshold: float | None = None
    epochs_run: int | None = None
    stopped_early: bool | None = None
    mask_kept_fraction: float | None = None
    forget_train_accuracy: float | None = None
    forget_accuracy_by_threshold: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------- features


def _pooled(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``(N, D)`` from the head's input: average over every non-batch, non-feature dim."""
    if x.dim() == 2:
        return x
    x = x.movedim(dim, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1]).mean(dim=1)


@torch.no_grad()
def forget_features(model: nn.Module, head: str, data: Dataset, device: torch.device,
                    batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input for every sample of ``data`` (eval mode, one pass), and labels.

    ``model`` is the plain (unwrapped) module; it is traced up to the head's input, so the
    head itself is not run.
    """
    gm = features_graph(trace_model(model, training=False), head)
    was_training = model.training
    model.eval()
    try:
        feats, labels = [], []
        for x, y in DataLoader(data, batch_size=batch_size):
            feats.append(gm(x.to(device)))
            labels.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels).to(device)


class _Prepared:
    """The pieces ESC and ESC-T share: a deep copy, its head, the forget features."""

    def __init__(self, model: nn.Module, classes: Iterable[int], data: Dataset | DataLoader,
                 accelerator: Any, batch_size: int) -> None:
        request = parse_request(model, classes, data, need_retain=False, need_forget=True)
        self.forget, self.num_classes = request.forget, request.num_classes
        dataset, forget_idx = request.dataset, request.forget_idx
        self.head, _ = classifier_of(model)
        # the copy is the model that is returned: the input is never modified
        self.base = copy.deepcopy(unwrap(model))
        self.dim = feature_dim_of(self.base.get_submodule(self.head))
        self.device = accelerator.device if accelerator is not None else model_device(model)
        self.base.to(self.device)
        self.raw, self.labels = forget_features(self.base, self.head, Subset(dataset,
                                                forget_idx), self.device, batch_size)
        self.example = next(iter(DataLoader(Subset(dataset, forget_idx[:2]), batch_size=2)))[0]
        pooled = _pooled(self.raw, self.dim).float()
        self.D = pooled.shape[1]
        self.matrix = pooled.T  # D x N, not centred (reference code)


def _module_name(mode: str) -> str:
    # the name records the mode, so a state dict alone can rebuild the model
    return "esc_projection" if mode == "remove" else "esc_t_projection"


def _finish(original: nn.Module, prepared: _Prepared, module: SubspaceProjection,
            info: ESCInfo) -> nn.Module:
    """Insert ``module`` before the head of the copy; re-attach when the input was attached."""
    projected = insert_before_head(prepared.base, prepared.head, module,
                                   name=_module_name(module.mode), inplace=True)
    out: nn.Module = projected
    if isinstance(original, ERMModel):
        out = _reattach(original, projected, prepared.example)
    out.eval()
    return out


def _reattach(original: ERMModel, projected: nn.Module, example: torch.Tensor) -> ERMModel:
    """Attach the projected model at the original's feature map and copy ``G``.

    The returned model is attached like the input, so ERM workflows (``G``, more ERM
    training, a later KTP request) go on. ``G`` and ``forgotten`` are copied unchanged: ESC does not
    prohibit channels, so it does not claim to have removed the classes from ``G``.
    """
    s = original.surgery
    # attach()'s default probe first (timm's pretrained_cfg size, carried over, else 224):
    # at a small data size the last map can be 1 x 1, which attach() rejects; then the
    # data's own size; then without the node name, in case retracing renamed it
    attempts = [{"feature_node": s.feature_node},
                {"feature_node": s.feature_node, "input_size": tuple(example.shape[1:])},
                {"input_size": tuple(example.shape[1:])}]
    for i, kwargs in enumerate(attempts):
        try:
            out = attach(projected, head=s.head, **kwargs)
            break
        except SurgeryError:
            if i == len(attempts) - 1:
                raise
    out.erm.load_state_dict(original.erm.state_dict())
    out.to(model_device(projected))
    return out


# ----------------------------------------------------------------------- ESC


def _restore(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The checkpoint loader's hook: projections rebuilt when the state dict has any."""
    if not any(_KEY.match(k) for k in state_dict):
        return model
    return restore_projections(model, state_dict)


@register_method("esc", config=ESCConfig, info=ESCInfo, group="training-free",
                 restore=_restore,
                 summary="remove the forget classes' top feature directions (Lee et al. 2025)")
def esc(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: ESCConfig,
    accelerator: Any = None,
) -> tuple[nn.Module, ESCInfo]:
    """ESC (Lee et al., CVPR 2025): remove the forget classes' top feature directions.

    Args:
        model: any classifier fx can trace whose head is an ``nn.Linear`` (or 1x1 conv) on
            the pooled features: a timm / torchvision CNN, a timm ViT, or an attached
            :class:`~erm_surgery.ERMModel`. Never modified.
        classes: class ids to forget.
        data: training data of ``(image, label)``; only the forget-class samples are read
            (one feature-extraction pass, eval mode).
        config: :class:`ESCConfig` (through :func:`erm_surgery.unlearn`, keyword overrides
            such as ``p=3`` or ``k=4`` are applied on top).
        accelerator: only its ``device`` is used (default: the model's device).

    Returns:
        ``(new_model, info)``. The new model is a :class:`~.graph.ProjectedModel` (the
        original's parameter names, plus an ``esc_projection`` module with the removed
        basis as a buffer), or an attached model wrapping one when ``model`` was attached.
        ``info.guarantees_zero_forget_accuracy`` is False: see the module docstring.
    """
    cfg = config
    prep = _Prepared(model, classes, data, accelerator, cfg.batch_size)
    U, S, _ = torch.linalg.svd(prep.matrix, full_matrices=False)
    notes = [NO_ZERO_GUARANTEE]
    if cfg.k is not None:
        k, p = cfg.k, None
    else:
        k, p = math.floor(prep.D * cfg.p / 100), float(cfg.p)
        if k < 1:
            msg = (f"p={cfg.p}% of D={prep.D} features is {prep.D * cfg.p / 100:.2f} "
                   "directions; removed 1 (pass k= or a larger p to choose)")
            warn_user(msg)
            notes.append(msg)
            k = 1
    if k > U.shape[1]:
        notes.append(f"k={k} exceeds the rank bound {U.shape[1]} of {prep.matrix.shape[1]} "
                     f"samples in {prep.D} dims; removed {U.shape[1]}")
        k = U.shape[1]
    basis = U[:, :k]
    energy = float((S[:k] ** 2).sum() / (S ** 2).sum().clamp_min(1e-12))
    module = SubspaceProjection(basis, mode="remove", dim=prep.dim,
                                num_classes=prep.num_classes)
    info = ESCInfo(method="esc", forget_classes=prep.forget, head=prep.head,
                   num_features=prep.D, removed_directions=k, p=p,
                   samples=int(prep.matrix.shape[1]), energy_removed=energy,
                   singular_values=[float(s) for s in S[:16]], notes=notes)
    return _finish(model, prep, module, info), info


# ----------------------------------------------------------------------- persistence

_KEY = re.compile(r"^(esc(_t)?_projection(_\d+)?)\.basis$")


def restore_projections(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild an ESC / ESC-T model from its plain architecture and its ``state_dict()``.

    The checkpoint loader calls it (through the restorer ESC registers) so that
    ``erm_surgery.load`` accepts a saved ESC model's ``esc_projection.basis`` keys; it
    re-inserts the projections (``esc_projection*``: remove, ``esc_t_projection*``:
    keep; in the order of the keys, which is the order they were applied) before the head
    of a copy of ``model``, then loads every weight. For an attached model's state dict,
    strip the ``model.`` prefix first (and re-attach).
    """
    head, _ = classifier_of(model)
    dim = feature_dim_of(unwrap(model).get_submodule(head))
    out: nn.Module = copy.deepcopy(unwrap(model))
    C = num_classes_of(model)
    for key, value in state_dict.items():
        match = _KEY.match(key)
        if match is None:
            continue
        mode = "keep" if match.group(2) else "remove"
        out = insert_before_head(out, head, SubspaceProjection(value, mode, dim, C),
                                 name=match.group(1), inplace=True)
    out.load_state_dict(state_dict)
    return out.eval()
