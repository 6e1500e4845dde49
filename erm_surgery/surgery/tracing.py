"""THE fx tracer of erm-surgery and the graph walks built on it.

One set of leaf rules serves every part of the library that traces a model: ``attach``
(surgery), ESC's projection insertion, EC's supervision points and the evaluation's
layer-wise CKA. A rule added here reaches all of them. Each rule says why it exists:

- timm's registered no-trace modules and functions (``timm.layers._fx``): their owners
  marked them untraceable (data-dependent control flow, fused norm+act layers);
- torchvision's ``ops`` layers (``StochasticDepth`` reads ``self.training``);
- timm's ``DropPath`` / ``DropBlock2d`` (they branch on ``self.training``: traced through,
  the train graph would gain nodes the eval graph lacks);
- every subclass of ``nn.Linear`` / ``nn.Conv*d`` (timm's ``Linear``, ``Conv2dSame``): a
  head traced into ``F.linear`` would no longer show up as a module with parameters.

A newcomer fixing a tracing rule changes :func:`leaf_module_types` or :func:`leaf_modules`;
both tracers (:class:`ERMTracer` for surgery and the methods, :func:`trace_with_names` and
:func:`tracer_kwargs` for torchvision's feature extraction) read them.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from torch import fx, nn

from ..errors import SurgeryError

__all__ = ["ERMTracer", "leaf_module_types", "leaf_modules", "autowrap_functions",
           "tracer_kwargs", "trace_model", "trace_with_names", "ancestors", "descendants",
           "output_node", "node_shape", "find_classifier", "stage_names",
           "checkpointing_modules"]


def leaf_module_types() -> tuple[type, ...]:
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


def autowrap_functions() -> tuple[Any, ...]:
    """Functions kept as single graph nodes: timm's registered no-trace helpers."""
    try:
        from timm.layers import _fx as timm_fx

        return tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
    except ImportError:  # pragma: no cover
        return ()


def _autowrap_modules() -> tuple[Any, ...]:
    modules: tuple[Any, ...] = (math,)
    try:
        import torchvision.ops

        modules += (torchvision.ops,)  # torchvision's ops are not traceable
    except ImportError:  # pragma: no cover
        pass
    return modules


def leaf_modules() -> list[type]:
    """Every module type kept as one ``call_module`` node: the registered no-trace types
    above plus torch's linear/conv layers and all their subclasses. Subclasses outside
    torch.nn (``timm.layers.Linear``, ``Conv2dSame``...) would otherwise be traced into
    ``F.linear`` + ``get_attr`` nodes, and the head would no longer show up as a module
    with parameters."""
    return [*leaf_module_types(), nn.Linear, nn.modules.conv._ConvNd]


def tracer_kwargs() -> dict[str, Any]:
    """The rules as keyword arguments of torchvision's tracers (``NodePathTracer``,
    ``create_feature_extractor(tracer_kwargs=...)``)."""
    return {"leaf_modules": leaf_modules(), "autowrap_modules": _autowrap_modules(),
            "autowrap_functions": autowrap_functions()}


class ERMTracer(fx.Tracer):
    """fx tracer with the leaf rules above (module docstring)."""

    def __init__(self) -> None:
        super().__init__(autowrap_modules=_autowrap_modules(),
                         autowrap_functions=autowrap_functions())
        self._leaf_types = tuple(leaf_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(
            m, module_qualified_name)


def trace_with_names(model: nn.Module) -> tuple[fx.GraphModule, dict[fx.Node, str]]:
    """Trace ``model`` in its current mode with the same rules, and name every node the way
    ``torchvision.models.feature_extraction`` does (``layer3``, ``stages.2.blocks.1``...),
    so a layer name means the same node in two models of one architecture."""
    from torchvision.models.feature_extraction import NodePathTracer

    tracer = NodePathTracer(**tracer_kwargs())
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph), dict(tracer.node_to_qualname)


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
    # timm's grad checkpointing (``checkpoint_seq``) cannot be traced; the graph is traced
    # without it and ``attach`` re-creates it on the graph (surgery/_graphs.py)
    holders = checkpointing_modules(model)
    flags = [m.grad_checkpointing for m in holders]
    for m in holders:
        m.grad_checkpointing = False
    try:
        # first with optional None arguments fixed to None (hiera's ``mask=None`` otherwise
        # traces as a tensor input and takes the masked branch); some models cannot be
        # traced that way (timm ViTs), so fall back to fx's plain placeholders
        fixed = _optional_none_args(model)
        tracer = ERMTracer()
        try:
            graph = tracer.trace(model, concrete_args=fixed or None)
        except Exception:
            if not fixed:
                raise
            tracer = ERMTracer()
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
        for m, flag in zip(holders, flags, strict=True):
            m.grad_checkpointing = flag


def checkpointing_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that carry timm's ``grad_checkpointing`` flag (set by
    ``set_grad_checkpointing``: on the model, or on each stage for ConvNeXt-like models)."""
    return [m for m in model.modules()
            if isinstance(m.__dict__.get("grad_checkpointing"), bool)]


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


def output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None



# --------------------------------------------------------------------------- lookups


def _name_of(root: nn.Module, module: nn.Module) -> str | None:
    return next((n for n, m in root.named_modules() if m is module), None)


def _is_classifier_conv(m: nn.Module | None, num_classes: int | None) -> bool:
    return (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)
            and (num_classes is None or m.out_channels == num_classes))


def find_classifier(model: nn.Module, num_classes: int | None = None, *,
                    name: str | None = None) -> tuple[str, nn.Module] | None:
    """The final classifier layer of ``model`` as ``(qualified name in model, module)``.

    The one lookup behind ESC, EC, the baselines and the evaluation. Order of preference:

    1. the module called ``name`` (also looked up inside an attached model's ``.model``);
    2. an attached model's recorded head (``surgery.head``);
    3. timm's ``get_classifier()`` when it returns a Linear or a 1x1 Conv2d;
    4. the last ``nn.Linear`` with ``num_classes`` outputs, then the last 1x1 ``Conv2d``
       with ``num_classes`` output channels (SqueezeNet-style heads);
    5. with ``num_classes`` unknown, the last ``nn.Linear``.

    Returns None when nothing fits. Raises ``SurgeryError`` when ``name`` is not a
    submodule, listing the Linear / 1x1 conv layers the model has.
    """
    inner = model.__dict__.get("_modules", {}).get("model")
    surgery = model.__dict__.get("surgery")
    if name is None and surgery is not None and inner is not None:
        name = f"model.{surgery.head}"
    if name is not None:
        for root in (model, inner):
            if root is None:
                continue
            try:
                module = root.get_submodule(name)
            except AttributeError:
                continue
            return (_name_of(model, module) or name), module
        choices = [n for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) or _is_classifier_conv(m, None)]
        raise SurgeryError(f"classifier {name!r} is not a submodule of the model; Linear / "
                           f"1x1 conv layers it has: {choices[-8:]}")
    getter = getattr(model, "get_classifier", None)
    # a GraphModule's get_classifier (ESC's projected model) is itself this lookup
    if callable(getter) and not isinstance(model, fx.GraphModule):
        try:
            head = getter()
        except Exception:  # a broken helper only means "look at the modules instead"
            head = None
        if isinstance(head, nn.Linear) or _is_classifier_conv(head, None):
            found = _name_of(model, head)
            if found:
                return found, head
    modules = [(n, m) for n, m in model.named_modules() if n]
    linears = [(n, m) for n, m in modules if isinstance(m, nn.Linear)]
    if num_classes is None:
        return linears[-1] if linears else None
    exact = [(n, m) for n, m in linears if m.out_features == num_classes]
    convs = [(n, m) for n, m in modules if _is_classifier_conv(m, num_classes)]
    return (exact or convs or [None])[-1]


def stage_names(model: nn.Module) -> list[str] | None:
    """The stage outputs a timm model declares in ``feature_info`` (module names), if any.

    timm lists, per architecture, the modules whose outputs are its feature pyramid
    (``layer1..4`` of a ResNet, ``stages.0..3`` of a ConvNeXt, ``blocks.N`` of an
    EfficientNet). A wrapper around a timm model (an attached model) is searched too, and
    the names get the wrapper's prefix. Used by EC's supervision points and the
    evaluation's layer choice.
    """
    for prefix, m in model.named_modules():
        info = m.__dict__.get("feature_info")  # no __getattr__ fallbacks (attached models)
        names: list[str] = []
        if isinstance(info, (list, tuple)):
            names = [str(d["module"]) for d in info if isinstance(d, dict) and d.get("module")]
        elif info is not None and hasattr(info, "module_name"):  # timm FeatureInfo object
            try:
                names = [str(n) for n in info.module_name()]
            except Exception:  # an unusual FeatureInfo only means "no stages known"
                names = []
        if names:
            return [f"{prefix}.{n}" if prefix else n for n in names]
    return None
