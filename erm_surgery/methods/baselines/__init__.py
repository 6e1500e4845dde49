"""The classic unlearning baselines, one module each, registered on import.

=================  ==========================================  ============================
name               what it does                                paper
=================  ==========================================  ============================
``retrain``        re-initialise, train on the retain data     gold standard (exact)
``finetune``       fine-tune on the retain data                Golatkar et al. CVPR 2020
``random_labels``  fine-tune, forget samples relabelled        Graves et al. AAAI 2021
``neggrad``        descent on retain, bounded ascent on forget Kurmanji et al. NeurIPS 2023
``amnesiac``       subtract recorded updates, then fine-tune   Graves et al. AAAI 2021
``fisher``         Fisher-scaled noise on the weights          Golatkar et al. CVPR 2020
``sisa``           retrain the shards that held forget data    Bourtoule et al. S&P 2021
``salun``          random labels on the salient weights only   Fan et al. ICLR 2024
``l1_sparse``      fine-tune on retain with an l1 penalty      Jia et al. NeurIPS 2023
``scrub``          away from the teacher on forget, with it    Kurmanji et al. NeurIPS 2023
                   on retain (distillation)
``ssd``            dampen forget-specific weights, no training Foster et al. AAAI 2024
``bad_teacher``    distil a random teacher on forget, the      Chundawat et al. AAAI 2023
                   original on retain (distillation)
``boundary_shrink`` fine-tune forget samples to their nearest  Chen et al. CVPR 2023
                   wrong class (FGSM neighbour)
=================  ==========================================  ============================

``ssd`` is in the registry group ``"training-free"`` (beside ESC), ``scrub`` and
``bad_teacher`` in ``"distillation"``, the others in ``"baseline"``. ``_steps.py`` holds
the step loop of the methods whose step is more than a loss of ``(logits, labels)``.

Every method takes ``(model, classes, data, *, config, accelerator=None)``, works on a
plain classifier or an attached model, never modifies ``model``, and returns
``(unlearned_model, info)``; ``unlearn(..., method=name)`` returns only the model, with the
info on ``model.unlearning_info``. Costs and measured numbers: ``docs/baselines.md``.
"""

from .amnesiac import AmnesiacConfig, AmnesiacInfo, RecordedStep, UpdateRecorder, amnesiac
from .bad_teacher import BadTeacherConfig, BadTeacherInfo, bad_teacher
from .boundary_shrink import (
    BoundaryShrinkConfig,
    BoundaryShrinkInfo,
    boundary_shrink,
    nearest_wrong_labels,
)
from .common import BaselineInfo
from .finetune import (
    FinetuneConfig,
    FinetuneInfo,
    NegGradConfig,
    NegGradInfo,
    RandomLabelsConfig,
    RandomLabelsInfo,
    finetune,
    neggrad,
    random_labels,
)
from .fisher import FisherConfig, FisherInfo, diagonal_fisher, fisher
from .l1_sparse import L1SparseConfig, L1SparseInfo, l1_sparse
from .retrain import RetrainConfig, RetrainInfo, retrain
from .salun import SalUnConfig, SalUnInfo, saliency_mask, salun
from .scrub import SCRUBConfig, SCRUBInfo, scrub

# ``sisa`` the function stays in .sisa: exported here it would hide the module of that name
from .sisa import SISAConfig, SISAEnsemble, SISAInfo, train_sisa
from .ssd import SSDConfig, SSDInfo, batch_importance, ssd

__all__ = [
    "BaselineInfo",
    "RetrainConfig", "RetrainInfo", "retrain",
    "FinetuneConfig", "FinetuneInfo", "finetune",
    "RandomLabelsConfig", "RandomLabelsInfo", "random_labels",
    "NegGradConfig", "NegGradInfo", "neggrad",
    "UpdateRecorder", "RecordedStep", "AmnesiacConfig", "AmnesiacInfo", "amnesiac",
    "FisherConfig", "FisherInfo", "fisher", "diagonal_fisher",
    "SISAConfig", "SISAEnsemble", "SISAInfo", "train_sisa",
    "SalUnConfig", "SalUnInfo", "salun", "saliency_mask",
    "L1SparseConfig", "L1SparseInfo", "l1_sparse",
    "SCRUBConfig", "SCRUBInfo", "scrub",
    "BadTeacherConfig", "BadTeacherInfo", "bad_teacher",
    "BoundaryShrinkConfig", "BoundaryShrinkInfo", "boundary_shrink", "nearest_wrong_labels",
    "SSDConfig", "SSDInfo", "ssd", "batch_importance",
]
