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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import SurgeryError, warn_user
from ._analysis import SurgeryInfo, analyse, probe_input
from ._graphs import WEIGHTS_INPUT, build_graphs, checkpoint_stages
from .mask import ERMMask, apply_channel_mask
from .tracing import checkpointing_modules, stage_names, trace_model

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
    ``forward_head`` keep working; other attributes are looked up on ``model.model`` (and
    assigning one that ``model.model`` has sets it there). The timm interface
    (docs/surgery.md): ``reset_classifier`` and a replaced head module re-attach the mask;
    ``set_grad_checkpointing`` checkpoints the traced graph's stages; torchvision's and
    timm's feature extraction trace the masked model; ``load_state_dict`` takes a plain
    model's weights; ``no_weight_decay`` / ``group_matcher`` serve timm's optimizer factory.
    """

    def __init__(self, model: nn.Module, graphs: dict[str, fx.GraphModule | None],
                 info: SurgeryInfo, mask: ERMMask,
                 attach_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.erm = mask
        # outside the registry on purpose: the graphs call model's own submodules
        self.__dict__["_graphs"] = graphs
        self.__dict__["surgery"] = info
        # what attach() was told, so a changed model is located again the same way
        self.__dict__["_attach_args"] = dict(attach_args or {})
        self._remember_layout()

    def _remember_layout(self) -> None:
        """Record the head modules the graphs call and the modules carrying timm's
        ``grad_checkpointing`` flag; :meth:`_sync` compares against them on every call."""
        watched = []
        for name in dict.fromkeys((self.surgery.head, *self.surgery.head_modules)):
            with contextlib.suppress(AttributeError):
                watched.append((name, self.model.get_submodule(name)))
        self.__dict__["_watched"] = watched
        self.__dict__["_ckpt_holders"] = checkpointing_modules(self.model)

    # Graphs are not pickled (fx would re-trace their generated code, and that code calls
    # apply_channel_mask, which has Python control flow): they are rebuilt from the model.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_graphs", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_attach_args", {})
        if "_watched" not in self.__dict__:  # pickled before these were recorded
            self._remember_layout()
        # a head replaced in the original (not yet re-attached) is re-attached in the copy
        # too, on its first call (``_watched`` still holds the old head): the copy behaves
        # like the original
        try:
            graphs = build_graphs(self.model, self.surgery)
        except SurgeryError:
            if self._replaced_head() is None:
                raise
            graphs = None
        self.__dict__["_graphs"] = graphs

    # -- attribute fallback: training code asks timm models for many things
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name.startswith("_") or "model" not in modules:
                raise
            return getattr(modules["model"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        # ``attached.fc = nn.Linear(...)`` means the model's fc, which reads come from too;
        # registering it on the wrapper would leave a module no graph calls
        inner = self.__dict__.get("_modules", {}).get("model")
        if (inner is not None and name not in ("model", "erm")
                and name not in self.__dict__ and name not in self._modules
                and name not in self._parameters and name not in self._buffers
                and not hasattr(type(self), name) and hasattr(inner, name)):
            setattr(inner, name, value)
            return
        super().__setattr__(name, value)

    @property
    def num_classes(self) -> int:
        return self.surgery.num_classes

    @property
    def num_features(self) -> int:
        return getattr(self.model, "num_features", self.surgery.num_channels)

    # -- keeping the graphs in step with the module tree

    def _replaced_head(self) -> str | None:
        """Name of a head module that is no longer the one the graphs call, if any."""
        root = self.__dict__["_modules"]["model"]
        for name, module in self.__dict__.get("_watched", ()):
            current = root
            for part in name.split("."):  # get_submodule without its checks: every call
                current = current.__dict__["_modules"].get(part)
                if current is None:
                    return name
            if current is not module:
                return name
        return None

    def _sync(self) -> None:
        """Re-attach when the head was replaced since the graphs were built (a few
        attribute lookups per call)."""
        if self.__dict__.get("_graphs") is None:
            self._reattach("the classifier was replaced")
            return
        changed = self._replaced_head()
        if changed is not None:
            self._reattach(f"the classifier module {changed!r} was replaced")

    def _reattach(self, reason: str) -> None:
        """Locate the feature map and head of the current ``model.model`` again and rebuild
        the graphs; ``G`` is kept when C and K did not change, else replaced (a warning)."""
        args = self._attach_args
        old = self.surgery
        eval_gm, info = _locate(self.model, args.get("feature_node"), args.get("head"), None,
                                args.get("input_size"))
        graphs = build_graphs(self.model, info, eval_gm)
        if (info.num_classes, info.num_channels) != (old.num_classes, old.num_channels):
            init = float(args.get("init", 0.5))
            mask = ERMMask(info.num_classes, info.num_channels, init=init).to(self.erm.G.device)
            forgotten = self.erm.forgotten_classes
            super().__setattr__("erm", mask)
            warn_user(
                f"{reason}: the model now has C={info.num_classes} classes and K="
                f"{info.num_channels} channels (was C={old.num_classes}, K={old.num_channels}), "
                f"so the ERM mask was re-attached and G was reset to a new {info.num_classes} x "
                f"{info.num_channels} matrix of {init:g}"
                + (f" (the forgotten classes {forgotten} are no longer marked)" if forgotten
                   else "")
                + ". Train G again (erm_surgery.train) before unlearning, and build the "
                "optimizer again: G and the head are new parameters")
        self.__dict__["_graphs"] = graphs
        self.__dict__["surgery"] = info
        self._remember_layout()

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        """timm's ``reset_classifier`` on ``model.model``, then re-attach the mask.

        The new head is what the graphs run. With a new class count, ``G`` is replaced by
        a fresh ``num_classes x K`` matrix (a warning says so); with the same count it is
        kept. Raises ``SurgeryError`` for ``num_classes < 2`` (``0`` removes the classifier,
        which an ERM mask needs) before anything changes, and ``AttributeError`` when the
        model has no ``reset_classifier`` (torchvision: replace the head module instead).
        """
        inner = self.model
        if not callable(getattr(inner, "reset_classifier", None)):
            raise AttributeError(
                f"{type(inner).__name__} has no reset_classifier(); replace its classifier "
                f"module instead (model.model.{self.surgery.head} = nn.Linear(...)): the "
                "attached model re-attaches the mask on its next call")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise SurgeryError(
                f"reset_classifier({num_classes!r}) on an attached model: the ERM mask needs "
                "a classifier with >= 2 classes (G has one row per class). For features, use "
                "model.forward_features(x), or erm_surgery.detach(model) and call "
                "reset_classifier(0) on that plain copy")
        inner.reset_classifier(num_classes, *args, **kwargs)
        self._reattach(f"reset_classifier({num_classes})")

    # -- graphs

    def _graph(self, kind: str) -> fx.GraphModule:
        if self.training and kind != "head" and self._checkpointing():
            return self._checkpointed(kind)
        gm = self._graphs[f"{kind}_{'train' if self.training else 'eval'}"]
        if gm is None:
            raise NotImplementedError(
                "forward_head is not available: the head of this model also reads tensors "
                "computed before the feature map"
            )
        return gm

    def _checkpointing(self) -> bool:
        """timm's ``set_grad_checkpointing`` is on (on the model or any of its stages)."""
        return any(m.grad_checkpointing for m in self.__dict__.get("_ckpt_holders", ()))

    def _checkpointed(self, kind: str) -> fx.GraphModule:
        # fx cannot trace checkpoint_seq, so the stages are checkpointed on the graph
        key = f"{kind}_train_checkpointed"
        gm = self._graphs.get(key)
        if gm is None:
            stages = stage_names(self.model) or [n for n, _ in self.model.named_children()]
            gm, wrapped = checkpoint_stages(self._graphs[f"{kind}_train"], stages)
            if not wrapped and kind == "full":
                warn_user(f"grad checkpointing is on, but none of the stages {stages} of "
                          f"{type(self.model).__name__} could be checkpointed in the traced "
                          "graph; the model runs without it")
            self._graphs[key] = gm
        return gm

    def _weights(self, x: torch.Tensor, labels: torch.Tensor | None,
                 channel_mask: torch.Tensor | None) -> torch.Tensor | None:
        return erm_weights(self.erm, x, labels, channel_mask, self.surgery.num_channels)

    @property
    def has_head_graph(self) -> bool:
        """Whether :meth:`forward_head` works: the head reads only the feature map."""
        self._sync()
        return self._graphs["head_eval"] is not None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, *,
                channel_mask: torch.Tensor | None = None,
                return_features: bool | Literal["both"] = False,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (STD path, or ERM path with ``labels=`` / ``channel_mask=``).

        ``return_features=True`` returns the (masked) feature map instead, and
        ``return_features="both"`` returns ``(features, logits)`` from one pass (needs
        :attr:`has_head_graph`). Both go through ``forward`` so that wrappers such as DDP
        see the call. Under an fx tracer (feature extraction) the logits are traced.
        """
        if isinstance(x, fx.Proxy):
            return self._traced_forward(x, labels, channel_mask)
        self._sync()
        weights = self._weights(x, labels, channel_mask)
        if return_features == "both":
            features = self._graph("features")(x, **{WEIGHTS_INPUT: weights})
            return features, self._graph("head")(features)
        kind = "features" if return_features else "full"
        return self._graph(kind)(x, **{WEIGHTS_INPUT: weights})

    def _traced_forward(self, x: fx.Proxy, labels: Any, channel_mask: Any) -> fx.Proxy:
        """The forward as an fx tracer sees it (torchvision's / timm's
        ``create_feature_extractor``, ``get_graph_node_names``): the masked graph is replayed
        on the tracer's proxies, so every node is recorded against the registered
        submodules (``model.layer3``...), and the mask weights and the mask itself become
        single nodes (``erm_weights``, ``erm_mask``) that take their branches at run time:
        the extracted model has both paths, ``extractor(x)`` and ``extractor(x, labels)``."""
        self._sync()
        weights = erm_weights(self.erm, x, labels, channel_mask, self.surgery.num_channels)
        gm = self._graphs["full_train" if self.training else "full_eval"]
        return _Replay(gm).run(x, weights)

    def forward_features(self, x: torch.Tensor, labels: torch.Tensor | None = None, *,
                         channel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The feature map at the mask (masked on the ERM path)."""
        self._sync()
        weights = self._weights(x, labels, channel_mask)
        return self._graph("features")(x, **{WEIGHTS_INPUT: weights})

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits from a feature map returned by :meth:`forward_features`."""
        self._sync()
        if pre_logits:
            if not hasattr(self.model, "forward_head"):
                raise NotImplementedError("pre_logits needs the original model's forward_head")
            return self.model.forward_head(features, pre_logits=True)
        return self._graph("head")(features)

    def get_classifier(self) -> nn.Module:
        if hasattr(self.model, "get_classifier"):
            return self.model.get_classifier()
        return self.model.get_submodule(self.surgery.head)

    # -- weights

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; a *plain* model's state dict (no key starts with
        ``model.`` or ``erm.``) is loaded into ``model.model`` by
        :meth:`load_plain_state_dict`, ``G`` kept."""
        if state_dict and not any(str(k).startswith(("model.", "erm.")) for k in state_dict):
            return self.load_plain_state_dict(state_dict, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_plain_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                              assign: bool = False) -> Any:
        """Load the weights of a plain (not attached) model of the same architecture into
        ``model.model``; ``G`` and the forgotten flags are kept. Returns torch's
        ``(missing_keys, unexpected_keys)`` in the plain model's names. The reverse is
        ``erm_surgery.detach(model).state_dict()``.

        Raises ``SurgeryError`` for an attached model's state dict (``erm.*`` keys): load
        that with :meth:`load_state_dict`.
        """
        if any(str(k).startswith("erm.") for k in state_dict):
            raise SurgeryError(
                "this state dict is an attached model's (it has erm.* keys): load it with "
                "model.load_state_dict(state_dict); load_plain_state_dict takes the weights "
                "of a plain model (e.g. timm.create_model(...).state_dict())")
        result = self.model.load_state_dict(state_dict, strict=strict, assign=assign)
        self._sync()
        return result

    # -- timm's optimizer factory (create_optimizer_v2 / param_groups_layer_decay)

    def no_weight_decay(self) -> set[str]:
        """Parameter names timm's optimizer factory keeps out of weight decay: the model's
        own list (``model.``-prefixed) and ``erm.G`` (decay would pull ``G`` to 0)."""
        inner = getattr(self.model, "no_weight_decay", None)
        names = set(inner()) if callable(inner) else set()
        return {f"model.{n}" for n in names} | {"erm.G"}

    @property
    def group_matcher(self) -> Callable[..., Callable[[str], tuple[float, ...]]]:
        """timm's ``group_matcher(coarse=False)`` for the ``model.``-prefixed parameter names:
        the model's own layer grouping (layer-wise lr decay), ``G`` with the last layer
        (unscaled). Missing (``hasattr`` is False) when the model has none."""
        inner = getattr(self.model, "group_matcher", None)
        if not callable(inner):
            raise AttributeError(f"{type(self.model).__name__} has no group_matcher")

        def matcher(coarse: bool = False) -> Callable[[str], tuple[float, ...]]:
            from timm.models import group_parameters

            layers = group_parameters(self.model, inner(coarse=coarse), reverse=True)
            last = float(max(layers.values(), default=0))
            table = {f"model.{n}": (float(i),) for n, i in layers.items()}
            return lambda name: table.get(name, (last,))

        return matcher


# The mask's weights and the mask itself are single nodes when an fx tracer sees an
# attached model (ERMModel._traced_forward), so the traced model keeps both paths.


def erm_weights(mask: ERMMask, x: torch.Tensor, labels: torch.Tensor | None,
                channel_mask: torch.Tensor | None, num_channels: int) -> torch.Tensor | None:
    """The per-sample channel weights of one call: ``None`` (STD path), ``G``'s weights for
    ``labels`` (checked by the mask), or the checked explicit ``channel_mask``."""
    if labels is not None and channel_mask is not None:
        raise ValueError("pass labels= or channel_mask=, not both")
    if labels is not None:
        return mask.weights(labels, x.shape[0])
    if channel_mask is not None:
        return _check_channel_mask(channel_mask, x.shape[0], num_channels)
    return None


def erm_mask(features: torch.Tensor, weights: torch.Tensor | None,
             channel_dim: int = 1) -> torch.Tensor:
    """:func:`apply_channel_mask` under the name the traced node gets."""
    return apply_channel_mask(features, weights, channel_dim)


fx.wrap("erm_weights")
fx.wrap("erm_mask")


class _Replay(fx.Interpreter):
    """Runs a masked graph on a tracer's proxies, the mask as one ``erm_mask`` node."""

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target is apply_channel_mask:
            return erm_mask(*args, **kwargs)  # the wrapped global: one node, not traced into
        return super().call_function(target, args, kwargs)


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
    eval_gm, info = _locate(base, feature_node, head, num_classes, input_size)
    graphs = build_graphs(base, info, eval_gm)
    mask = ERMMask(info.num_classes, info.num_channels, init=init)
    param = next(iter(base.parameters()), None)
    if param is not None:
        mask.to(param.device)
    erm_model = ERMModel(base, graphs, info, mask, attach_args={
        "feature_node": feature_node, "head": head, "init": init,
        "input_size": tuple(input_size) if input_size is not None else None})
    erm_model.train(mode)
    return erm_model


def _locate(base: nn.Module, feature_node: str | None, head: str | None,
            num_classes: int | None, input_size: Sequence[int] | None,
            ) -> tuple[fx.GraphModule, SurgeryInfo]:
    """Trace ``base`` in eval mode, propagate shapes, and find the feature node and head."""
    eval_gm = trace_model(base, training=False)
    probe = probe_input(base, input_size)
    mode = base.training
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
    return eval_gm, analyse(eval_gm, feature_node, head, num_classes)


def detach(model: ERMModel) -> nn.Module:
    """The plain model without the mask node, for deployment (a copy; its STD path).

    Weights changed by training or unlearning are kept; ``G`` is dropped.
    """
    if not isinstance(model, ERMModel):
        raise TypeError(f"detach() takes a model returned by attach(), got "
                        f"{type(model).__name__}")
    return copy.deepcopy(model.model)
