"""ESC and ESC-T (Lee et al., CVPR 2025): training-free unlearning by removing the forget
classes' feature directions before the head.

- :mod:`.esc`: ``esc``, its config, the info both share, and the checkpoint restorer that
  rebuilds the projections;
- :mod:`.esc_t`: ``esc_t`` and its config;
- :mod:`.graph`: the projection module and the fx edits that insert it.
"""

from .esc import (
    NO_ZERO_GUARANTEE,
    ESCConfig,
    ESCInfo,
    esc,
    forget_features,
    restore_projections,
)
from .esc_t import ESCTConfig, esc_t
from .graph import ProjectedModel, SubspaceProjection

__all__ = ["ESCConfig", "ESCTConfig", "ESCInfo", "esc", "esc_t", "forget_features",
           "restore_projections", "NO_ZERO_GUARANTEE", "ProjectedModel", "SubspaceProjection"]
