"""Erase at the Core (EC): multi-layer contrastive unlearning with deep supervision.

- :mod:`.ec`: the methods ``ec`` and ``ktp_ec`` (KTP, then EC on its student), their
  configs and info;
- :mod:`.plugin`: :class:`ECPlugin`, the auxiliary heads and the loss, usable from any
  training loop.
"""

from .ec import ECConfig, ECInfo, KTPECConfig, ec, ec_finetune, ktp_ec
from .plugin import ECLosses, ECPlugin, contrastive_unlearning_loss, supervision_points

__all__ = ["ECConfig", "ECInfo", "KTPECConfig", "ECPlugin", "ECLosses", "ec", "ktp_ec",
           "ec_finetune", "contrastive_unlearning_loss", "supervision_points"]
