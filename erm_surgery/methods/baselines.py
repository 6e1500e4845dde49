"""The classic unlearning baselines, registered with :func:`erm_surgery.register_method`.

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

(``sisa`` lives in :mod:`erm_surgery.methods.sisa` and registers itself.) Every method
takes ``(model, classes, data, *, config=None, accelerator=None)``, works on a plain
classifier or an attached model, never modifies ``model``, and returns
``(unlearned_model, info)``; ``unlearn(..., method=name)`` returns only the model, with the
info on ``model.unlearning_info``. Costs and measured numbers: ``docs/baselines.md``.
"""

from __future__ import annotations

from ..unlearning import available_methods, register_method
from .baseline_amnesiac import (
    AmnesiacConfig,
    AmnesiacInfo,
    RecordedStep,
    UpdateRecorder,
    amnesiac,
)
from .baseline_common import BaselineInfo
from .baseline_finetune import (
    FinetuneConfig,
    FinetuneInfo,
    NegGradConfig,
    NegGradInfo,
    RandomLabelsConfig,
    RandomLabelsInfo,
    SGDRecipe,
    finetune,
    neggrad,
    random_labels,
)
from .baseline_fisher import FisherConfig, FisherInfo, diagonal_fisher, fisher
from .baseline_retrain import RetrainConfig, RetrainInfo, retrain

__all__ = [
    "BaselineInfo",
    "RetrainConfig", "RetrainInfo", "retrain",
    "SGDRecipe", "FinetuneConfig", "FinetuneInfo", "finetune",
    "RandomLabelsConfig", "RandomLabelsInfo", "random_labels",
    "NegGradConfig", "NegGradInfo", "neggrad",
    "UpdateRecorder", "RecordedStep", "AmnesiacConfig", "AmnesiacInfo", "amnesiac",
    "FisherConfig", "FisherInfo", "fisher", "diagonal_fisher",
    "BASELINES",
]

#: Registry name -> function, for the methods defined in this module's family.
BASELINES = {
    "retrain": retrain,
    "finetune": finetune,
    "random_labels": random_labels,
    "neggrad": neggrad,
    "amnesiac": amnesiac,
    "fisher": fisher,
}

for _name, _fn in BASELINES.items():
    if _name not in available_methods():  # a module reload must not raise
        register_method(_name, _fn)
