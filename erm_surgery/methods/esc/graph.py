"""torch.fx helpers shared by ESC, ESC-T and EC: find the classifier, edit the graph around it.

The tracing rules are the surgery module's (:func:`erm_surgery.surgery.trace_model`: timm's
and torchvision's no-trace leaf modules and functions), so any model that ``attach()`` can
trace works here too, and the node names are the same.

Why fx and not a forward hook: a hook is invisible in ``print(model)`` and in
``state_dict()``, is silently dropped by ``torch.fx`` / ``torch.compile`` / export, and
cannot be saved with the weights. A node in the graph calling a registered submodule is
part of the model: its basis is a buffer in the state dict and the edit survives
``copy.deepcopy``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from ...errors import UnlearningError
from ...surgery import descendants, find_classifier, trace_model

__all__ = ["SubspaceProjection", "ProjectedModel", "feature_dim_of", "head_node",
           "insert_before_head", "features_graph", "tail_graph", "node_module_paths"]


class SubspaceProjection(nn.Module):
    """Linear map on the classifier's input features, applied along ``dim``.

    - ``mode="remove"`` (ESC): ``x - B B^T x`` with ``B`` (D x k) orthonormal, i.e. the
      projection onto the orthogonal complement of ``span(B)``.
    - ``mode="keep"`` (ESC-T): ``B B^T x`` with ``B = U * M``, the reference code's map
      (with the binary mask the columns of ``B`` are no longer orthonormal, so this is
      a general rank-limited linear map, not a projection).

    ``basis`` is a buffer: it is saved in ``state_dict()`` and moved by ``.to()``.
    """

    def __init__(self, basis: torch.Tensor, mode: str = "remove", dim: int = -1,
                 num_classes: int | None = None) -> None:
        super().__init__()
        if mode not in ("remove", "keep"):
            raise ValueError(f"mode must be 'remove' or 'keep', got {mode!r}")
        if basis.dim() != 2:
            raise ValueError(f"basis must be a (D, k) matrix, got shape {tuple(basis.shape)}")
        self.register_buffer("basis", basis.detach().clone())
        self.mode = mode
        self.dim = dim
        # kept here so the projected GraphModule can still answer ``num_classes``
        self.num_classes = num_classes

    def extra_repr(self) -> str:
        d, k = self.basis.shape
        return f"mode={self.mode!r}, dim={self.dim}, features={d}, columns={k}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moved = self.dim not in (-1, x.dim() - 1)
        if moved:
            x = x.movedim(self.dim, -1)
        b = self.basis.to(dtype=x.dtype)
        coords = x @ b  # (..., k) coordinates in the basis
        out = coords @ b.T if self.mode == "keep" else x - coords @ b.T
        return out.movedim(-1, self.dim) if moved else out


#: Plain attributes of timm models kept on the projected model: ``feature_info`` (stage
#: names: layer-wise CKA picks the same layers as on the original), ``pretrained_cfg`` /
#: ``default_cfg`` (input size: ``attach()``'s probe), ``num_features``.
CARRIED_ATTRIBUTES = ("feature_info", "pretrained_cfg", "default_cfg", "num_features")


class ProjectedModel(fx.GraphModule):
    """A classifier with a :class:`SubspaceProjection` node before its head.

    A torchvision ``DualGraphModule``: one graph traced in train mode and one in eval mode
    (an fx graph freezes every ``if self.training`` it meets), switched by ``.train()``.
    Its submodules keep the original model's qualified names, so ``state_dict()`` keys,
    layer names for CKA, and ``get_submodule("fc")`` are the original's, plus the
    projection module(s) (``esc_projection``, ``esc_projection_1``... for later requests).
    """

    # created by _make_projected_model; the class body only adds conveniences
    @property
    def num_classes(self) -> int:  # type: ignore[override]
        for m in self.modules():
            if isinstance(m, SubspaceProjection) and m.num_classes is not None:
                return m.num_classes
        raise AttributeError("num_classes")

    def get_classifier(self) -> nn.Module:
        """The head module (timm's accessor), found again by name."""
        found = find_classifier(self, self.num_classes)
        if found is None:
            raise AttributeError("get_classifier: no classifier found")
        return found[1]

    def __deepcopy__(self, memo: dict[int, Any]) -> ProjectedModel:
        # torchvision's DualGraphModule.__deepcopy__ re-runs __init__, which puts the copy
        # in train mode; a copy of an eval-mode model must stay in eval mode
        res = super().__deepcopy__(memo)  # type: ignore[misc]
        for name in CARRIED_ATTRIBUTES:  # plain attributes are lost by __init__ too
            if name in self.__dict__:
                res.__dict__[name] = copy.deepcopy(self.__dict__[name], memo)
        res.train(self.training)
        flags = {name: m.training for name, m in self.named_modules()}
        for name, m in res.named_modules():
            m.training = flags.get(name, m.training)
        return res


def _dual_graph_module_cls() -> type:
    from torchvision.models.feature_extraction import DualGraphModule

    # ProjectedModel's conveniences on top of torchvision's train/eval graph switching;
    # DualGraphModule.__deepcopy__ rebuilds ``type(self)``, so the class survives copies
    return type("ProjectedModel", (ProjectedModel, DualGraphModule),
                {"__doc__": ProjectedModel.__doc__, "__module__": __name__})


_PROJECTED_CLS: type | None = None


def _projected_cls() -> type:
    global _PROJECTED_CLS
    if _PROJECTED_CLS is None:
        _PROJECTED_CLS = _dual_graph_module_cls()
    return _PROJECTED_CLS


# --------------------------------------------------------------------------- the head


def feature_dim_of(head: nn.Module) -> int:
    """The dimension of the head's input that holds the features (Linear: last; conv: 1)."""
    if isinstance(head, nn.Linear):
        return -1
    if isinstance(head, nn.Conv2d):
        return 1
    raise UnlearningError(f"the classifier is a {type(head).__name__}; ESC needs an nn.Linear "
                          "or a 1x1 nn.Conv2d head")


def head_node(graph: fx.Graph, head: str) -> fx.Node:
    """The one ``call_module`` node of ``head``; errors if the head is called 0 or 2+ times."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == head]
    if len(calls) != 1:
        raise UnlearningError(
            f"the classifier {head!r} is called {len(calls)} times in the traced forward; "
            "ESC/EC need a model whose head is applied once to the pooled features")
    if not calls[0].args or not isinstance(calls[0].args[0], fx.Node):
        raise UnlearningError(f"the classifier {head!r} is not called on a tensor")
    return calls[0]


def trace_pair(model: nn.Module) -> tuple[fx.GraphModule, fx.GraphModule]:
    """``(train_gm, eval_gm)``: ``model`` traced in both modes (submodules shared)."""
    return trace_model(model, training=True), trace_model(model, training=False)


def _free_name(root: nn.Module, base: str) -> str:
    taken = {n for n, _ in root.named_modules()}
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


def insert_before_head(model: nn.Module, head: str, module: nn.Module,
                       name: str = "esc_projection", *, inplace: bool = False
                       ) -> ProjectedModel:
    """A new :class:`ProjectedModel`: ``model`` with ``module`` applied to the head's input.

    ``model`` is deep-copied first (unless ``inplace``: then the new model owns
    ``model``'s submodules and ``model`` gains the module). Works in both train and eval
    mode (two graphs), keeps the original parameter names, and can be applied again to
    its own output (the next module is named ``name_1``...).
    """
    base = model if inplace else copy.deepcopy(model)
    mode = base.training
    train_gm, eval_gm = trace_pair(base)
    name = _free_name(base, name)
    base.add_module(name, module)
    for gm in (train_gm, eval_gm):
        gm.add_submodule(name, module)  # the same object as base's: looked up by lint()
        node = head_node(gm.graph, head)
        with gm.graph.inserting_before(node):
            proj = gm.graph.call_module(name, (node.args[0],))
        node.replace_input_with(node.args[0], proj)
        gm.graph.lint()
    cls = _projected_cls()
    out = cls(base, train_gm.graph, eval_gm.graph, class_name="ProjectedModel")
    for attr in CARRIED_ATTRIBUTES:
        if attr in base.__dict__:
            out.__dict__[attr] = base.__dict__[attr]
    out.train(mode)
    return out


# --------------------------------------------------------------------------- sub-graphs


def features_graph(gm: fx.GraphModule, head: str) -> fx.GraphModule:
    """Copy of ``gm`` returning the head's input (the pooled features), head not run."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(gm.graph, env)
    graph.output(env[head_node(gm.graph, head).args[0]])
    out = fx.GraphModule(gm, graph, "HeadInput")
    out.graph.eliminate_dead_code()
    out.recompile()
    return out


def tail_graph(gm: fx.GraphModule, head: str) -> fx.GraphModule | None:
    """Graph from the head's input to the logits, or None when the tail also reads tensors
    computed before the head's input (then the full model must be run)."""
    start = head_node(gm.graph, head).args[0]
    assert isinstance(start, fx.Node)
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    after = descendants(start)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: graph.placeholder("features")}
    for node in gm.graph.nodes:
        if node is start or node.op == "output" or node not in after | _constants(gm):
            continue
        if node.op == "placeholder":
            return None
        env[node] = graph.node_copy(node, lambda n: env[n])
    try:
        graph.output(fx.map_arg(out.args[0], lambda n: env[n]))
    except KeyError:  # the output reads a node that is not after the head's input
        return None
    tail = fx.GraphModule(gm, graph, "HeadTail")
    tail.graph.eliminate_dead_code()
    tail.recompile()
    return tail


def _constants(gm: fx.GraphModule) -> set[fx.Node]:
    return {n for n in gm.graph.nodes if n.op == "get_attr"}


def node_module_paths(node: fx.Node) -> list[str]:
    """Qualified names of the modules a traced node was created inside (outermost first)."""
    paths = [str(v[0]) for v in node.meta.get("nn_module_stack", {}).values()]
    if node.op == "call_module":
        paths.append(str(node.target))
    return paths


# --------------------------------------------------------------------------- running


def run_batches(fn: Callable[[torch.Tensor], Any], data: Iterable[Any],
                device: torch.device) -> tuple[list[Any], list[torch.Tensor]]:
    """``fn(x)`` for every ``(x, y)`` batch of ``data`` on ``device``; outputs and labels."""
    outs, labels = [], []
    for batch in data:
        x, y = batch[0], batch[1]
        outs.append(fn(x.to(device, non_blocking=True)))
        labels.append(torch.as_tensor(y))
    return outs, labels
