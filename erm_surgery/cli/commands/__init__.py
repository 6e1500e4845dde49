"""The subcommands of ``erm-surgery``, one module each.

Every module has the same shape, parser beside handler: ``NAME`` (the subcommand),
``add_parser(subparsers, common)`` (its flags, description and epilog, registered with
``set_defaults(func=run)``) and ``run(args) -> int`` (the exit code). ``build_parser``
in :mod:`erm_surgery.cli.main` registers :data:`COMMANDS` in this order. Heavy imports
(torch, timm) happen inside ``run``, so a usage error costs none.
"""

from . import demo, evaluate, train, unlearn

__all__ = ["COMMANDS"]

#: the command modules, in the order ``erm-surgery --help`` lists them
COMMANDS = (demo, train, unlearn, evaluate)
