"""Model surgery: an ERM mask on the last conv feature map of any CNN classifier.

- :mod:`.tracing`: THE fx tracer and its leaf rules, graph walks, classifier and stage
  lookup (used by attach, ESC, EC and the evaluation alike);
- :mod:`._analysis`: which node is the feature map, which modules form the head;
- :mod:`._graphs`: inserting the mask node and cutting the full/features/head graphs;
- :mod:`.model`: :class:`ERMModel`, :func:`attach`, :func:`detach`;
- :mod:`.mask`: the mask ``G`` itself (:class:`ERMMask`);
- :mod:`.params`: optimiser parameter groups (``G`` apart, no weight decay).
"""

from .mask import ERMMask, apply_channel_mask
from .model import (
    ERMModel,
    SurgeryInfo,
    attach,
    detach,
    is_attached,
    model_device,
    num_classes_of,
    unwrap,
)
from .params import param_groups
from .tracing import ancestors, descendants, find_classifier, stage_names, trace_model

__all__ = ["attach", "detach", "unwrap", "is_attached", "num_classes_of", "model_device",
           "ERMModel", "SurgeryInfo", "ERMMask", "apply_channel_mask", "trace_model",
           "ancestors", "descendants", "find_classifier", "stage_names", "param_groups"]
