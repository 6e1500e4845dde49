"""FKT: the teacher's head, cut so that prohibited channels and forget classes are gone.

The student gets a copy of the teacher's head. Its inputs from prohibited channels are
zeroed, and the forget classes' rows are zeroed with a bias of ``forget_bias``, so their
logit is a constant far below any retained logit. :func:`transfer_head` returns what it
blocked, so a head trained afterwards (``train_head``) can be kept blocked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import UnlearningError
from ...surgery import ERMModel, ancestors, descendants
from ...surgery._graphs import mask_node

__all__ = ["Blocked", "head_layers", "head_roles", "transfer_head"]


def head_roles(model: ERMModel) -> tuple[list[str], list[str]]:
    """``(readers, classifiers)``: the head layers that read the masked map, and those whose
    output is the logits, each without another weighted head layer in between.

    A sequential head (torchvision mobilenet_v3's ``classifier.0`` then ``classifier.3``)
    has one of each; parallel heads averaged into the logits (a distilled model's ``head``
    and ``head_dist``) are each both. Per-channel layers (a norm of K channels) are looked
    through. Unlearning cuts the prohibited channels from every reader and the forget rows
    from every classifier.
    """
    gm = model.__dict__["_graphs"]["full_eval"]
    mask = mask_node(gm)
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


def head_layers(model: ERMModel) -> list[tuple[str, nn.Module]]:
    return [(name, model.model.get_submodule(name)) for name in model.surgery.head_modules]


@dataclass
class Blocked:
    """Entries of one head parameter that FKT fixes: ``param = param * open + fill``."""

    param: torch.Tensor
    open: torch.Tensor  # 1 where the entry may train, 0 where it is blocked
    fill: torch.Tensor  # the blocked entries' value (0, or forget_bias for logits)

    @torch.no_grad()
    def apply(self) -> None:
        if self.open.device != self.param.device:  # the model moved (accelerator.prepare)
            self.open, self.fill = self.open.to(self.param.device), self.fill.to(
                self.param.device)
        self.param.mul_(self.open).add_(self.fill)


def _block(param: torch.Tensor, blocked: torch.Tensor, value: float = 0.0) -> Blocked:
    open_ = (~blocked).to(param.dtype)
    return Blocked(param, open_, (1 - open_) * value)


@torch.no_grad()
def _input_channels(model: ERMModel, layer: nn.Module) -> torch.Tensor | None:
    """The feature-map channel behind each input of a Linear head layer, or None.

    Found by sending a map whose channel ``k`` holds the value ``k + 1`` everywhere through
    the head: pooling, flattening and concatenation (timm's ``catavgmax``: ``[avg, max]``,
    channel-major flattening: ``(K, H, W)``) keep the values, so the layer's input names
    its channels. Anything that changes values (a norm) gives None.
    """
    K, shape = model.surgery.num_channels, model.surgery.feature_shape
    if not model.has_head_graph or not shape:
        return None
    view = [1] * (len(shape) + 1)
    view[model.surgery.channel_dim] = K
    weight = layer.weight
    probe = torch.arange(1, K + 1, dtype=weight.dtype, device=weight.device).view(view)
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    was_training = model.training
    model.eval()
    try:
        model.forward_head(probe.expand(1, *shape))
    except Exception:  # any failure means: fall back to the layout rule
        return None
    finally:
        handle.remove()
        model.train(was_training)
    if len(seen) != 1 or seen[0].numel() != weight.shape[1]:
        return None
    values = seen[0].reshape(-1).float()
    ids = values.round()
    if not torch.allclose(values, ids, atol=1e-3) or ids.min() < 1 or ids.max() > K:
        return None
    return ids.long() - 1


@torch.no_grad()
def transfer_head(teacher: ERMModel, student: ERMModel, keep: torch.Tensor,
                   forget: Sequence[int], forget_bias: float) -> list[Blocked]:
    """FKT: copy the head, cut its inputs from prohibited channels, block forget rows.

    Returns what was blocked, so that a head trained afterwards can be kept blocked.
    Inputs the teacher's head already ignores (channels an earlier request prohibited)
    and classes it already blocks stay blocked too.
    """
    for (_, t_mod), (_, s_mod) in zip(head_layers(teacher), head_layers(student),
                                         strict=True):
        s_mod.load_state_dict(t_mod.state_dict())
    K = teacher.surgery.num_channels
    C = teacher.surgery.num_classes
    drop = ~keep
    readers, classifiers = head_roles(student)
    if not readers or not classifiers:  # a head fx saw as functional ops: the named head
        readers = readers or [student.surgery.head]
        classifiers = classifiers or [student.surgery.head]
    blocked: list[Blocked] = []
    for name, mod in head_layers(student):
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        b = getattr(mod, "bias", None)
        if w.dim() == 1 and w.numel() == K:  # per-channel affine (a norm in the head)
            cut = drop.to(w.device) | ((w == 0) & (b == 0 if b is not None else True))
            blocked.append(_block(w, cut))
            if b is not None:
                blocked.append(_block(b, cut))
            continue
        if name not in readers:
            continue
        in_features = w.shape[1] if w.dim() >= 2 else None
        channels = (_input_channels(student, mod)
                    if w.dim() == 2 and in_features not in (None, K) else None)
        if channels is not None:  # a Linear on pooled, flattened or concatenated maps
            cut = drop.to(w.device)[channels] | (w == 0).all(0)
            blocked.append(_block(w, cut.view(1, -1).expand_as(w)))
        elif in_features is not None and in_features % K == 0:  # Linear(K, .), Conv(K, ...)
            per_channel = w.view(w.shape[0], K, -1)  # or a Linear on flattened (K, H, W)
            cut = drop.to(w.device) | (per_channel == 0).all(2).all(0)
            blocked.append(_block(w, cut.view(1, K, 1).expand_as(per_channel).reshape(
                w.shape)))
    idx = torch.as_tensor(list(forget), dtype=torch.long)
    for name in classifiers:  # every layer that writes logits: parallel heads included
        classifier = student.model.get_submodule(name)
        if classifier.weight.shape[0] != C:
            raise UnlearningError(
                f"head layer {name!r} writes the logits but has {classifier.weight.shape[0]} "
                f"outputs, not {C}; FKT cannot block the forget classes there")
        w, b = classifier.weight, getattr(classifier, "bias", None)
        rows = torch.zeros(C, dtype=torch.bool, device=w.device)
        rows[idx.to(w.device)] = True
        if b is not None:  # classes an earlier request blocked
            rows |= (b == forget_bias) & (w.view(C, -1) == 0).all(1)
        shape = (C,) + (1,) * (w.dim() - 1)
        blocked.append(_block(w, rows.view(shape).expand_as(w)))
        if b is not None:
            blocked.append(_block(b, rows, forget_bias))
    for block in blocked:
        block.apply()
    return blocked


