"""Settings of :func:`~erm_surgery.evaluation.evaluate` and validation of its inputs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..data import check_class_ids
from ..errors import EvaluationError

__all__ = ["EvalConfig", "EvaluationError", "METRICS", "check_metrics", "check_forget_classes"]

#: Every metric :func:`evaluate` knows, in the order they are computed and reported.
METRICS: tuple[str, ...] = ("accuracy", "mia", "entropy_mia", "zrf", "probe", "fewshot", "cka",
                            "knn", "relearn", "erm")


@dataclass
class EvalConfig:
    """How hard :func:`evaluate` looks. Defaults suit a CIFAR-sized model on one GPU.

    Attributes:
        batch_size: batch size of every inference pass (feature extraction, CKA, relearn
            evaluation).
        probe_epochs: epochs of the linear probe (knowledge retention, KR) trained on the
            frozen pooled features of the full training set. The ESC paper uses ~10.
        probe_min_steps: the probe trains for at least this many minibatch steps, so that a
            small training set still gets a converged probe.
        probe_lr: Adam learning rate of the probe (features are standardised first).
        probe_batch_size: minibatch size of the probe.
        probe_weight_decay: L2 penalty of the probe.
        mia_folds: stratified folds of the loss-based membership-inference attack.
        fewshot_shots: samples per forget class the few-shot probe is given (each ``k``).
        fewshot_draws: seeded draws of those samples per ``k`` (mean and confidence
            interval over draws; at least 2).
        fewshot_weight_decay: L2 penalty of the few-shot probe's logistic regression.
        fewshot_max_iter: L-BFGS iterations per few-shot fit.
        zrf_seed: seed of the randomly initialised model ZRF compares with.
        retain_drop: the verdict calls a model "broken" when its retain test accuracy is
            more than this (a fraction) below the original's.
        cka_layers: fx node names (``torchvision.models.feature_extraction`` naming) at
            which layer-wise CKA is measured; ``None`` picks the stage outputs
            automatically. The pooled features are always compared as well.
        cka_max_layers: at most this many automatically chosen layers.
        cka_max_samples: forget-class test samples used for CKA (a seeded subsample);
            the Gram matrices are ``n x n``.
        cka_max_dim: a flattened activation larger than this is average-pooled
            spatially first, so a 56x56 map of a big model does not need gigabytes.
        knn_k: neighbours per query of the k-NN agreement metric.
        relearn_epochs: fine-tuning budget of the relearn-time metric.
        relearn_lr: SGD learning rate of the relearn fine-tuning.
        relearn_momentum: SGD momentum of the relearn fine-tuning.
        relearn_weight_decay: SGD weight decay of the relearn fine-tuning.
        relearn_threshold: forget-class test accuracy that counts as "relearned".
        relearn_batch_size: batch size of the relearn fine-tuning (``batch_size`` if None).
        classifier: module name of the final classifier (``"fc"``, ``"head.fc"``...),
            overriding the automatic choice; its input is the pooled feature vector.
        seed: seed of every random choice (subsamples, probe init and order, relearn order).
        show_progress: tqdm progress bars.
    """

    batch_size: int = 256
    probe_epochs: int = 20
    probe_min_steps: int = 200
    probe_lr: float = 1e-2
    probe_batch_size: int = 256
    probe_weight_decay: float = 0.0
    mia_folds: int = 5
    fewshot_shots: Sequence[int] = (1, 5, 10)
    fewshot_draws: int = 5
    fewshot_weight_decay: float = 1e-3
    fewshot_max_iter: int = 50
    zrf_seed: int = 0
    retain_drop: float = 0.10
    cka_layers: Sequence[str] | None = None
    cka_max_layers: int = 6
    cka_max_samples: int = 1000
    cka_max_dim: int = 8192
    knn_k: int = 10
    relearn_epochs: int = 5
    relearn_lr: float = 1e-2
    relearn_momentum: float = 0.9
    relearn_weight_decay: float = 0.0
    relearn_threshold: float = 0.5
    relearn_batch_size: int | None = None
    classifier: str | None = None
    seed: int = 0
    show_progress: bool = False

    def __post_init__(self) -> None:
        positive = ("batch_size", "probe_epochs", "probe_batch_size", "mia_folds",
                    "cka_max_layers", "cka_max_samples", "cka_max_dim", "knn_k",
                    "fewshot_max_iter")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EvaluationError(f"EvalConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.probe_min_steps, int) or self.probe_min_steps < 0:
            raise EvaluationError(
                f"EvalConfig.probe_min_steps must be an int >= 0, got {self.probe_min_steps!r}")
        if not isinstance(self.relearn_epochs, int) or self.relearn_epochs < 0:
            raise EvaluationError(
                f"EvalConfig.relearn_epochs must be an int >= 0, got {self.relearn_epochs!r}")
        if self.mia_folds < 2:
            raise EvaluationError(f"EvalConfig.mia_folds must be >= 2, got {self.mia_folds}")
        if not 0.0 < float(self.relearn_threshold) <= 1.0:
            raise EvaluationError("EvalConfig.relearn_threshold is a forget-class accuracy in "
                                  f"(0, 1], got {self.relearn_threshold!r}")
        for name in ("probe_lr", "relearn_lr"):
            if not float(getattr(self, name)) > 0:
                raise EvaluationError(f"EvalConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.relearn_batch_size is not None and self.relearn_batch_size < 1:
            raise EvaluationError("EvalConfig.relearn_batch_size must be a positive int or None")
        if (not isinstance(self.fewshot_draws, int) or isinstance(self.fewshot_draws, bool)
                or self.fewshot_draws < 2):
            raise EvaluationError("EvalConfig.fewshot_draws must be an int >= 2 (the "
                                  f"confidence interval needs two draws), got "
                                  f"{self.fewshot_draws!r}")
        if isinstance(self.fewshot_shots, int):
            self.fewshot_shots = (self.fewshot_shots,)
        shots = list(self.fewshot_shots)
        if not shots or any(not isinstance(k, int) or isinstance(k, bool) or k < 1
                            for k in shots):
            raise EvaluationError("EvalConfig.fewshot_shots must be ints >= 1 (samples per "
                                  f"forget class), got {self.fewshot_shots!r}")
        self.fewshot_shots = tuple(sorted(set(shots)))
        if not float(self.fewshot_weight_decay) >= 0:
            raise EvaluationError("EvalConfig.fewshot_weight_decay must be >= 0, got "
                                  f"{self.fewshot_weight_decay!r}")
        if not 0.0 <= float(self.retain_drop) <= 1.0:
            raise EvaluationError("EvalConfig.retain_drop is a fraction in [0, 1] (0.10 = 10 "
                                  f"points), got {self.retain_drop!r}")
        if isinstance(self.cka_layers, str):
            # a bare string would be iterated character by character
            self.cka_layers = [self.cka_layers]
        if self.cka_layers is not None:
            self.cka_layers = [str(n) for n in self.cka_layers]
            if not self.cka_layers:
                raise EvaluationError("EvalConfig.cka_layers is empty; pass None for automatic")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data (for the report)."""
        out = asdict(self)
        out["fewshot_shots"] = list(out["fewshot_shots"])
        if out["cka_layers"] is not None:
            out["cka_layers"] = list(out["cka_layers"])
        return out


def check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    """The requested metric names, validated and put in :data:`METRICS` order."""
    if isinstance(metrics, str):
        metrics = [metrics]  # evaluate(..., metrics="mia") means one metric, not four letters
    requested = [str(m).lower() for m in metrics]
    unknown = sorted(set(requested) - set(METRICS))
    if unknown:
        raise EvaluationError(f"unknown metric name(s) {unknown}; choose from {list(METRICS)}")
    if not requested:
        raise EvaluationError(f"no metric requested; choose from {list(METRICS)}")
    return tuple(m for m in METRICS if m in requested)


def check_forget_classes(forget_classes: Iterable[int] | int, num_classes: int) -> list[int]:
    """``forget_classes`` as a sorted list of distinct ints in ``0..num_classes - 1``."""
    classes = sorted(set(check_class_ids(forget_classes, num_classes, error=EvaluationError,
                                         name="forget_classes")))
    if len(classes) == num_classes:
        raise EvaluationError("forget_classes covers every class: there is nothing left to "
                              "retain, so retain accuracy and the probe are undefined")
    return classes
