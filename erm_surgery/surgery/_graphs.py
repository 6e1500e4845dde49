"""Graph edits for ``attach``: insert the mask node, check nothing bypasses it, and cut
the masked graph into the full, features-only and head-only graphs of each mode."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.utils.checkpoint
from torch import fx, nn

from ..errors import SurgeryError
from ._analysis import SurgeryInfo
from .mask import apply_channel_mask
from .tracing import ancestors, descendants, output_node, trace_model

__all__ = ["WEIGHTS_INPUT", "build_graphs", "mask_node", "checkpoint_stages", "run_checkpointed"]

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


# --------------------------------------------------------------------------- checkpointing


def run_checkpointed(segment: nn.Module, *inputs: Any) -> Any:
    """Run one stage of the graph under activation checkpointing (what timm's
    ``checkpoint_seq`` does to the stages of a model in eager mode). Looked up on
    ``torch.utils.checkpoint`` at call time, so the call can be observed."""
    return torch.utils.checkpoint.checkpoint(segment, *inputs, use_reentrant=False)


def _in_stage(node: fx.Node, stage: str) -> bool:
    if node.op == "call_module":
        paths = [str(node.target)]
    elif node.op in ("call_function", "call_method"):
        paths = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
    else:
        return False
    return any(p == stage or p.startswith(stage + ".") for p in paths)


def checkpoint_stages(gm: fx.GraphModule, stages: list[str]) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` in which the nodes of each stage (a module name, e.g. ``layer2`` or
    ``stages.1``) run as one checkpointed segment; returns it and how many stages were
    wrapped.

    fx cannot trace timm's ``checkpoint_seq``, so the graph is traced without it and the
    checkpointing is put back here, on the stages timm's ``feature_info`` names. The mask
    node belongs to no stage, so it is never inside a segment. A stage whose nodes are
    interleaved with other nodes of the graph is left as it is.
    """
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    out_gm = fx.GraphModule(gm, graph, type(gm).__name__)
    wrapped = 0
    for stage in stages:
        order = {n: i for i, n in enumerate(graph.nodes)}
        members = [n for n in graph.nodes if _in_stage(n, stage)]
        if len(members) < 2:
            continue  # a single leaf (timm's stem activation): nothing to save
        member_set = set(members)
        outputs = [n for n in members if any(u not in member_set for u in n.users)]
        last = order[members[-1]]
        if not outputs or any(order[u] < last for o in outputs for u in o.users
                              if u not in member_set):
            continue
        inputs = list(dict.fromkeys(a for n in members for a in n.all_input_nodes
                                    if a not in member_set and a.op != "get_attr"))
        sub = fx.Graph()
        env: dict[fx.Node, fx.Node] = {a: sub.placeholder(a.name) for a in inputs}
        for n in members:
            for a in n.all_input_nodes:
                if a not in env and a.op == "get_attr":
                    env[a] = sub.node_copy(a)  # parameters read by traced-through layers
            env[n] = sub.node_copy(n, env.__getitem__)
        sub.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
        name = f"erm_checkpoint_{wrapped}"
        out_gm.add_submodule(name, fx.GraphModule(out_gm, sub, "ERMCheckpointSegment"))
        with graph.inserting_after(members[-1]):
            segment = graph.get_attr(name)
        with graph.inserting_after(segment):
            call = graph.call_function(run_checkpointed, (segment, *inputs))
        results = [call]
        if len(outputs) > 1:
            results = []
            for i in range(len(outputs)):
                with graph.inserting_after(results[-1] if results else call):
                    results.append(graph.call_function(operator.getitem, (call, i)))
        for o, r in zip(outputs, results, strict=True):
            o.replace_all_uses_with(r, delete_user_cb=lambda u, s=member_set: u not in s)
        for n in reversed(members):
            graph.erase_node(n)
        wrapped += 1
    graph.lint()
    out_gm.recompile()
    return out_gm, wrapped
