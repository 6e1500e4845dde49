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
=================  ==========================================  ============================

Every method takes ``(model, classes, data, *, config, accelerator=None)``, works on a
plain classifier or an attached model, never modifies ``model``, and returns
``(unlearned_model, info)``; ``unlearn(..., method=name)`` returns only the model, with the
info on ``model.unlearning_info``. Costs and measured numbers: ``docs/baselines.md``.
"""

from .amnesiac import AmnesiacConfig, AmnesiacInfo, RecordedStep, UpdateRecorder, amnesiac
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
from .retrain import RetrainConfig, RetrainInfo, retrain

# ``sisa`` the function stays in .sisa: exported here it would hide the module of that name
from .sisa import SISAConfig, SISAEnsemble, SISAInfo, train_sisa

__all__ = [
    "BaselineInfo",
    "RetrainConfig", "RetrainInfo", "retrain",
    "FinetuneConfig", "FinetuneInfo", "finetune",
    "RandomLabelsConfig", "RandomLabelsInfo", "random_labels",
    "NegGradConfig", "NegGradInfo", "neggrad",
    "UpdateRecorder", "RecordedStep", "AmnesiacConfig", "AmnesiacInfo", "amnesiac",
    "FisherConfig", "FisherInfo", "fisher", "diagonal_fisher",
    "SISAConfig", "SISAEnsemble", "SISAInfo", "train_sisa",
]
