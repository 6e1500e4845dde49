"""Unlearning methods beyond KTP, one module each, registered on import.

Each module defines ``fn(model, classes, data, *, config=None, accelerator=None, **kw)``
returning ``(unlearned_model, info)`` and calls
``erm_surgery.unlearning.register_method(name, fn)`` at import time; this package imports
them all so ``erm_surgery.unlearn(..., method=name)`` finds them.
"""
