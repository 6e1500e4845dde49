"""KTP: Knowledge Transfer and Prohibition (ERM-KTP paper, section 4.2-4.3).

- :mod:`.config`: :class:`KTPConfig` and :class:`KTPInfo`;
- :mod:`.fkt`: the head surgery (FKT);
- :mod:`.ktp`: the distillation loop (CKT) and GKT; registers ``"ktp"``.
"""

from .config import KTPConfig, KTPInfo
from .ktp import ktp

__all__ = ["KTPConfig", "KTPInfo", "ktp"]
