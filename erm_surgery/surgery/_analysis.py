"""Graph analysis for ``attach``: which node is the feature map, which modules the head.

Shape propagation on the eval graph has run before these functions are called, so every
node carries ``tensor_meta``. The feature node is the last 4-D activation with a spatial
extent that the logits depend on, after which only spatially reduced tensors flow into the
head. Errors list the candidate node names when the choice is ambiguous or overridden.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..errors import SurgeryError
from .tracing import ancestors, descendants, node_shape, output_node

__all__ = ["SurgeryInfo", "feature_candidates", "analyse", "probe_input"]

_DEFAULT_PROBE_SIZE = 224


@dataclass(frozen=True)
class SurgeryInfo:
    """Where the mask was inserted; saved in checkpoints and used to re-attach."""

    feature_node: str
    head: str
    num_classes: int
    num_channels: int
    channel_dim: int = 1
    head_modules: tuple[str, ...] = field(default_factory=tuple)
    feature_shape: tuple[int, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["head_modules"] = list(self.head_modules)
        d["feature_shape"] = list(self.feature_shape)
        return d


def _is_spatial_map(shape: tuple[int, ...] | None, batch: int) -> bool:
    # a 4-D map with at least two non-batch dims > 1: (N, K, H, W) or (N, H, W, K) with H*W > 1
    return (shape is not None and len(shape) == 4 and shape[0] == batch
            and sum(d > 1 for d in shape[1:]) >= 2)


def _is_token_sequence(shape: tuple[int, ...] | None) -> bool:
    return shape is not None and len(shape) == 3 and shape[1] > 1


def _logits_node(gm: fx.GraphModule) -> fx.Node:
    out = output_node(gm).args[0]
    if not isinstance(out, fx.Node):
        raise SurgeryError(
            "the model must return a logits tensor (N, C) in eval mode, but it returns "
            f"a {type(out).__name__}; wrap it so forward() returns the logits"
        )
    return out


def _param_inputs(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    """Targets of the parameters a functional node reads through ``get_attr`` inputs (a
    traced-through layer: ``linear(x, head_fc_weight, ...)``)."""
    return [str(a.target) for a in node.all_input_nodes
            if a.op == "get_attr" and isinstance(_get_attr(gm, a.target), nn.Parameter)]


def _has_params(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return any(True for _ in gm.get_submodule(node.target).parameters())
    if node.op == "get_attr":
        return isinstance(_get_attr(gm, node.target), nn.Parameter)
    return node.op in ("call_function", "call_method") and bool(_param_inputs(gm, node))


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _node_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def probe_input(model: nn.Module, input_size: Sequence[int] | None) -> torch.Tensor:
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if input_size is None:
        # in_chans from the first conv: a timm model built with in_chans=1 keeps the
        # 3-channel input_size of its pretrained_cfg
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        in_chans = first_conv.in_channels if first_conv is not None else 3
        cfg = getattr(model, "pretrained_cfg", None) or {}
        cfg_size = cfg.get("input_size") if isinstance(cfg, dict) else None
        side = tuple(cfg_size[1:]) if cfg_size else (_DEFAULT_PROBE_SIZE, _DEFAULT_PROBE_SIZE)
        input_size = (in_chans, *side)
    if len(input_size) != 3:
        raise SurgeryError(f"input_size must be (channels, height, width), got {input_size}")
    # batch of 2 so the batch dimension can be told apart from channels of size 1
    return torch.zeros((2, *input_size), device=device, dtype=dtype)


def feature_candidates(gm: fx.GraphModule) -> list[str]:
    """Names of the 4-D spatial activations the logits depend on (after shape propagation)."""
    logits = _logits_node(gm)
    upstream = ancestors(logits)
    return [n.name for n in gm.graph.nodes
            if n in upstream and n.op != "placeholder" and _is_spatial_map(node_shape(n), 2)]


def analyse(
    gm: fx.GraphModule,
    feature_node: str | None,
    head: str | None,
    num_classes: int | None,
) -> SurgeryInfo:
    logits = _logits_node(gm)
    lshape = node_shape(logits)
    if lshape is None or len(lshape) != 2:
        raise SurgeryError(
            f"the model's output has shape {lshape}, expected logits (N, C); attach() needs "
            "an image classifier"
        )
    C = lshape[1]
    if num_classes is not None and num_classes != C:
        raise SurgeryError(
            f"num_classes={num_classes} disagrees with the head, which outputs {C} logits; "
            f"pass num_classes={C} or omit it"
        )
    nodes = list(gm.graph.nodes)
    candidates = feature_candidates(gm)
    by_name = {n.name: n for n in nodes}

    if feature_node is not None:
        if feature_node not in by_name:
            raise SurgeryError(
                f"feature_node {feature_node!r} is not a node of the traced graph; "
                f"4-D candidates: {candidates[-12:]}"
            )
        feat = by_name[feature_node]
        if node_shape(feat) is None or len(node_shape(feat)) != 4:
            raise SurgeryError(
                f"feature_node {feature_node!r} has shape {node_shape(feat)}, expected a 4-D map; "
                f"candidates: {candidates[-12:]}"
            )
    else:
        if not candidates:
            raise SurgeryError(
                "no convolutional feature map feeds the classifier: no 4-D (N, K, H, W) "
                "activation with H*W > 1 reaches the logits (is this a transformer? "
                "ESC works on those; ERM needs a CNN)"
            )
        feat = by_name[candidates[-1]]
        segment = descendants(feat) & (ancestors(logits) | {logits})
        # after the feature map, only spatially pooled tensors may flow into the head;
        # a ViT's patch embedding is followed by token sequences and is rejected here
        bad = [n.name for n in nodes if n in segment and _is_token_sequence(node_shape(n))]
        if bad:
            raise SurgeryError(
                f"the last 4-D map {feat.name!r} is followed by token sequences "
                f"({bad[:3]}), not by global pooling: no conv feature map feeds the "
                f"classifier. Pass feature_node= one of {candidates[-12:]} if one is right"
            )
        if not any(_has_params(gm, n) for n in segment):
            # the classifier is itself a conv before pooling (squeezenet): the class-score
            # map is not a feature map, so step back to the classifier conv's input
            feat = _step_back_over_conv_classifier(gm, feat, C, candidates)
        moved = _at_classifier_input(gm, feat, logits)
        # a head= that holds those layers (timm's whole `head` container) keeps the map
        if head is None or _is_head(gm, head, _head_modules(gm, moved, logits)):
            feat = moved

    fshape = node_shape(feat)
    assert fshape is not None
    segment = descendants(feat) & (ancestors(logits) | {logits})
    head_nodes = [n for n in nodes if n in segment and _has_params(gm, n)]
    head_modules = _head_modules(gm, feat, logits)
    if not head_nodes and head is None:
        raise SurgeryError(
            f"no classifier with parameters between the feature map {feat.name!r} and the "
            "output: the model seems to return features (timm num_classes=0?). Attach a "
            "model with a classification head, or pass head= the classifier module name"
        )
    if head is None:
        if not head_modules:
            raise SurgeryError(
                f"the classifier after the feature map {feat.name!r} is functional code on "
                f"the model's own parameters ({[n.name for n in head_nodes][:3]}), not a "
                "module: unlearning needs a head module to cut. Make it an nn.Linear (or "
                "1x1 conv) submodule, or pass head= the module that holds its weights")
        head = head_modules[-1]
    else:
        try:
            gm.get_submodule(head)
        except AttributeError as err:
            raise SurgeryError(
                f"head {head!r} is not a submodule of the model; modules after the feature "
                f"map: {list(head_modules)}"
            ) from err
        if not _is_head(gm, head, head_modules):
            raise SurgeryError(
                f"head {head!r} is not a classifier: it is not a module with parameters "
                f"between the feature map {feat.name!r} and the logits; the head modules "
                f"there are {list(head_modules)}"
            )

    channel_dim = _channel_dim(fshape, [n for n in nodes if n in segment])
    return SurgeryInfo(
        feature_node=feat.name,
        head=head,
        num_classes=C,
        num_channels=fshape[channel_dim],
        channel_dim=channel_dim,
        head_modules=head_modules,
        feature_shape=tuple(fshape[1:]),
    )


def _channel_dim(fshape: tuple[int, ...], segment: Sequence[fx.Node]) -> int:
    """The channel dim of the map: the one global pooling keeps.

    It is read off the first tensor after the map (``segment`` is in graph order) that has
    lost its spatial extent, i.e. the pooled ``(N, K)`` or ``(N, K, 1, 1)`` vector, never the
    logits: with a 1x1-conv classifier after pooling (timm dla, dpn, resnetv2) the first
    2-D tensor is ``(N, C)``, and C = 7 on a 7 x 7 map would look like a channels-last K.
    """
    batch = fshape[0]
    for node in segment:
        shape = node_shape(node)
        if (shape is None or len(shape) not in (2, 4) or shape[0] != batch
                or _is_spatial_map(shape, batch)):
            continue
        kept = max(shape[1:])
        return 3 if kept != fshape[1] and kept == fshape[3] else 1
    return 1


def _is_head(gm: fx.GraphModule, head: str, head_modules: Sequence[str]) -> bool:
    """``head`` is one of ``head_modules`` (the modules with parameters between the
    feature map and the logits), or a container of some of them (timm's ``head``) whose
    every parameter belongs to one."""
    if head in head_modules:
        return True
    if not head or not any(h.startswith(head + ".") for h in head_modules):
        return False
    names = [f"{head}.{n}".rpartition(".")[0] for n, _ in
             gm.get_submodule(head).named_parameters()]
    return bool(names) and all(any(n == h or n.startswith(h + ".") for h in head_modules)
                               for n in names)


def _head_modules(gm: fx.GraphModule, feat: fx.Node, logits: fx.Node) -> tuple[str, ...]:
    """Names of the modules with parameters between ``feat`` and the logits, in order."""
    segment = descendants(feat) & (ancestors(logits) | {logits})
    names = (str(n.target) if n.op == "call_module"
             else _param_inputs(gm, n)[0].rpartition(".")[0]
             for n in gm.graph.nodes if n in segment and _has_params(gm, n))
    return tuple(dict.fromkeys(h for h in names if h))


def _at_classifier_input(gm: fx.GraphModule, feat: fx.Node, logits: fx.Node) -> fx.Node:
    """Where the classifier reads, when layers with parameters lie between the pooled map
    and the classifier: the last pooled ``(N, K', 1, 1)`` tensor after the last of them
    (ConvNeXt's pool -> LayerNorm -> linear; timm MobileNetV3's pool -> conv_head -> act
    -> linear), else ``feat``.

    A mask on the map is undone or mixed by such layers: a LayerNorm re-normalises the
    masked vector over the channels, so a prohibited (zeroed) channel reaches the
    classifier as ``-mean / std * weight + bias`` of the channels left, not as 0; a 1x1
    conv with a bias and an activation mixes the kept channels into every output. The ERM
    path and the plain path then feed the classifier differently distributed vectors.
    Measured (MNIST, docs/training.md): convnext_atto STD accuracy 0.930 / 0.934 (2 seeds)
    with the mask on the map, 0.951 / 0.951 at the classifier input (plain 0.952 / 0.942);
    mobilenetv3_large_100 seed 1, 4,000 digits, 0.879 against 0.942 (plain 0.946).
    Without a 4-D tensor there (torchvision MobileNetV3's Linear -> Hardswish -> Linear)
    the map is kept.
    """
    segment = descendants(feat) & ancestors(logits)
    nodes = [n for n in gm.graph.nodes if n in segment or n is logits]
    layers = [i for i, n in enumerate(nodes) if _has_params(gm, n)]
    if len(layers) < 2:  # the classifier alone: it reads the (pooled) map itself
        return feat
    fshape = node_shape(feat)
    for node in reversed(nodes[layers[-2]:layers[-1]]):
        shape = node_shape(node)
        if (shape is not None and len(shape) == 4 and shape[0] == fshape[0]
                and shape[2] == shape[3] == 1):
            return node
    return feat


def _step_back_over_conv_classifier(
    gm: fx.GraphModule, feat: fx.Node, C: int, candidates: list[str]
) -> fx.Node:
    node = feat
    while True:
        mod = _node_module(gm, node)
        if mod is not None and any(True for _ in mod.parameters()):
            if isinstance(mod, nn.Conv2d) and mod.out_channels == C:
                return node.all_input_nodes[0]
            break
        if len(node.all_input_nodes) != 1:
            break
        node = node.all_input_nodes[0]
    raise SurgeryError(
        f"no classifier found after the feature map {feat.name!r} and no conv classifier "
        f"with {C} output channels before it; pass head= and feature_node= (candidates: "
        f"{candidates[-12:]})"
    )

