"""Intermediate activations for layer-wise CKA, found and extracted with torch.fx.

Layers are named like ``torchvision.models.feature_extraction`` names them (``layer3``,
``stages.2.blocks.1.conv_dw``...), traced with the library's one tracer and leaf rules
(:func:`erm_surgery.surgery.tracing.trace_with_names`), so a layer name means the same node
in the evaluated, original and retrained models.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..surgery import model_device, stage_names
from ..surgery.tracing import trace_with_names, tracer_kwargs
from .cka import centered_gram
from .config import EvaluationError
from .features import progress
from .models import split_batch

__all__ = ["LayerNode", "activation_nodes", "stage_names", "choose_layers",
           "match_layers", "activation_grams"]


@dataclass(frozen=True)
class LayerNode:
    """One traced node: its feature-extraction name and output shape on the probe batch."""

    name: str
    shape: tuple[int, ...]


def _trace(module: nn.Module) -> tuple[fx.GraphModule, dict[fx.Node, str]]:
    was_training = module.training
    module.eval()  # CKA is measured in eval mode, so trace the eval graph
    try:
        return trace_with_names(module)
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError...
        raise EvaluationError(
            f"torch.fx cannot trace {type(module).__name__} for layer-wise CKA: "
            f"{type(err).__name__}: {err}") from err
    finally:
        module.train(was_training)


def activation_nodes(module: nn.Module, example: torch.Tensor, *, all_nodes: bool = False
                     ) -> list[LayerNode]:
    """Nodes of ``module``'s eval graph with their output shapes on ``example``.

    By default only 4-D activations ``(N, C, H, W)`` (CNN feature maps), in execution
    order; ``all_nodes=True`` lists every named tensor node (for validating user names).
    """
    gm, names = _trace(module)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example.to(model_device(module)))
    except Exception as err:
        raise EvaluationError(f"shape propagation of {type(module).__name__} failed: "
                              f"{type(err).__name__}: {err}") from err
    finally:
        module.train(was_training)
    out = []
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        name = names.get(node)
        if name is None or node.op in ("placeholder", "output") or meta is None:
            continue
        shape = tuple(getattr(meta, "shape", ()))
        if not shape or shape[0] != example.shape[0]:
            continue  # parameters, constants, or a tuple output
        if all_nodes or len(shape) == 4:
            out.append(LayerNode(name, shape))
    return out


def _evenly(items: Sequence[str], k: int) -> list[str]:
    """``k`` items spread evenly over ``items``, always keeping the first and the last."""
    if len(items) <= k:
        return list(items)
    if k == 1:
        return [items[-1]]
    picks = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in picks]


#: Top-level names of classifier heads: their 4-D nodes (a norm on the pooled 1x1 map in
#: timm's ConvNeXt head) are not feature stages.
_HEAD_NAMES = frozenset({"head", "fc", "classifier", "global_pool", "avgpool", "pre_logits",
                         "head_drop", "last_linear"})


def choose_layers(nodes: Sequence[LayerNode] | Sequence[str], max_layers: int = 6,
                  stages: Sequence[str] | None = None) -> list[str]:
    """Pick up to ``max_layers`` stage outputs among a model's traced nodes, evenly spaced.

    1. ``stages`` (from :func:`stage_names`) that exist in the graph, when two or more do.
    2. Otherwise a heuristic on the 4-D nodes (strings count as 4-D): a *stage* is a
       module that contains several of them (``layer1`` of a ResNet, ``stages.2``,
       ``features.denseblock3``); its output is its last node. The shallowest module depth
       with at least three stages is used (a ConvNeXt has only ``stem`` and ``stages`` at
       depth 1), heads excluded.
    3. Models without such nesting (VGG's flat ``features``) get evenly spaced 4-D nodes.
    """
    all_names = [n.name if isinstance(n, LayerNode) else str(n) for n in nodes]
    if stages:
        valid = [s for s in stages if _known(s, all_names)]
        if len(valid) >= 2:
            return _evenly(valid, max_layers)
    names = [n.name if isinstance(n, LayerNode) else str(n) for n in nodes
             if not isinstance(n, LayerNode) or len(n.shape) == 4]
    names = [n for n in names if n.split(".")[0] not in _HEAD_NAMES]
    if not names:
        return []
    best: list[str] = []
    for depth in (1, 2, 3):
        groups: dict[str, list[str]] = {}
        for name in names:
            parts = name.split(".")
            if len(parts) > depth:  # nodes directly at this depth are not inside a stage
                groups.setdefault(".".join(parts[:depth]), []).append(name)
        found = [members[-1] for members in groups.values() if len(members) > 1]
        if len(found) >= 3:
            best = found
            break
        if len(found) > len(best):
            best = found
    if len(best) < 2:
        best = names
    return _evenly(best, max_layers)


def _known(name: str, available: Iterable[str]) -> bool:
    # feature extraction accepts a module prefix ("layer1" = the last node inside it)
    return any(a == name or a.startswith(name + ".") for a in available)


def match_layers(
    names: Sequence[str], reference_nodes: Sequence[LayerNode], max_layers: int,
    *, explicit: bool, reference_stages: Sequence[str] | None = None,
    which: str = "reference",
) -> list[str]:
    """The reference model's layers paired with ``names`` of the evaluated model.

    Same architecture: the same names. Otherwise (a wrapper adds a prefix, or another
    architecture) the reference's own stages are chosen and paired by relative depth.
    Explicit names (``EvalConfig.cka_layers``) must exist in both models.
    """
    available = [n.name for n in reference_nodes]
    if all(_known(n, available) for n in names):
        return list(names)
    if explicit:
        missing = [n for n in names if not _known(n, available)]
        four_d = [n.name for n in reference_nodes if len(n.shape) == 4]
        raise EvaluationError(f"CKA layer(s) {missing} not found in the {which} model; "
                              f"its 4-D nodes include {_evenly(four_d, 12)}")
    own = choose_layers(reference_nodes, max_layers, reference_stages)
    if not own:
        return []
    if len(names) == 1:
        return [own[-1]]
    return [own[round(i * (len(own) - 1) / (len(names) - 1))] for i in range(len(names))]


def _shrink(x: torch.Tensor, max_dim: int) -> torch.Tensor:
    """Flatten an activation, average-pooling a large 4-D map spatially to <= max_dim."""
    if x.dim() == 4 and x[0].numel() > max_dim:
        c, h, w = x.shape[1:]
        side = max(1, math.isqrt(max(1, max_dim // c)))
        x = F.adaptive_avg_pool2d(x, (min(h, side), min(w, side)))
    return x.reshape(x.shape[0], -1)


@torch.no_grad()
def activation_grams(
    module: nn.Module,
    names: Sequence[str],
    loader: Iterable[Any],
    *,
    max_dim: int = 8192,
    show_progress: bool = False,
    desc: str = "cka",
) -> dict[str, torch.Tensor]:
    """Centred Gram matrix (n x n, float64) of each named activation over ``loader``.

    One pass over the loader with a ``create_feature_extractor`` graph returning all the
    nodes at once; activations are kept on the CPU only until their Gram is formed.
    """
    from torchvision.models.feature_extraction import create_feature_extractor

    was_training = module.training
    try:
        extractor = create_feature_extractor(
            module, return_nodes=list(names), tracer_kwargs=tracer_kwargs(),
            suppress_diff_warning=True)
    except Exception as err:
        raise EvaluationError(f"cannot build the CKA feature extractor for {list(names)}: "
                              f"{type(err).__name__}: {err}") from err
    finally:
        module.train(was_training)
    extractor.eval()
    device = model_device(module)
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for batch in progress(loader, desc, show_progress):
        x, _ = split_batch(batch)
        outs = extractor(x.to(device, non_blocking=True))
        for name in names:
            chunks[name].append(_shrink(outs[name].float(), max_dim).cpu())
    grams = {}
    for name in names:
        grams[name] = centered_gram(torch.cat(chunks.pop(name)))
    return grams
