"""The EC objective as a plug-in: supervision points chosen with fx, auxiliary heads, losses.

:class:`ECPlugin` wraps a model (sharing its parameters) in a network that returns the
logits together with the pooled activations of a few intermediate blocks, and owns one
auxiliary linear head per block. ``plugin.loss(outputs, labels, is_forget)`` is the EC
objective of a batch that mixes retain and forget samples; any training-based unlearning
method can add it to its own loss (see ``docs/methods.md``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ...errors import UnlearningError
from ...surgery import ancestors, num_classes_of, stage_names, trace_model, unwrap
from ...unlearning.request import classifier_of
from ..esc.graph import head_node, node_module_paths

__all__ = ["ECPlugin", "ECLosses", "contrastive_unlearning_loss", "supervision_points"]


def contrastive_unlearning_loss(z_forget: torch.Tensor, y_forget: torch.Tensor,
                                z_retain: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE-style unlearning loss on L2-normalised embeddings (mean over forget anchors).

    For a forget anchor ``i``, the positives are the retain embeddings (all of other
    classes), the negatives the other forget embeddings of the same class:

        ``-log( sum_p exp(s_ip / t) / (sum_p exp(s_ip / t) + sum_n exp(s_in / t)) )``

    Minimising it pulls forget samples toward the retain classes and spreads each forget
    class apart, so its cluster dissolves. The retain embeddings are detached: they are
    anchors to move toward, not something to move (cross-entropy keeps them in place).
    Zero when there is no retain sample or no same-class pair.
    """
    if z_forget.shape[0] == 0 or z_retain.shape[0] == 0:
        return z_forget.sum() * 0.0
    zf = F.normalize(z_forget.float(), dim=1)
    zr = F.normalize(z_retain.detach().float(), dim=1)
    pos = zf @ zr.T / temperature  # (Nf, Nr)
    same = y_forget[:, None] == y_forget[None, :]
    same.fill_diagonal_(False)
    neg = (zf @ zf.T / temperature).masked_fill(~same, float("-inf"))  # (Nf, Nf)
    pos_lse = torch.logsumexp(pos, dim=1)
    all_lse = torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1)
    return (all_lse - pos_lse).mean()


# ----------------------------------------------------------------------- where to supervise


def _stage_names(model: nn.Module) -> list[str]:
    """Module names of the stages inside ``unwrap(model)`` (timm's ``feature_info``)."""
    return stage_names(unwrap(model)) or []


def _last_node_inside(nodes: Sequence[fx.Node], module: str) -> fx.Node | None:
    """The output of ``module``: the last traced node created inside it."""
    found = None
    for n in nodes:
        if module in node_module_paths(n):
            found = n
    return found


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _by_resolution(nodes: Sequence[fx.Node]) -> list[fx.Node]:
    """Fallback stages: the last 4-D activation at each spatial resolution."""
    last: dict[tuple[int, ...], fx.Node] = {}
    for n in nodes:
        shape = _shape(n)
        if n.op != "placeholder" and shape is not None and len(shape) == 4:
            last.pop(shape[2:], None)  # re-insert: dict order = order of last occurrence
            last[shape[2:]] = n
    return list(last.values())


def supervision_points(gm: fx.GraphModule, model: nn.Module, head: str,
                       layers: Sequence[str] | None, num_aux: int) -> list[fx.Node]:
    """Intermediate nodes that get an auxiliary head, shallow to deep.

    ``layers`` (fx node names or module names such as ``"layer2"``) are taken as given.
    Otherwise the stage outputs: timm's ``feature_info`` modules, or else the last 4-D
    activation at each spatial resolution; the deepest stage is dropped (the model's own
    head already supervises the features it pools) and the last ``num_aux`` are kept.
    ``gm`` must carry shapes (``ShapeProp``) for the fallback.
    """
    nodes = list(gm.graph.nodes)
    feeds_head = ancestors(head_node(gm.graph, head).args[0])  # type: ignore[arg-type]
    feeds_head |= {head_node(gm.graph, head).args[0]}  # type: ignore[arg-type]
    by_name = {n.name: n for n in nodes}
    if layers is not None:
        out = []
        for name in layers:
            node = by_name.get(name) or _last_node_inside(nodes, name)
            if node is None or node not in feeds_head:
                stages = _stage_names(model) or [n.name for n in _by_resolution(nodes)]
                raise UnlearningError(f"EC layer {name!r} is not a node or module that feeds "
                                      f"the classifier; stages of this model: {stages}")
            out.append(node)
        return out
    stages: list[fx.Node] = []
    for name in _stage_names(model):
        node = _last_node_inside(nodes, name)
        if node is not None and node in feeds_head and node not in stages:
            stages.append(node)
    if not stages:
        stages = [n for n in _by_resolution(nodes) if n in feeds_head]
    stages = stages[:-1]  # the deepest stage is what the head pools
    if num_aux == 0:
        return []
    return stages[-num_aux:]


# ----------------------------------------------------------------------- the network


def pool_embedding(x: torch.Tensor) -> torch.Tensor:
    """One vector per sample: maps ``(N, C, H, W)`` are averaged spatially, token sequences
    ``(N, T, D)`` over tokens; anything else is flattened."""
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    if x.dim() == 3:
        return x.mean(dim=1)
    return x.reshape(x.shape[0], -1)


class _ECNetwork(nn.Module):
    """The model's train-mode graph returning ``(logits, embeddings, aux_logits)``.

    ``graph`` calls the model's own submodules, so training this network trains the
    model; ``aux`` holds the auxiliary heads, which belong to the plug-in only.
    """

    def __init__(self, graph: fx.GraphModule, aux: nn.ModuleList) -> None:
        super().__init__()
        self.graph = graph
        self.aux = aux

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor],
                                                 list[torch.Tensor]]:
        logits, *feats = self.graph(x)
        embs = [pool_embedding(f) for f in feats]  # intermediate..., head input (last)
        aux_logits = [h(e) for h, e in zip(self.aux, embs[:-1], strict=True)]
        return logits, embs, aux_logits


@dataclass
class ECLosses:
    """The parts of one batch's EC loss, detached 0-d tensors on the loss's device: a loop
    accumulates them and converts to floats once, not three times a layer per step."""

    total: torch.Tensor
    ce: torch.Tensor
    contrastive: torch.Tensor


class ECPlugin:
    """EC's auxiliary heads and losses, for any training loop.

    Args:
        model: the model being trained (plain or attached). Its parameters are shared, not
            copied: pass the copy you are training.
        forget_classes: the classes being forgotten.
        example: one input batch (``(N, ...)`` on the model's device) for shape inference.
        layers: supervision points (fx node or module names); None = the stage outputs.
        num_aux_layers: with ``layers=None``, how many of the deepest intermediate stages
            get an auxiliary head.
        layer_weights: weight of each supervision point, shallow to deep, the final
            (the model's own head) last; None = ``i / L`` for point ``i`` of ``L``, so deeper
            points weigh more (EC paper).
        temperature: of the contrastive loss.
        contrastive_weight, ce_weight: weights of the two terms at every point.
        deep_supervision: cross-entropy on the retain samples through the auxiliary heads
            (False: through the model's head only).

    Usage in a training step over a batch mixing retain and forget samples::

        plugin = ECPlugin(model, [3], example=x0)
        opt = SGD([*model.parameters(), *plugin.parameters()], ...)
        outputs = plugin.network(x)                 # wrap plugin.network with DDP if needed
        loss = my_loss(outputs[0], y) + plugin.loss(outputs, y, is_forget)[0]

    The auxiliary heads are never part of ``model``: nothing needs removing afterwards.
    """

    def __init__(self, model: nn.Module, forget_classes: Iterable[int], *,
                 example: torch.Tensor, layers: Sequence[str] | None = None,
                 num_aux_layers: int = 3, layer_weights: Sequence[float] | None = None,
                 temperature: float = 0.2, contrastive_weight: float = 1.0,
                 ce_weight: float = 1.0, deep_supervision: bool = True) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.forget_classes = [int(c) for c in forget_classes]
        self.temperature = float(temperature)
        self.contrastive_weight = float(contrastive_weight)
        self.ce_weight = float(ce_weight)
        self.deep_supervision = deep_supervision
        base = unwrap(model)
        self.head, _ = classifier_of(model)
        num_classes = num_classes_of(model)
        gm = trace_model(base, training=True)
        mode = base.training
        base.eval()  # shape inference must not update BatchNorm statistics
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(example)
        finally:
            base.train(mode)
        points = supervision_points(gm, base, self.head, layers, num_aux_layers)
        self.layers = [n.name for n in points]
        head_in = head_node(gm.graph, self.head).args[0]
        out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        logits = out_node.args[0]
        # the graph now returns (logits, *intermediate, head input)
        out_node.args = ((logits, *points, head_in),)
        gm.graph.lint()
        gm.recompile()
        dims = []
        for n in points:
            shape = _shape(n)
            if shape is None or len(shape) < 2:
                raise UnlearningError(f"EC layer {n.name!r} has no per-sample features "
                                      f"(shape {shape})")
            dims.append(shape[1] if len(shape) == 4 else shape[-1])
        device = example.device
        aux = nn.ModuleList(nn.Linear(d, num_classes) for d in dims).to(device)
        self.network = _ECNetwork(gm, aux)
        L = len(points) + 1
        weights = list(layer_weights) if layer_weights is not None else [
            (i + 1) / L for i in range(L)]
        if len(weights) != L:
            raise ValueError(f"layer_weights needs {L} values (the {L - 1} auxiliary points "
                             f"{self.layers} and the final head), got {len(weights)}")
        self.layer_weights = [float(w) for w in weights]

    def parameters(self) -> list[nn.Parameter]:
        """The auxiliary heads' parameters (add them to the optimiser)."""
        return list(self.network.aux.parameters())

    def loss(self, outputs: tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]],
             labels: torch.Tensor, is_forget: torch.Tensor) -> tuple[torch.Tensor, ECLosses]:
        """EC loss of one batch: at each point, weighted, contrastive unlearning on the
        forget samples plus cross-entropy on the retain samples."""
        logits, embs, aux_logits = outputs
        retain = ~is_forget
        # which terms exist is decided once per batch (one look at the mask), not per layer
        n_forget = int(is_forget.sum())
        has_retain, has_forget = n_forget < len(is_forget), n_forget > 0
        total = logits.sum() * 0.0
        ce_sum, cu_sum = total.detach(), total.detach()
        for i, (w, emb) in enumerate(zip(self.layer_weights, embs, strict=True)):
            final = i == len(embs) - 1
            term = total * 0.0
            if self.ce_weight and has_retain and (final or self.deep_supervision):
                layer_logits = logits if final else aux_logits[i]
                ce = F.cross_entropy(layer_logits[retain], labels[retain])
                term = term + self.ce_weight * ce
                ce_sum = ce_sum + ce.detach()
            if self.contrastive_weight and has_forget:
                cu = contrastive_unlearning_loss(emb[is_forget], labels[is_forget],
                                                 emb[retain], self.temperature)
                term = term + self.contrastive_weight * cu
                cu_sum = cu_sum + cu.detach()
            total = total + w * term
        return total, ECLosses(total.detach(), ce_sum, cu_sum)


def describe(plugin: ECPlugin) -> dict[str, Any]:
    """The plug-in's supervision layout, for info records."""
    return {"layers": list(plugin.layers), "layer_weights": list(plugin.layer_weights)}
