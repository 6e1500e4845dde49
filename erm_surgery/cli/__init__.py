"""The ``erm-surgery`` command line: one module per command, parser beside handler.

- :mod:`.main`: ``build_parser()`` (the top-level parser and its common flags, the
  commands registered from :mod:`.commands`), ``main(argv)`` and the one-line errors;
- :mod:`.commands`: ``demo``, ``train``, ``unlearn``, ``evaluate``, each a module with
  ``add_parser(subparsers, common)`` and ``run(args) -> int``;
- :mod:`.method_options`: ``unlearn``'s method options, built from the method's config
  class (``--epochs``, ``--lr``, ..., ``--set FIELD=VALUE``);
- :mod:`.common`, :mod:`.data`, :mod:`.models`: errors, argparse types and output; the
  datasets; model building and checkpoint files;
- :mod:`.demo`: the demo's run (``run_demo``), also usable from Python.
"""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
