"""The options of ``erm-surgery unlearn --method NAME``, built from the method's config class.

The command line does not hard-code any method's settings: every registered method has a
config dataclass (``MethodSpec.config_cls``), and

- the convenience flags ``--epochs``, ``--batch-size``, ``--lr``, ``--threshold`` and
  ``--distill-on`` set the field of that name, for any method whose config has it (a
  usage error naming the method and its fields otherwise);
- ``--set FIELD=VALUE`` (repeatable) sets any field, the text parsed by the field's type:
  ``int``, ``float``, ``bool`` (``true`` / ``false``), ``str``, ``None`` for an optional
  field, a comma-separated list for a sequence, ``ktp.epochs=1`` for a field of a nested
  config (``ktp_ec``);
- ``--seed``, ``--no-progress`` and ``--workers`` set ``seed``, ``show_progress`` and
  ``num_workers`` wherever the config (or a config nested in it) has them; ``--set``
  overrides them.

Every mistake is a :class:`~erm_surgery.cli.common.UsageError` (exit 2) raised before any
data or model is loaded.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from .common import UsageError, one_line

__all__ = ["CONVENIENCE_FLAGS", "RUN_SETTINGS", "parse_assignment", "config_field_names",
           "describe_fields", "method_config"]

#: config field -> the convenience flag that sets it
CONVENIENCE_FLAGS: dict[str, str] = {"epochs": "--epochs", "batch_size": "--batch-size",
                                     "lr": "--lr", "threshold": "--threshold",
                                     "distill_on": "--distill-on"}
#: config fields set from the command's run flags (--seed, --no-progress, --workers)
RUN_SETTINGS = ("seed", "show_progress", "num_workers")

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence)


def parse_assignment(text: str) -> tuple[str, str]:
    """argparse type of ``--set``: ``"FIELD=VALUE"`` -> ``(FIELD, VALUE)``."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    return name, value


# --------------------------------------------------------------------------- fields


def _fields(config: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config) if f.init}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved type of each field; a field whose annotation cannot be resolved maps
    to ``None`` (its current value's type is used then)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a forward reference that only exists for type checkers
        return {f.name: f.type for f in dataclasses.fields(cls) if not isinstance(f.type, str)}


def _nested(config: Any) -> dict[str, Any]:
    """The fields of ``config`` that are configs themselves (``ktp_ec``: ``ktp``, ``ec``)."""
    return {name: getattr(config, name) for name in _fields(config)
            if dataclasses.is_dataclass(getattr(config, name))
            and not isinstance(getattr(config, name), type)}


def config_field_names(config: Any) -> list[str]:
    """The fields ``--set`` accepts on ``config`` (a config class or instance), in
    declaration order; a nested config's are written ``name.FIELD``."""
    if isinstance(config, type):
        config = config()
    nested = _nested(config)
    return [f"{name}.FIELD" if name in nested else name for name in _fields(config)]


def _type_name(hint: Any) -> str:
    """``float``, ``int | None``, ``Sequence[str] | None``, ``ERMConfig | None``..."""
    if hint is type(None):
        return "None"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(_type_name(a) for a in args)
    if origin is not None and args:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def _value_text(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value).__name__
    return str(value)


def describe_fields(config: Any) -> str:
    """``epochs=2 lr=0.005 ...``: the fields of ``config`` (class or instance) with their
    defaults; a nested config as ``ktp.FIELD (KTPConfig)``."""
    if isinstance(config, type):
        config = config()
    nested = _nested(config)
    return " ".join(f"{name}.FIELD ({type(nested[name]).__name__})" if name in nested
                    else f"{name}={_value_text(getattr(config, name))}"
                    for name in _fields(config))


# --------------------------------------------------------------------------- values


class _Unsettable(Exception):
    """A field type the command line has no text form for."""


def _parse(hint: Any, text: str, current: Any) -> Any:
    """``text`` as a value of type ``hint`` (``ValueError`` when it is not one)."""
    if hint is None or hint is Any:
        hint = type(current) if current is not None else str
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if type(None) in args and text.strip().lower() == "none":
            return None
        unsettable = True
        for option in (a for a in args if a is not type(None)):
            try:
                return _parse(option, text, None)
            except _Unsettable:
                continue
            except ValueError:
                unsettable = False
        raise _Unsettable() if unsettable else ValueError(text)
    if origin is typing.Literal:
        for value in args:
            if str(value) == text.strip():
                return value
        raise ValueError(text)
    if hint is bool:
        word = text.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ValueError(text)
    if hint is int:
        return int(text.strip())
    if hint is float:
        return float(text.strip())
    if hint is str:
        return text
    if origin in _SEQUENCES or hint in _SEQUENCES:
        item = args[0] if args and args[0] is not Ellipsis else str
        values = [_parse(item, part.strip(), None) for part in text.split(",") if part.strip()]
        return tuple(values) if origin is tuple else values
    raise _Unsettable()


def _expected(hint: Any) -> str:
    """What a value of type ``hint`` looks like: ``an int or None``, ``true or false``..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        parts = [_expected(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or None" if type(None) in args else "")
    if hint is bool:
        return "true or false"
    if origin in _SEQUENCES or hint in _SEQUENCES:
        return f"a comma-separated list ({_type_name(hint)})"
    name = _type_name(hint)
    return f"{'an' if name[:1] in tuple('aeiou') else 'a'} {name}"


def _coerce(method: str, config: Any, path: str, field: str, text: str) -> Any:
    current = getattr(config, field)
    hint = _hints(type(config)).get(field)
    if dataclasses.is_dataclass(current) and not isinstance(current, type):
        raise UsageError(f"--set {path}={text}: {path} is a {type(current).__name__}; set "
                         f"its fields one by one, e.g. --set {path}.{next(iter(_fields(current)))}"
                         f"=VALUE ({describe_fields(current)})")
    try:
        return _parse(hint, text, current)
    except _Unsettable:
        only = "; only None can be set from the command line" \
            if type(None) in typing.get_args(hint) else ""
        raise UsageError(f"--set {path}={text}: {path} of method {method!r} is "
                         f"{_type_name(hint)}{only}; set it from Python "
                         "(erm_surgery.unlearn)") from None
    except ValueError:
        raise UsageError(f"--set {path}={text}: {path} of method {method!r} takes "
                         f"{_expected(hint)}, got {text!r}") from None


# --------------------------------------------------------------------------- config


def _fields_text(method: str, config: Any) -> str:
    return (f"method {method!r} ({type(config).__name__}) has the fields "
            f"{', '.join(config_field_names(config))}")


def method_config(spec: Any, *, flags: Mapping[str, Any] | None = None,
                  sets: Sequence[tuple[str, str]] = (), recipe: str | None = None,
                  run: Mapping[str, Any] | None = None, model: Any = None) -> Any:
    """The config of ``spec``'s method from the command line's options.

    Args:
        spec: the method's :class:`~erm_surgery.unlearning.MethodSpec`.
        flags: ``{field: value}`` of the convenience flags given (:data:`CONVENIENCE_FLAGS`).
        sets: the ``--set`` pairs ``(FIELD, VALUE text)``, in order.
        recipe: ``--recipe`` (``"default"`` / ``"paper"``; KTP only), or None.
        run: ``{seed, show_progress, num_workers}`` from the run flags, applied where the
            config (or a nested config) has the field.
        model: the model to unlearn, for a method whose defaults depend on it
            (``MethodSpec.default_config``); None before it is loaded.

    Raises :class:`UsageError` for an option the config does not have, a value of the
    wrong type, an option given twice, or a value the config rejects.
    """
    from ..methods.ktp import KTPConfig

    method, cls = spec.name, spec.config_cls
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if recipe is not None and not issubclass(cls, KTPConfig):
        raise UsageError(f"--recipe is a KTP option; {_fields_text(method, cls())} "
                         "(set them with --set FIELD=VALUE)")
    try:
        base = spec.make_config(KTPConfig.paper() if recipe == "paper" else None, model)
    except (TypeError, ValueError) as err:
        raise UsageError(f"{one_line(err)} (method {method!r})") from err
    names, nested = _fields(base), _nested(base)

    top: dict[str, Any] = {}
    inner: dict[str, dict[str, Any]] = {name: {} for name in nested}
    for name, value in (run or {}).items():  # the run flags, wherever there is such a field
        if name in names and name not in nested:
            top[name] = value
        for sub, sub_config in nested.items():
            if name in _fields(sub_config):
                inner[sub][name] = value
    for name, value in flags.items():
        if name not in names or name in nested:
            accepted = [CONVENIENCE_FLAGS[f] for f in CONVENIENCE_FLAGS
                        if f in names and f not in nested]
            takes = f"{', '.join(accepted)} and " if accepted else ""
            raise UsageError(f"{CONVENIENCE_FLAGS[name]} is not an option of method "
                             f"{method!r}: it takes {takes}--set FIELD=VALUE; "
                             f"{_fields_text(method, base)}")
        top[name] = value
    seen: set[str] = set()
    for path, text in sets:
        if path in seen:
            raise UsageError(f"--set {path}=... is given twice; pass it once")
        seen.add(path)
        head, _, tail = path.partition(".")
        if tail and head in nested:
            sub_config = nested[head]
            if tail not in _fields(sub_config):
                raise UsageError(f"unknown field {tail!r} in --set {path}={text}: "
                                 f"{head} ({type(sub_config).__name__}) has the fields "
                                 f"{', '.join(config_field_names(sub_config))}")
            inner[head][tail] = _coerce(method, sub_config, path, tail, text)
            continue
        if path not in names:
            hint = f"; {head} has no nested fields" if tail and head in names else ""
            raise UsageError(f"unknown field {path!r} in --set {path}={text}: "
                             f"{_fields_text(method, base)}{hint}")
        if path in flags:
            raise UsageError(f"{CONVENIENCE_FLAGS[path]} and --set {path}={text} both set "
                             f"{path} of method {method!r}; pass one")
        top[path] = _coerce(method, base, path, path, text)
    try:
        for sub, values in inner.items():
            if values:
                top[sub] = dataclasses.replace(nested[sub], **values)
        return spec.make_config(base, **top)
    except (TypeError, ValueError) as err:
        raise UsageError(f"{one_line(err)} (method {method!r})") from err
