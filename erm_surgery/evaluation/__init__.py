"""Evaluation suite: evidence that a class was forgotten, measured one way for every method.

``evaluate(model, forget_classes, train_data, test_data, original=..., retrained=...)``
runs the project's evaluation protocol (accuracy, loss-based MIA, linear-probe
knowledge retention, layer-wise CKA, k-NN agreement, relearn time, ERM diagnostics) and
returns an :class:`UnlearningReport` that saves as JSON, Markdown, PNG plots and HTML.
Each metric is also usable on its own, on plain tensors.
"""

from .accuracy import (
    AccuracyResult,
    accuracy_deltas,
    accuracy_metrics,
    class_set_accuracy,
    per_class_accuracy,
)
from .cka import CKAResult, centered_gram, cka_from_grams, linear_cka
from .config import METRICS, EvalConfig, EvaluationError
from .erm import ERMDiagnostics, erm_diagnostics
from .features import FeatureCache, SplitOutputs
from .knn import KNNResult, knn_agreement, knn_indices
from .layers import activation_grams, activation_nodes, choose_layers, stage_names
from .mia import MIAResult, membership_inference, per_sample_loss
from .models import find_classifier
from .probe import ProbeResult, linear_probe
from .relearn import RelearnResult, relearn
from .report import UnlearningReport
from .resources import ResourceUsage
from .runner import evaluate

__all__ = [
    "evaluate",
    "EvalConfig",
    "UnlearningReport",
    "EvaluationError",
    "METRICS",
    # metric functions
    "per_class_accuracy",
    "class_set_accuracy",
    "accuracy_metrics",
    "accuracy_deltas",
    "per_sample_loss",
    "membership_inference",
    "linear_probe",
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
    "CKAResult",
    "KNNResult",
    "RelearnResult",
    "ERMDiagnostics",
    "ResourceUsage",
]
