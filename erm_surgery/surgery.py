"""Model surgery: put an ERM mask on the last conv feature map of any CNN classifier.

How it works, top to bottom:

1. ``attach`` deep-copies the user's model (their object is never changed) and traces the
   copy with torch.fx twice, once in train mode and once in eval mode. An fx graph freezes
   every ``if self.training`` it meets (timm's functional dropout in ``forward_head``,
   drop-path, BatchNorm-act layers that are traced through), so one graph per mode keeps
   train-mode behaviour exact; the model picks the graph of its current mode, like
   torchvision's ``DualGraphModule``.
2. Shape propagation on the eval graph finds the *feature node*: the last 4-D activation
   with a spatial extent that the logits depend on, after which only spatially reduced
   tensors flow into the head. Its channel count is K; the logits' width is C.
3. An ``apply_channel_mask`` node is inserted right after the feature node, fed by a new
   optional graph input ``erm_weights``. With ``erm_weights=None`` (the STD path) it returns
   the map itself, so ``model(x)`` is bit-identical to the original.

The graphs call the very same submodules as ``ERMModel.model`` (the copy), so parameters
live once, in ``model.model`` and ``model.erm``; the graphs are kept outside the module
registry so ``state_dict()``, ``.to()``, DDP and optimisers see each parameter once.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import SurgeryError
from .mask import ERMMask, apply_channel_mask

__all__ = ["attach", "detach", "unwrap", "is_attached", "num_classes_of", "ERMModel", "SurgeryInfo",
           "trace_model", "feature_candidates"]

_WEIGHTS_INPUT = "erm_weights"
_DEFAULT_PROBE_SIZE = 224


# --------------------------------------------------------------------------- tracing


def _leaf_module_types() -> tuple[type, ...]:
    """Module types fx must not trace into, with the reason recorded by their owners.

    timm registers its untraceable layers (data-dependent control flow, e.g. ``ConvMlp``;
    fused norm+act layers, ``BatchNormAct2d``) with ``register_notrace_module``;
    torchvision does the same for ``torchvision.ops`` layers (``StochasticDepth`` reads
    ``self.training``, so as a leaf it keeps working in both modes).
    """
    types: list[type] = []
    try:
        from timm.layers import _fx as timm_fx

        types += list(timm_fx.get_notrace_modules())
        # drop-path and drop-block branch on ``self.training``: traced through, the
        # train-mode graph gains nodes the eval graph lacks and node names shift; as
        # leaves they keep their runtime behaviour in both modes
        from timm.layers import DropBlock2d, DropPath

        types += [DropPath, DropBlock2d]
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    try:
        from torchvision.models import feature_extraction as tv_fx

        types += list(tv_fx._get_leaf_modules_for_ops())
    except (ImportError, AttributeError):  # pragma: no cover - private torchvision API
        pass
    return tuple(types)


def _autowrap_functions() -> tuple[Any, ...]:
    """Functions kept as single graph nodes: timm's registered no-trace helpers."""
    try:
        from timm.layers import _fx as timm_fx

        return tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
    except ImportError:  # pragma: no cover
        return ()


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        autowrap_modules: tuple[Any, ...] = (math,)
        try:
            import torchvision.ops

            autowrap_modules += (torchvision.ops,)  # torchvision's ops are not traceable
        except ImportError:  # pragma: no cover
            pass
        super().__init__(autowrap_modules=autowrap_modules,
                         autowrap_functions=_autowrap_functions())
        self._leaf_types = _leaf_module_types()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        # subclasses of torch's linear/conv layers outside torch.nn (timm.layers.Linear,
        # Conv2dSame, ...) would be traced into F.linear + get_attr nodes, and the head would
        # no longer show up as a module with parameters
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _optional_none_args(model: nn.Module) -> dict[str, Any]:
    """``forward`` arguments after the input that default to None: a classifier is called
    with the image alone, so they are fixed to None for tracing."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return {}
    return {p.name: None for p in params[1:]
            if p.default is None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def trace_model(model: nn.Module, training: bool) -> fx.GraphModule:
    """Trace ``model`` in train or eval mode with timm/torchvision leaf rules.

    The returned GraphModule calls ``model``'s own submodules (shared, not copied).
    Raises ``SurgeryError`` when fx cannot trace the model.
    """
    was_training = model.training
    model.train(training)
    try:
        # first with optional None arguments fixed to None (hiera's ``mask=None`` otherwise
        # traces as a tensor input and takes the masked branch); some models cannot be
        # traced that way (timm ViTs), so fall back to fx's plain placeholders
        fixed = _optional_none_args(model)
        tracer = _Tracer()
        try:
            graph = tracer.trace(model, concrete_args=fixed or None)
        except Exception:
            if not fixed:
                raise
            tracer = _Tracer()
            graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as err:  # fx raises many types: TraceError, TypeError, RuntimeError...
        raise SurgeryError(
            f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}. "
            "Models with data-dependent control flow in forward() need that part wrapped "
            "as a leaf module (timm.layers.register_notrace_module) or a no-trace function "
            "(timm.layers.register_notrace_function) before attach()."
        ) from err
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- analysis


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


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _is_spatial_map(shape: tuple[int, ...] | None, batch: int) -> bool:
    # a 4-D map with at least two non-batch dims > 1: (N, K, H, W) or (N, H, W, K) with H*W > 1
    return (shape is not None and len(shape) == 4 and shape[0] == batch
            and sum(d > 1 for d in shape[1:]) >= 2)


def _is_token_sequence(shape: tuple[int, ...] | None) -> bool:
    return shape is not None and len(shape) == 3 and shape[1] > 1


def ancestors(node: fx.Node, stop: fx.Node | None = None) -> set[fx.Node]:
    """Every node ``node`` depends on; the search does not continue past ``stop``."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        for parent in n.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                if parent is not stop:
                    todo.append(parent)
    return seen


def descendants(node: fx.Node) -> set[fx.Node]:
    """Every node that depends on ``node``."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def _output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def _logits_node(gm: fx.GraphModule) -> fx.Node:
    out = _output_node(gm).args[0]
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


def _probe_input(model: nn.Module, input_size: Sequence[int] | None) -> torch.Tensor:
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
            if n in upstream and n.op != "placeholder" and _is_spatial_map(_shape(n), 2)]


def _analyse(
    gm: fx.GraphModule,
    feature_node: str | None,
    head: str | None,
    num_classes: int | None,
) -> SurgeryInfo:
    logits = _logits_node(gm)
    lshape = _shape(logits)
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
        if _shape(feat) is None or len(_shape(feat)) != 4:
            raise SurgeryError(
                f"feature_node {feature_node!r} has shape {_shape(feat)}, expected a 4-D map; "
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
        bad = [n.name for n in segment if _is_token_sequence(_shape(n))]
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

    fshape = _shape(feat)
    assert fshape is not None
    segment = descendants(feat) & (ancestors(logits) | {logits})
    head_nodes = [n for n in nodes if n in segment and _has_params(gm, n)]
    if not head_nodes and head is None:
        raise SurgeryError(
            f"no classifier with parameters between the feature map {feat.name!r} and the "
            "output: the model seems to return features (timm num_classes=0?). Attach a "
            "model with a classification head, or pass head= the classifier module name"
        )
    head_modules = tuple(str(n.target) if n.op == "call_module"
                         else _param_inputs(gm, n)[0].rpartition(".")[0] for n in head_nodes)
    head_modules = tuple(dict.fromkeys(h for h in head_modules if h))
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

    # channel layout: the channel dim is the one the pooled vector keeps
    pooled = next((_shape(n) for n in nodes if n in segment and _shape(n) is not None
                   and len(_shape(n)) == 2), None)
    channel_dim = 1
    if pooled is not None and fshape[1] != pooled[1] and fshape[3] == pooled[1]:
        channel_dim = 3
    return SurgeryInfo(
        feature_node=feat.name,
        head=head,
        num_classes=C,
        num_channels=fshape[channel_dim],
        channel_dim=channel_dim,
        head_modules=head_modules,
        feature_shape=tuple(fshape[1:]),
    )


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


# --------------------------------------------------------------------------- graph edits


def _insert_mask(gm: fx.GraphModule, feature_node: str, channel_dim: int,
                 expect: tuple[str, Any] | None = None) -> None:
    """Insert the mask after ``feature_node``; ``expect`` is the node's (op, target) in the
    eval graph, checked so a train graph that traces differently cannot mask another node."""
    graph = gm.graph
    feat = next((n for n in graph.nodes if n.name == feature_node), None)
    if feat is None or (expect is not None and (feat.op, feat.target) != expect):
        raise SurgeryError(
            f"feature node {feature_node!r} is "
            f"{'missing from' if feat is None else 'a different operation in'} the train-mode "
            "graph: the model traces differently in train and eval mode (a branch on "
            "self.training in a module that is traced through). Register that module as a "
            "leaf (timm.layers.register_notrace_module) and attach again"
        )
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        weights = graph.placeholder(_WEIGHTS_INPUT, default_value=None)
    with graph.inserting_after(feat):
        masked = graph.call_function(apply_channel_mask, (feat, weights),
                                     {"channel_dim": channel_dim})
    # the recipe in the fx docs would also rewire ``masked`` onto itself
    feat.replace_all_uses_with(masked, delete_user_cb=lambda user: user is not masked)
    masked.name = "erm_mask"
    graph.lint()
    gm.recompile()


def _mask_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes
                if n.op == "call_function" and n.target is apply_channel_mask)


def _returned_tensors(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes the graph returns: one, or the members of a returned (named) tuple."""
    out = _output_node(gm).args[0]
    if isinstance(out, fx.Node) and out.op == "call_function" and isinstance(
            out.target, type) and issubclass(out.target, tuple):
        out = out.args  # a namedtuple built in forward (torchvision GoogLeNetOutputs)
    if isinstance(out, (tuple, list)):
        return [a for a in out if isinstance(a, fx.Node)]
    return [out] if isinstance(out, fx.Node) else []


def _check_no_bypass(gm: fx.GraphModule) -> None:
    mask = _mask_node(gm)

    def leaks_of(node: fx.Node) -> list[str]:
        return [n.name for n in ancestors(node, stop=mask) | {node}
                if n.op == "placeholder" and n.name != _WEIGHTS_INPUT]

    # a returned structure fx does not see into (a dict...) is checked as a whole
    outputs = _returned_tensors(gm) or [_output_node(gm)]
    leaks = [leaks_of(node) for node in outputs]
    if len(outputs) > 1 and not leaks[0]:
        aux = [i for i, found in enumerate(leaks) if found]
        if aux:
            raise SurgeryError(
                f"in train mode the model returns {len(outputs)} outputs and output(s) {aux} "
                "(auxiliary classifiers) read earlier maps that bypass the mask. Build the "
                "model without auxiliary heads (torchvision googlenet / inception_v3: "
                "aux_logits=False) and attach again"
            )
    if any(leaks):
        raise SurgeryError(
            "the input reaches the head around the feature map (a skip connection past the "
            "mask), so masking could not remove a class. Pass feature_node= a block output, "
            "or a larger input_size= if the last maps are 1 x 1 at the probe size"
            + (". The model computes attention, whose (N, heads, L, D) tensors look like 4-D "
               "maps: ERM needs a CNN (method='esc' works on transformers)"
               if any(n.target is torch.nn.functional.scaled_dot_product_attention
                      for n in gm.graph.nodes) else "")
        )


def _features_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Copy of ``gm`` whose output is the (masked) feature map."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(gm.graph, env)
    graph.output(env[_mask_node(gm)])
    features = fx.GraphModule(gm, graph, "ERMFeatures")
    features.graph.eliminate_dead_code()
    features.recompile()
    return features


def _head_graph(gm: fx.GraphModule) -> fx.GraphModule | None:
    """Graph from the masked feature map to the logits, or None if the head also reads
    tensors computed before the feature node."""
    mask = _mask_node(gm)
    out = _output_node(gm)
    needed = ancestors(out, stop=mask)
    after = descendants(mask)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {mask: graph.placeholder("features")}
    for node in gm.graph.nodes:
        if node is mask or node not in needed or node.op == "output":
            continue
        if node not in after and node.op != "get_attr":
            return None
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(fx.map_arg(out.args[0], lambda n: env[n]))
    return fx.GraphModule(gm, graph, "ERMHead")


def _build_graphs(base: nn.Module, info: SurgeryInfo,
                  eval_gm: fx.GraphModule | None = None) -> dict[str, fx.GraphModule | None]:
    """Train- and eval-mode graphs (full, features, head) with the mask inserted."""
    graphs: dict[str, fx.GraphModule | None] = {}
    expect = None
    for split in ("eval", "train"):
        gm = eval_gm if split == "eval" and eval_gm is not None else trace_model(
            base, training=split == "train")
        if split == "eval":
            feat = next((n for n in gm.graph.nodes if n.name == info.feature_node), None)
            expect = None if feat is None else (feat.op, feat.target)
        _insert_mask(gm, info.feature_node, info.channel_dim, expect)
        _check_no_bypass(gm)
        graphs[f"full_{split}"] = gm
        graphs[f"features_{split}"] = _features_graph(gm)
        graphs[f"head_{split}"] = _head_graph(gm)
    return graphs


def head_roles(model: ERMModel) -> tuple[list[str], list[str]]:
    """``(readers, classifiers)``: the head layers that read the masked map, and those whose
    output is the logits, each without another weighted head layer in between.

    A sequential head (mobilenetv3's ``conv_head`` then ``classifier``) has one of each;
    parallel heads averaged into the logits (a distilled model's ``head`` and ``head_dist``)
    are each both. Per-channel layers (a norm of K channels) are looked through. Unlearning
    cuts the prohibited channels from every reader and the forget rows from every classifier.
    """
    gm = model.__dict__["_graphs"]["full_eval"]
    mask = _mask_node(gm)
    K = model.surgery.num_channels
    names = set(model.surgery.head_modules)

    def blocking(name: str) -> bool:
        w = getattr(model.model.get_submodule(name), "weight", None)
        return isinstance(w, torch.Tensor) and not (w.dim() == 1 and w.numel() == K)

    layers = {n: str(n.target) for n in gm.graph.nodes
              if n.op == "call_module" and str(n.target) in names and blocking(str(n.target))}
    readers = [name for n, name in layers.items()
               if not (ancestors(n, stop=mask) & (layers.keys() - {n}))]
    classifiers = [name for n, name in layers.items()
                   if not (descendants(n) & (layers.keys() - {n}))]
    return list(dict.fromkeys(readers)), list(dict.fromkeys(classifiers))


# --------------------------------------------------------------------------- the model


class ERMModel(nn.Module):
    """A classifier with an ERM mask on its last conv feature map.

    - ``model(x)``: STD path, bit-identical to the original model.
    - ``model(x, labels=y)``: ERM path, each sample's map multiplied by ``G[y]``.
    - ``model(x, channel_mask=m)``: the map multiplied by an explicit ``(K,)`` or ``(N, K)``
      mask (prohibition tests, unlearning).

    ``model.model`` is the (copied) original architecture, ``model.erm`` the mask,
    ``model.surgery`` a :class:`SurgeryInfo`. timm's ``num_classes``, ``num_features``,
    ``pretrained_cfg``/``default_cfg``, ``get_classifier``, ``forward_features`` and
    ``forward_head`` keep working; other attributes are looked up on ``model.model``.
    """

    def __init__(self, model: nn.Module, graphs: dict[str, fx.GraphModule | None],
                 info: SurgeryInfo, mask: ERMMask) -> None:
        super().__init__()
        self.model = model
        self.erm = mask
        # outside the registry on purpose: the graphs call model's own submodules
        self.__dict__["_graphs"] = graphs
        self.__dict__["surgery"] = info

    # Graphs are not pickled (fx would re-trace their generated code, and that code calls
    # apply_channel_mask, which has Python control flow): they are rebuilt from the model.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_graphs", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__["_graphs"] = _build_graphs(self.model, self.surgery)

    # -- attribute fallback: training code asks timm models for many things
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name.startswith("_") or "model" not in modules:
                raise
            return getattr(modules["model"], name)

    @property
    def num_classes(self) -> int:
        return self.surgery.num_classes

    @property
    def num_features(self) -> int:
        return getattr(self.model, "num_features", self.surgery.num_channels)

    def _graph(self, kind: str) -> fx.GraphModule:
        gm = self._graphs[f"{kind}_{'train' if self.training else 'eval'}"]
        if gm is None:
            raise NotImplementedError(
                "forward_head is not available: the head of this model also reads tensors "
                "computed before the feature map"
            )
        return gm

    def _weights(self, x: torch.Tensor, labels: torch.Tensor | None,
                 channel_mask: torch.Tensor | None) -> torch.Tensor | None:
        if labels is not None and channel_mask is not None:
            raise ValueError("pass labels= or channel_mask=, not both")
        if labels is not None:
            return self.erm.weights(_check_labels(labels, x.shape[0], self.num_classes))
        if channel_mask is not None:
            return _check_channel_mask(channel_mask, x.shape[0], self.surgery.num_channels)
        return None

    @property
    def has_head_graph(self) -> bool:
        """Whether :meth:`forward_head` works: the head reads only the feature map."""
        return self._graphs["head_eval"] is not None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, *,
                channel_mask: torch.Tensor | None = None,
                return_features: bool | Literal["both"] = False,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (STD path, or ERM path with ``labels=`` / ``channel_mask=``).

        ``return_features=True`` returns the (masked) feature map instead, and
        ``return_features="both"`` returns ``(features, logits)`` from one pass (needs
        :attr:`has_head_graph`). Both go through ``forward`` so that wrappers such as DDP
        see the call.
        """
        weights = self._weights(x, labels, channel_mask)
        if return_features == "both":
            features = self._graph("features")(x, **{_WEIGHTS_INPUT: weights})
            return features, self._graph("head")(features)
        kind = "features" if return_features else "full"
        return self._graph(kind)(x, **{_WEIGHTS_INPUT: weights})

    def forward_features(self, x: torch.Tensor, labels: torch.Tensor | None = None, *,
                         channel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The feature map at the mask (masked on the ERM path)."""
        weights = self._weights(x, labels, channel_mask)
        return self._graph("features")(x, **{_WEIGHTS_INPUT: weights})

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits from a feature map returned by :meth:`forward_features`."""
        if pre_logits:
            if not hasattr(self.model, "forward_head"):
                raise NotImplementedError("pre_logits needs the original model's forward_head")
            return self.model.forward_head(features, pre_logits=True)
        return self._graph("head")(features)

    def get_classifier(self) -> nn.Module:
        if hasattr(self.model, "get_classifier"):
            return self.model.get_classifier()
        return self.model.get_submodule(self.surgery.head)


def _check_labels(labels: torch.Tensor, batch: int, num_classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"labels must be an integer tensor of class ids, got {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), one per sample, got "
                         f"{tuple(labels.shape)}")
    if labels.device.type == "cpu":
        if batch and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels must be class ids in 0..{num_classes - 1}, got values "
                             f"{int(labels.min())}..{int(labels.max())}")
    else:  # no host sync on accelerators: the check runs on the device
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(),
                            "labels out of range for the ERM mask")
    return labels.long()


def _check_channel_mask(mask: torch.Tensor, batch: int, num_channels: int) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"channel_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape not in ((num_channels,), (batch, num_channels)):
        raise ValueError(f"channel_mask must have shape ({num_channels},) or "
                         f"({batch}, {num_channels}), got {tuple(mask.shape)}")
    return mask.float() if mask.dtype == torch.bool else mask


# --------------------------------------------------------------------------- public API


def is_attached(model: nn.Module) -> bool:
    """True for a model returned by :func:`attach`."""
    return isinstance(model, ERMModel)


def num_classes_of(model: nn.Module) -> int:
    """Number of classes of an attached or plain classifier.

    Attached models know it; timm models carry ``num_classes``; otherwise the last
    ``nn.Linear``'s output width is taken.
    """
    if isinstance(model, ERMModel):
        return model.num_classes
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise SurgeryError(f"cannot tell how many classes {type(model).__name__} has: no "
                           "num_classes attribute and no nn.Linear classifier")
    return last.out_features


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (or buffer); CPU for a parameter-free module."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def unwrap(model: nn.Module) -> nn.Module:
    """The original-architecture module inside an attached model (itself otherwise)."""
    return model.model if isinstance(model, ERMModel) else model


def attach(
    model: nn.Module,
    *,
    feature_node: str | None = None,
    head: str | None = None,
    num_classes: int | None = None,
    input_size: Sequence[int] | None = None,
    init: float = 0.5,
) -> ERMModel:
    """Return a copy of ``model`` with an ERM mask on its last conv feature map.

    Args:
        model: a timm or torchvision CNN classifier (any ``nn.Module`` fx can trace whose
            eval-mode output is logits ``(N, C)``). It is deep-copied: the returned model
            shares no parameters with it, and the original is never modified.
        feature_node: fx node name of the feature map, overriding the automatic choice (the
            last 4-D activation the logits depend on). Errors list the candidates.
        head: module name of the classifier, overriding the automatic choice.
        num_classes: expected C; an error if the head disagrees.
        input_size: (channels, height, width) of the probe input for shape propagation;
            default: timm's ``pretrained_cfg['input_size']``, else (in_chans, 224, 224).
            Use a size at which the last feature map is larger than 1 x 1.
        init: initial value of every entry of ``G``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        SurgeryError: already attached, untraceable, no conv feature map, no classifier,
            or an override that does not fit.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach() takes a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, ERMModel):
        raise SurgeryError("this model already has an ERM mask; attach() the plain model, or "
                           "use erm_surgery.detach(model) to get it back")
    if any(isinstance(m, ERMModel) for m in model.modules()):
        raise SurgeryError("the model contains an attached ERMModel; attach only once")
    base = copy.deepcopy(model)
    mode = base.training

    eval_gm = trace_model(base, training=False)
    probe = _probe_input(base, input_size)
    base.eval()
    try:
        # ShapeProp prints the traceback of a failing node itself; our error says it all
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(eval_gm).propagate(probe)
    except Exception as err:
        raise SurgeryError(
            f"shape propagation failed on a {tuple(probe.shape)} input: "
            f"{type(err).__name__}: {err}. Pass input_size=(C, H, W) that the model accepts"
        ) from err
    finally:
        base.train(mode)
    info = _analyse(eval_gm, feature_node, head, num_classes)

    graphs = _build_graphs(base, info, eval_gm)
    mask = ERMMask(info.num_classes, info.num_channels, init=init)
    param = next(iter(base.parameters()), None)
    if param is not None:
        mask.to(param.device)
    erm_model = ERMModel(base, graphs, info, mask)
    erm_model.train(mode)
    return erm_model


def detach(model: ERMModel) -> nn.Module:
    """The plain model without the mask node, for deployment (a copy; its STD path).

    Weights changed by training or unlearning are kept; ``G`` is dropped.
    """
    if not isinstance(model, ERMModel):
        raise TypeError(f"detach() takes a model returned by attach(), got "
                        f"{type(model).__name__}")
    return copy.deepcopy(model.model)
