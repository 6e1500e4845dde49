"""The method registry: one :class:`MethodSpec` per unlearning method, and :func:`unlearn`.

A method is a function ``fn(model, classes, data, *, config, accelerator, **extras)``
returning ``(unlearned_model, info)``. It is registered where it is defined, with the
spec that tells the rest of the library what it needs::

    @register_method("my_method", config=MyConfig, info=MyInfo, needs_attached=False)
    def my_method(model, classes, data, *, config, accelerator=None):
        request = parse_request(model, classes, data)
        ...
        return new_model, MyInfo(method="my_method", forget_classes=request.forget, ...)

The registry then gives every method the same behaviour: ``unlearn(..., **overrides)``
builds the config from keyword arguments, the returned model carries its info as
``model.unlearning_info`` and the info's ``seconds`` is the wall time of the call, the CLI
builds the method's options from its config class, and ``unlearn_checkpoint`` refuses a
method whose result cannot be reloaded before any work. docs/architecture.md has the
whole contract.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import UnlearningError
from .request import MethodInfo

__all__ = ["MethodSpec", "register_method", "get_method", "available_methods", "unlearn",
           "resolve_config"]

C = TypeVar("C")
MethodFn = Callable[..., tuple[nn.Module, Any]]


@dataclass(frozen=True)
class MethodSpec:
    """What the library knows about one registered unlearning method.

    Attributes:
        name: the registry name (``unlearn(..., method=name)``, ``--method name``).
        fn: the method, wrapped so that it records its info on the returned model.
        config_cls: its config dataclass (``unlearn``'s keyword overrides are its fields).
        info_cls: the :class:`MethodInfo` subclass it returns.
        needs_attached: it reads ``G``, so the model must come from ``attach`` + ``train``.
        reloadable: ``erm_surgery.load`` rebuilds its result from the base model (False
            when it returns another architecture, e.g. a SISA ensemble); checked by
            ``unlearn_checkpoint`` and the CLI before any work.
        cli: the command line can run it on a checkpoint (False when it needs state a
            checkpoint does not hold: Amnesiac's recorded updates, SISA's shards).
        group: ``"ktp"``, ``"training-free"``, ``"distillation"``, ``"baseline"``...
            (how docs and benchmarks group methods).
        summary: one line for listings.
        restore: for a result that adds modules (ESC's projections), a function
            ``restore(model, state_dict) -> model`` that rebuilds them before loading;
            registered with the checkpoint loader.
        default_config: ``default_config(model) -> config`` when ``config=None`` should
            depend on the model (SISA: the ensemble's training config); else
            ``config_cls()``.
    """

    name: str
    fn: MethodFn
    config_cls: type
    info_cls: type
    needs_attached: bool = False
    reloadable: bool = True
    cli: bool = True
    group: str = "baseline"
    summary: str = ""
    restore: Callable[[nn.Module, dict], nn.Module] | None = None
    default_config: Callable[[nn.Module], Any] | None = None

    def make_config(self, config: Any = None, model: nn.Module | None = None,
                    **overrides: Any) -> Any:
        """``config`` (or the defaults for ``model``) with ``overrides`` applied: see
        :func:`resolve_config`."""
        if config is None and self.default_config is not None and model is not None:
            config = self.default_config(model)
        return resolve_config(self.config_cls, config, overrides, method=self.name)

    def extras(self) -> set[str]:
        """Keyword arguments of the method beyond ``config`` and ``accelerator``."""
        params = inspect.signature(self.fn).parameters.values()
        return {p.name for p in params if p.kind is p.KEYWORD_ONLY} - {"config", "accelerator"}


_METHODS: dict[str, MethodSpec] = {}


def resolve_config(cls: type[C], config: C | None, overrides: dict[str, Any], *,
                   method: str | None = None) -> C:
    """``config`` (or ``cls()``) with keyword ``overrides`` applied.

    ``unlearn(m, [3], data, method="esc", k=4)`` is ``config=ESCConfig(k=4)``. A config of
    another method, or an unknown keyword, is a ``TypeError`` naming the accepted ones.
    """
    who = f"method {method!r}" if method else cls.__name__
    if config is None:
        config = cls()
    elif not isinstance(config, cls):
        raise TypeError(f"{who} takes config={cls.__name__}(...): config must be a "
                        f"{cls.__name__}, got {type(config).__name__}")
    if overrides:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for {who}; accepted: "
                            f"{sorted(names)}")
        config = dataclasses.replace(config, **overrides)  # type: ignore[type-var]
    return config


def register_method(name: str, *, config: type, info: type = MethodInfo,
                    needs_attached: bool = False, reloadable: bool = True, cli: bool = True,
                    group: str = "baseline", summary: str = "",
                    restore: Callable[[nn.Module, dict], nn.Module] | None = None,
                    default_config: Callable[[nn.Module], Any] | None = None,
                    ) -> Callable[[MethodFn], MethodFn]:
    """Decorator: register ``fn`` as unlearning method ``name`` with its spec.

    The decorated function is returned wrapped: called directly or through
    :func:`unlearn`, it takes the same keyword overrides (config fields, or the method's
    own keyword arguments), resolves ``config`` (``None`` = the defaults), times the call
    into ``info.seconds`` and sets ``model.unlearning_info``. Registering a name twice is a
    ``ValueError`` unless it is the same function again (a module reload).
    """
    if not (dataclasses.is_dataclass(config) and isinstance(config, type)):
        raise TypeError(f"config= must be a dataclass type, got {config!r}")

    def decorate(fn: MethodFn) -> MethodFn:
        known = _METHODS.get(name)
        if known is not None and known.fn.__wrapped__.__qualname__ != fn.__qualname__:
            raise ValueError(f"an unlearning method named {name!r} is already registered")

        @functools.wraps(fn)
        def run(model: nn.Module, classes: Iterable[int], data: Any = None, *,
                config: Any = None, accelerator: Any = None,
                **overrides: Any) -> tuple[nn.Module, Any]:
            accepted = spec.extras()
            extras = {k: overrides.pop(k) for k in list(overrides) if k in accepted}
            fields = {f.name for f in dataclasses.fields(spec.config_cls)}
            unknown = sorted(set(overrides) - fields)
            if unknown:
                raise TypeError(
                    f"unknown option(s) {unknown} for method {name!r}; accepted: the fields "
                    f"of {spec.config_cls.__name__} {sorted(fields)}"
                    + (f" and the method's own arguments {sorted(accepted)}" if accepted else ""))
            # a torch.compile wrapper: the method works on (and never modifies) the model
            model = getattr(model, "_orig_mod", model)
            cfg = spec.make_config(config, model, **overrides)
            data = remembered_data(model) if data is None else data
            from ..training.trainer import caller_state_kept

            start = time.perf_counter()
            with caller_state_kept():  # the caller's Accelerator keeps its settings
                out, result = fn(model, classes, data, config=cfg, accelerator=accelerator,
                                 **extras)
            if isinstance(result, MethodInfo):
                result.seconds = time.perf_counter() - start
            out.__dict__["unlearning_info"] = result
            return out, result

        spec = MethodSpec(name=name, fn=run, config_cls=config, info_cls=info,
                          needs_attached=needs_attached, reloadable=reloadable, cli=cli,
                          group=group, summary=summary, restore=restore,
                          default_config=default_config)
        _METHODS[name] = spec
        if restore is not None:
            from ..checkpoint import register_restorer

            register_restorer(name, restore)
        return run

    return decorate


def remembered_data(model: nn.Module) -> Any:
    """The training data :func:`erm_surgery.train` remembered on ``model`` (a reference
    in ``model.training_data``); an :class:`UnlearningError` saying what to pass when none
    is known."""
    holder = getattr(model, "__dict__", {}).get("training_data")
    data = getattr(holder, "data", None)
    if data is None:
        raise UnlearningError(
            f"no training data is known for this {type(model).__name__}: pass the training "
            "data: erm_surgery.unlearn(model, classes, data) (a Dataset or DataLoader of "
            "(image, label)), or train with erm_surgery.train(model, data), which remembers "
            "it (a model loaded from a checkpoint or unpickled does not)")
    return data


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name``; a ``ValueError`` listing the names otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown unlearning method {name!r}; available: "
                         f"{available_methods()}") from None


def available_methods() -> list[str]:
    """Names accepted by ``unlearn(..., method=)``."""
    return sorted(_METHODS)


def unlearn(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader | None = None,
    *,
    method: str = "ktp",
    config: Any = None,
    accelerator: Any = None,
    **overrides: Any,
) -> nn.Module:
    """Forget ``classes``: returns a new model; ``model`` (the teacher) is not modified.

    Args:
        model: an attached model trained with :func:`erm_surgery.train` (methods with
            ``needs_attached=False``, the baselines, also take a plain classifier).
        classes: class ids to forget (a list, or one int).
        data: the training data (Dataset or DataLoader of ``(image, label)``); it is split
            by label here (fast through ``.targets`` / ``TensorDataset`` labels). ``None``
            (the default): the data :func:`erm_surgery.train` remembered on ``model``; an
            :class:`UnlearningError` when it was not trained in this process.
        method: a name from :func:`available_methods` (default ``"ktp"``).
        config: the method's config dataclass (:class:`KTPConfig` for KTP).
        accelerator: an ``accelerate.Accelerator`` (default: GPUs if any, else CPU).
        **overrides: fields of the method's config (``unlearn(m, [3], d, epochs=1)``), or
            the method's own extra arguments (KTP: ``student=``; retrain: ``fresh_model=``).

    A model compiled with ``torch.compile`` is unlearned through its original module (the
    returned model is not compiled: compile it again if you want). The returned model is
    attached (for every method but ``sisa``), so it can be trained
    or asked to forget again: ``unlearn(unlearn(m, [1], d), [2], d)`` forgets both.
    ``student.unlearning_info`` holds the method's info (a :class:`MethodInfo`). The
    gradient-accumulation setting Accelerate shares between accelerators is restored, so
    the caller's own ``Accelerator`` keeps its ``gradient_accumulation_steps``.
    """
    spec = get_method(method)
    student, _ = spec.fn(model, classes, data, config=config, accelerator=accelerator,
                         **overrides)
    return student
