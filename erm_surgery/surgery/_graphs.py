"""Graph edits for ``attach``: insert the mask node, check nothing bypasses it, and cut
the masked graph into the full, features-only and head-only graphs of each mode."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from ..errors import SurgeryError
from ._analysis import SurgeryInfo
from .mask import apply_channel_mask
from .tracing import ancestors, descendants, output_node, trace_model

__all__ = ["WEIGHTS_INPUT", "build_graphs", "mask_node"]

#: name of the graph input that carries the per-sample mask (None on the STD path)
WEIGHTS_INPUT = "erm_weights"


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
        weights = graph.placeholder(WEIGHTS_INPUT, default_value=None)
    with graph.inserting_after(feat):
        masked = graph.call_function(apply_channel_mask, (feat, weights),
                                     {"channel_dim": channel_dim})
    # the recipe in the fx docs would also rewire ``masked`` onto itself
    feat.replace_all_uses_with(masked, delete_user_cb=lambda user: user is not masked)
    masked.name = "erm_mask"
    graph.lint()
    gm.recompile()


def mask_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes
                if n.op == "call_function" and n.target is apply_channel_mask)


def _returned_tensors(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes the graph returns: one, or the members of a returned (named) tuple."""
    out = output_node(gm).args[0]
    if isinstance(out, fx.Node) and out.op == "call_function" and isinstance(
            out.target, type) and issubclass(out.target, tuple):
        out = out.args  # a namedtuple built in forward (torchvision GoogLeNetOutputs)
    if isinstance(out, (tuple, list)):
        return [a for a in out if isinstance(a, fx.Node)]
    return [out] if isinstance(out, fx.Node) else []


def _check_no_bypass(gm: fx.GraphModule) -> None:
    mask = mask_node(gm)

    def leaks_of(node: fx.Node) -> list[str]:
        return [n.name for n in ancestors(node, stop=mask) | {node}
                if n.op == "placeholder" and n.name != WEIGHTS_INPUT]

    # a returned structure fx does not see into (a dict...) is checked as a whole
    outputs = _returned_tensors(gm) or [output_node(gm)]
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
    graph.output(env[mask_node(gm)])
    features = fx.GraphModule(gm, graph, "ERMFeatures")
    features.graph.eliminate_dead_code()
    features.recompile()
    return features


def _head_graph(gm: fx.GraphModule) -> fx.GraphModule | None:
    """Graph from the masked feature map to the logits, or None if the head also reads
    tensors computed before the feature node."""
    mask = mask_node(gm)
    out = output_node(gm)
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


def build_graphs(base: nn.Module, info: SurgeryInfo,
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
