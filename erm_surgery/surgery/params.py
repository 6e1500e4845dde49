"""Optimiser parameter groups for an attached model, for any ``torch.optim`` optimiser.

``G`` is a mask, not a weight: weight decay would pull every entry towards 0 (a class would
lose channels for no reason) and it usually wants its own learning rate, so it gets a
group of its own. The model's weights are split the way timm's optimizer factory splits
them (no decay for biases, 1-D tensors and the model's ``no_weight_decay()`` names), with
optional layer-wise lr decay over timm's ``group_matcher`` layers. The learning rate of
each group is written into the group itself (``lr``), so any optimiser and any scheduler
(torch's or timm's) sees it; no ``lr_scale`` key is needed.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..errors import SurgeryError

__all__ = ["param_groups"]


def _check_rate(name: str, value: float | None, *, zero_ok: bool = False) -> None:
    if value is None:
        return
    ok = value >= 0 if zero_ok else value > 0
    if not (isinstance(value, (int, float)) and ok and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number {'>= 0' if zero_ok else '> 0'}, "
                         f"got {value!r}")


def _layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """``{parameter name: layer id}`` from timm's ``group_matcher`` and the layer count."""
    matcher = getattr(model, "group_matcher", None)
    if not callable(matcher):
        raise SurgeryError(
            f"layer_decay needs the model's layer grouping (timm's group_matcher), and "
            f"{type(model).__name__} has none (torchvision models don't): pass "
            "layer_decay=None, or build the groups yourself")
    from timm.models import group_parameters

    layers = group_parameters(model, matcher(coarse=False), reverse=True)
    return layers, max(layers.values(), default=0) + 1


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    g_lr: float | None = None,
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups of ``model`` for any ``torch.optim`` optimiser.

    - ``G`` (an attached model's ``erm.G``): its own group, ``lr=g_lr`` (default ``lr``),
      **no weight decay**, ``name="erm.G"``;
    - the weights: ``weight_decay`` except for biases, 1-D tensors (norms) and the names
      the model's ``no_weight_decay()`` lists (timm), which get none;
    - ``layer_decay`` (timm models with ``group_matcher``): the lr of layer ``i`` of ``L``
      is ``lr * layer_decay ** (L - 1 - i)``, the head keeping ``lr``.

    Parameters with ``requires_grad=False`` (a frozen backbone) are left out. Each group has
    a ``name`` (``"erm.G"``, ``"decay"``, ``"no_decay"``, or ``"layer_3_decay"``...) and its
    own ``lr`` and ``weight_decay`` (no ``param_names``: torch then requires them in every
    group, including any the caller adds). Works on plain models too (no ``G`` group).

    Example::

        opt = torch.optim.AdamW(erm_surgery.param_groups(model, lr=1e-3,
                                                         weight_decay=0.05, g_lr=0.05))

    Raises:
        ValueError: ``lr`` / ``g_lr`` not > 0, ``weight_decay`` < 0, or ``layer_decay``
            outside ``(0, 1]``.
        SurgeryError: ``layer_decay`` on a model without timm's ``group_matcher``.
    """
    _check_rate("lr", lr)
    _check_rate("g_lr", g_lr)
    _check_rate("weight_decay", weight_decay, zero_ok=True)
    if layer_decay is not None and not (isinstance(layer_decay, (int, float))
                                        and 0 < layer_decay <= 1):
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")

    # an attached model: G apart, the weights named as in the plain model (timm's lists)
    inner = model.__dict__.get("_modules", {}).get("model")
    erm = model.__dict__.get("_modules", {}).get("erm")
    attached = inner is not None and isinstance(getattr(erm, "G", None), nn.Parameter)
    net = inner if attached else model

    no_decay_fn = getattr(net, "no_weight_decay", None)
    no_decay = set(no_decay_fn()) if callable(no_decay_fn) else set()
    layers, num_layers = _layer_ids(net) if layer_decay is not None else ({}, 1)

    groups: dict[str, dict[str, Any]] = {}
    if attached and erm.G.requires_grad:
        groups["erm.G"] = {"name": "erm.G", "params": [erm.G],
                           "lr": float(lr if g_lr is None else g_lr), "weight_decay": 0.0}
    for name, param in net.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim <= 1 or name.endswith(".bias") or name in no_decay)
        kind = "decay" if decays else "no_decay"
        scale = 1.0
        if layer_decay is not None:
            layer = layers.get(name, num_layers - 1)
            scale = float(layer_decay) ** (num_layers - 1 - layer)
            kind = f"layer_{layer}_{kind}"
        group = groups.setdefault(kind, {
            "name": kind, "params": [], "lr": float(lr) * scale,
            "weight_decay": float(weight_decay) if decays else 0.0})
        group["params"].append(param)
    return list(groups.values())
