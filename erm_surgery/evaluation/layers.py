"""Intermediate activations for layer-wise CKA, found and extracted with torch.fx.

Layers are named like ``torchvision.models.feature_extraction`` names them (``layer3``,
``stages.2.blocks.1.conv_dw``...), traced with the same leaf rules timm uses for its own
feature extraction (``timm.layers.get_notrace_modules`` / ``get_notrace_functions``), so a
layer name means the same node in the evaluated, original and retrained models.
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

from ..surgery import model_device
from .cka import centered_gram
from .config import EvaluationError
from .features import progress
from .models import split_batch

__all__ = ["LayerNode", "fx_tracer_kwargs", "activation_nodes", "stage_names", "choose_layers",
           "match_layers", "activation_grams"]


@dataclass(frozen=True)
class LayerNode:
    """One traced node: its feature-extraction name and output shape on the probe batch."""

    name: str
    shape: tuple[int, ...]


def fx_tracer_kwargs() -> dict[str, Any]:
    """Tracer settings: timm's no-trace modules and functions, torchvision's op leaves."""
    leaf: list[type] = []
    wrap: list[Any] = []
    try:
        from timm.layers import _fx as timm_fx

        leaf += list(timm_fx.get_notrace_modules())
        # timm may register a function by name; the fx tracer wants the callable
        wrap += [f for f in timm_fx.get_notrace_functions() if callable(f)]
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    kwargs: dict[str, Any] = {"leaf_modules": leaf, "autowrap_functions": wrap}
    try:  # private helper: adds torchvision.ops leaves and math/torchvision.ops autowrap
        from torchvision.models.feature_extraction import _set_default_tracer_kwargs

        kwargs = _set_default_tracer_kwargs(kwargs)
    except ImportError:  # pragma: no cover - older/newer torchvision
        pass
    return kwargs


def _trace(module: nn.Module) -> tuple[fx.GraphModule, dict[fx.Node, str]]:
    from torchvision.models.feature_extraction import NodePathTracer

    was_training = module.training
    module.eval()  # CKA is measured in eval mode, so trace the eval graph
    try:
        tracer = NodePathTracer(**fx_tracer_kwargs())
        graph = tracer.trace(module)
        return fx.GraphModule(tracer.root, graph), dict(tracer.node_to_qualname)
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


def stage_names(module: nn.Module) -> list[str] | None:
    """The stage outputs a timm model declares in ``feature_info`` (module names), if any.

    timm lists, per architecture, the modules whose outputs are its feature pyramid
    (``layer1..4`` of a ResNet, ``stages.0..3`` of a ConvNeXt, ``blocks.N`` of an
    EfficientNet): the natural depths for layer-wise CKA. A wrapper around a timm model
    is searched too, and the names get the wrapper's prefix.
    """
    for prefix, m in module.named_modules():
        info = m.__dict__.get("feature_info")  # no __getattr__ fallbacks (attached models)
        if isinstance(info, list) and info and all(
                isinstance(d, dict) and isinstance(d.get("module"), str) for d in info):
            return [f"{prefix}.{d['module']}" if prefix else d["module"] for d in info]
    return None


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
            module, return_nodes=list(names), tracer_kwargs=fx_tracer_kwargs(),
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
