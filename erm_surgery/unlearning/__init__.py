"""Unlearning: the method registry, what every method shares, and checkpoint rewriting.

- :mod:`.registry`: :class:`MethodSpec`, ``@register_method``, :func:`unlearn`;
- :mod:`.request`: request checks, the data split, the info base, re-initialisation;
- :mod:`.checkpoint`: :func:`unlearn_checkpoint` (Algorithm 3 on a file).

The methods themselves live in :mod:`erm_surgery.methods` and register on import.
"""

from .checkpoint import record_unlearning, unlearn_checkpoint
from .registry import (
    MethodSpec,
    available_methods,
    get_method,
    register_method,
    resolve_config,
    unlearn,
)
from .request import MethodInfo, Request, check_forget_classes, check_separation, parse_request

__all__ = ["unlearn", "unlearn_checkpoint", "record_unlearning", "register_method",
           "get_method", "available_methods", "MethodSpec", "resolve_config", "MethodInfo",
           "Request", "parse_request", "check_forget_classes", "check_separation"]
