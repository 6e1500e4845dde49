"""Unlearning methods beyond KTP, one module each, registered on import.

Each module defines ``fn(model, classes, data, *, config=None, accelerator=None, **kw)``
returning ``(unlearned_model, info)`` and calls
``erm_surgery.unlearning.register_method(name, fn)`` at import time; this package imports
them all so ``erm_surgery.unlearn(..., method=name)`` finds them.
"""

from . import ec, esc  # noqa: F401  (ESC, ESC-T, EC and KTP+EC: docs/methods.md)
from .baselines import BASELINES  # noqa: F401  (registers retrain, finetune, ... : baselines.md)
from .sisa import train_sisa  # noqa: F401  (registers sisa: docs/baselines.md)
