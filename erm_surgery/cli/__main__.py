"""``python -m erm_surgery.cli``: the same program as ``erm-surgery`` (and what
``accelerate launch -m erm_surgery.cli`` / ``torchrun -m erm_surgery.cli`` start)."""

import sys

from .main import main

sys.exit(main())
