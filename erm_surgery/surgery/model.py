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
import io
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import SurgeryError
from ._analysis import SurgeryInfo, analyse, probe_input
from ._graphs import WEIGHTS_INPUT, build_graphs
from .mask import ERMMask
from .tracing import trace_model

__all__ = ["attach", "detach", "unwrap", "is_attached", "num_classes_of", "model_device",
           "ERMModel", "SurgeryInfo"]


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
        self.__dict__["_graphs"] = build_graphs(self.model, self.surgery)

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
            features = self._graph("features")(x, **{WEIGHTS_INPUT: weights})
            return features, self._graph("head")(features)
        kind = "features" if return_features else "full"
        return self._graph(kind)(x, **{WEIGHTS_INPUT: weights})

    def forward_features(self, x: torch.Tensor, labels: torch.Tensor | None = None, *,
                         channel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The feature map at the mask (masked on the ERM path)."""
        weights = self._weights(x, labels, channel_mask)
        return self._graph("features")(x, **{WEIGHTS_INPUT: weights})

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
    probe = probe_input(base, input_size)
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
    info = analyse(eval_gm, feature_node, head, num_classes)

    graphs = build_graphs(base, info, eval_gm)
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
