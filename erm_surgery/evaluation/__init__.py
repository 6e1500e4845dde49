"""Evaluation suite: evidence that a class was forgotten, measured one way for every method.

``evaluate(model, forget_classes, train_data, test_data, original=..., retrained=...)``
runs the project's evaluation protocol (accuracy, loss-based MIA, linear-probe
knowledge retention, the few-shot probe, layer-wise CKA, k-NN agreement, relearn time, ERM
diagnostics; the entropy MIA and ZRF as labelled diagnostics) and returns an
:class:`UnlearningReport` with a :class:`Verdict` (forgotten / not forgotten / inconclusive /
broken) that saves as JSON, Markdown, PNG plots and HTML.
Each metric is also usable on its own, on plain tensors.
"""

from .accuracy import (
    AccuracyResult,
    accuracy_deltas,
    accuracy_metrics,
    class_set_accuracy,
    per_class_accuracy,
)
from .calibration import BLOCKED_LOGIT, logit_only
from .cka import CKAResult, centered_gram, cka_from_grams, linear_cka
from .config import METRICS, EvalConfig, EvaluationError
from .entropy_mia import EntropyMIAResult, entropy_mia, output_entropy
from .erm import ERMDiagnostics, erm_diagnostics
from .features import FeatureCache, SplitOutputs
from .fewshot import FewShotResult, fewshot_draws, fewshot_probe
from .knn import KNNResult, knn_agreement, knn_indices
from .layers import activation_grams, activation_nodes, choose_layers, stage_names
from .mia import MIAResult, membership_inference, per_sample_loss
from .models import find_classifier
from .probe import ProbeResult, linear_probe
from .relearn import RelearnResult, relearn
from .report import UnlearningReport
from .resources import ResourceUsage
from .runner import evaluate
from .verdict import CALIBRATED, MetricPosition, Verdict, judge
from .zrf import ZRFResult, js_divergence, zrf_score

__all__ = [
    "evaluate",
    "EvalConfig",
    "UnlearningReport",
    "EvaluationError",
    "METRICS",
    "CALIBRATED",
    # the verdict
    "Verdict",
    "MetricPosition",
    "judge",
    "logit_only",
    "BLOCKED_LOGIT",
    # metric functions
    "per_class_accuracy",
    "class_set_accuracy",
    "accuracy_metrics",
    "accuracy_deltas",
    "per_sample_loss",
    "membership_inference",
    "linear_probe",
    "fewshot_probe",
    "fewshot_draws",
    "output_entropy",
    "entropy_mia",
    "js_divergence",
    "zrf_score",
    "linear_cka",
    "centered_gram",
    "cka_from_grams",
    "knn_indices",
    "knn_agreement",
    "relearn",
    "erm_diagnostics",
    # feature access
    "FeatureCache",
    "SplitOutputs",
    "find_classifier",
    "activation_nodes",
    "choose_layers",
    "stage_names",
    "activation_grams",
    # result types
    "AccuracyResult",
    "MIAResult",
    "ProbeResult",
    "FewShotResult",
    "EntropyMIAResult",
    "ZRFResult",
    "CKAResult",
    "KNNResult",
    "RelearnResult",
    "ERMDiagnostics",
    "ResourceUsage",
]
