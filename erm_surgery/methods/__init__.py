"""Unlearning methods, one package or module each, registered on import.

Each method is a function decorated with
:func:`erm_surgery.unlearning.register_method` (its config class, info class and what it
needs); importing this package registers them all, so
``erm_surgery.unlearn(..., method=name)`` finds them. How to add one:
docs/architecture.md.

- :mod:`.ktp`: ``ktp`` (the default);
- :mod:`.esc`: ``esc``, ``esc_t`` (training-free);
- :mod:`.ec`: ``ec``, ``ktp_ec`` (Erase-at-the-Core);
- :mod:`.baselines`: ``retrain``, ``finetune``, ``random_labels``, ``neggrad``,
  ``amnesiac``, ``fisher``, ``sisa``, and the methods recent papers compare against:
  ``salun``, ``l1_sparse``, ``boundary_shrink`` (group ``"baseline"``), ``scrub``,
  ``bad_teacher`` (``"distillation"``), ``ssd`` (``"training-free"``, beside ESC).
"""

from . import baselines, ec, esc, ktp  # noqa: F401  (registration on import)
