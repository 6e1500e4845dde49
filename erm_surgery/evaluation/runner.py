"""``evaluate``: run the requested metrics on a model (and references) and build the report."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import check_labels, raw_labels
from ..surgery import model_device
from .accuracy import accuracy_deltas, accuracy_metrics, class_set_accuracy
from .cka import CKAResult, centered_gram, cka_from_grams
from .config import METRICS, EvalConfig, EvaluationError, check_forget_classes, check_metrics
from .entropy_mia import entropy_mia
from .erm import erm_diagnostics
from .features import FeatureCache, class_indices, logits_of, ordered_loader, subset_loader
from .fewshot import fewshot_probe
from .knn import knn_agreement
from .layers import (
    activation_grams,
    activation_nodes,
    choose_layers,
    match_layers,
    stage_names,
)
from .mia import membership_inference, per_sample_loss
from .models import find_classifier, plain_module, prepared_models, split_batch
from .probe import linear_probe
from .relearn import relearn
from .report import ROLES, UnlearningReport, pair_key
from .resources import ResourceMonitor
from .verdict import judge
from .zrf import zrf_score

__all__ = ["evaluate"]

#: Model pairs compared by CKA, (evaluated, reference): the model against both references,
#: and the references against each other as the yardstick.
_CKA_PAIRS = (("model", "original"), ("model", "retrained"), ("retrained", "original"))


def evaluate(
    model: nn.Module,
    forget_classes: Iterable[int] | int,
    train_data: Dataset | DataLoader,
    test_data: Dataset | DataLoader,
    *,
    original: nn.Module | None = None,
    retrained: nn.Module | Sequence[nn.Module] | None = None,
    metrics: Iterable[str] = METRICS,
    config: EvalConfig | None = None,
    device: torch.device | str | None = None,
) -> UnlearningReport:
    """Judge how well ``model`` forgot ``forget_classes`` (the project's evaluation protocol).

    Args:
        model: the unlearned classifier (plain or an attached ERM model); never modified.
        forget_classes: class ids that should be forgotten.
        train_data: the training set the original model saw (Dataset or DataLoader; use
            eval transforms: every pass must see the same inputs).
        test_data: held-out data of all classes.
        original: the model before unlearning; enables accuracy deltas and CKA to it.
        retrained: a model retrained from scratch without the forget classes (the gold
            standard); enables CKA and k-NN agreement with it and the verdict. A list of
            such models (other seeds) gives the verdict its noise band: the first is the
            reference, the others (roles ``"retrained_2"``, ...) get the per-model metrics
            (accuracy, the MIAs, ZRF, the probes) only.
        metrics: any of :data:`METRICS`. Metrics that need a missing reference are
            skipped with a note.
        config: an :class:`EvalConfig` (defaults otherwise).
        device: run every model there (each is moved back afterwards); default: where each
            model's parameters already are.

    Returns:
        An :class:`UnlearningReport`; its ``notes`` list anything that was skipped and its
        ``verdict`` says whether the classes were forgotten (see :func:`verdict.judge`).

    Raises:
        EvaluationError (a ``ValueError``): empty or out-of-range ``forget_classes``,
            unknown metric names, models with different class counts, empty data.
        TypeError: a model that is not an ``nn.Module``, a config that is not an EvalConfig.
    """
    cfg = config if config is not None else EvalConfig()
    if not isinstance(cfg, EvalConfig):
        raise TypeError(f"config must be an EvalConfig, got {type(cfg).__name__}")
    names = check_metrics(metrics)
    if not isinstance(model, nn.Module):  # None included: the other roles are optional
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(retrained, (list, tuple)):
        if not retrained:
            raise EvaluationError("retrained= is an empty list; pass a model, a list of "
                                  "models (retrained seeds) or None")
        retrained, extra = retrained[0], list(retrained[1:])
    else:
        extra = []
    models = {role: m for role, m in zip(ROLES, (model, original, retrained), strict=True)
              if m is not None}
    seeds = [f"retrained_{i + 2}" for i in range(len(extra))]
    models.update(zip(seeds, extra, strict=True))
    for role, m in models.items():
        if not isinstance(m, nn.Module):
            raise TypeError(f"{role} must be a torch.nn.Module, got {type(m).__name__}")

    monitor = ResourceMonitor(device if device is not None else model_device(model)).start()
    with prepared_models(models, device):
        num_classes = _num_classes(models, test_data, cfg)
        forget = check_forget_classes(forget_classes, num_classes)
        for split, data in (("train_data", train_data), ("test_data", test_data)):
            _check_split_labels(data, num_classes, split)
        report = UnlearningReport(forget_classes=forget, num_classes=num_classes,
                                  models=[r for r in models if r not in seeds],
                                  metrics=list(names), config=cfg.to_dict(),
                                  retrained_seeds=seeds)
        run = _Run(models, forget, num_classes, train_data, test_data, cfg, report, monitor)
        for name in names:
            getattr(run, name)()
            monitor.lap(name)
        report.verdict = judge(report, run.retain_accuracy(), retain_drop=cfg.retain_drop,
                               seeds=seeds)
    report.resources = monitor.stop()
    return report


def _num_classes(models: dict[str, nn.Module], data: Dataset | DataLoader,
                 cfg: EvalConfig) -> int:
    """C of every model (they must agree): from ``num_classes``, the classifier, or a batch."""
    counts = {}
    batch = None
    for role, m in models.items():
        n = getattr(m, "num_classes", None)
        if not (isinstance(n, int) and n > 0):
            found = find_classifier(m, None, cfg.classifier)
            head = found[1] if found is not None else None
            n = getattr(head, "out_features", None) or getattr(head, "out_channels", None)
        if not (isinstance(n, int) and n > 0):  # ask the model itself
            if batch is None:
                batch = next(iter(ordered_loader(data, min(cfg.batch_size, 8))), None)
                if batch is None:
                    raise EvaluationError("the test data is empty")
            x, _ = split_batch(batch)
            with torch.no_grad():
                n = int(logits_of(m(x.to(model_device(m)))).shape[1])
        counts[role] = int(n)
    if len(set(counts.values())) > 1:
        raise EvaluationError(f"the models disagree on the number of classes: {counts}")
    return counts["model"]


def _check_split_labels(data: Dataset | DataLoader, num_classes: int, split: str) -> None:
    """Labels the dataset exposes must be class ids of the model (read without decoding
    images; other datasets are checked on the labels their batches carry, in ``_Run``)."""
    try:
        labels = raw_labels(data, decode=False)
    except TypeError:  # not a Dataset / DataLoader: left to the feature pass, as before
        return
    if labels is None:
        return
    if labels.numel() == 0:
        raise EvaluationError(f"{split} is empty")
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels.reshape(-1)
    check_labels(labels, num_classes, error=EvaluationError, name=f"the {split} labels")


class _Run:
    """State shared by the metrics of one ``evaluate`` call (one method per metric)."""

    def __init__(self, models: dict[str, nn.Module], forget: list[int], num_classes: int,
                 train_data: Dataset | DataLoader, test_data: Dataset | DataLoader,
                 cfg: EvalConfig, report: UnlearningReport, monitor: ResourceMonitor) -> None:
        self.models = models
        self.forget = forget
        self.C = num_classes
        self.train_data = train_data
        self.test_data = test_data
        self.cfg = cfg
        self.report = report
        self.monitor = monitor
        self.cache = FeatureCache(batch_size=cfg.batch_size, classifier=cfg.classifier,
                                  num_classes=num_classes, show_progress=cfg.show_progress)
        for role, m in models.items():
            self.cache.add_model(role, m)
        self.cache.add_split("train", train_data)
        self.cache.add_split("test", test_data)
        self._test_labels: torch.Tensor | None = None
        self._checked: set[str] = set()

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    def _get(self, role: str, split: str):
        """The cache's entry, its labels checked once per split (class ids 0..C-1)."""
        entry = self.cache.get(role, split)
        if split not in self._checked:
            bad = entry.labels[(entry.labels < 0) | (entry.labels >= self.C)]
            if bad.numel():
                raise EvaluationError(
                    f"the {split}_data labels hold {bad.numel()} value(s) outside "
                    f"0..{self.C - 1}: {sorted(set(bad.tolist()))[:10]}; expected integer "
                    f"class ids of the model's {self.C} classes")
            self._checked.add(split)
        return entry

    @property
    def test_labels(self) -> torch.Tensor:
        if self._test_labels is None:
            # the labels the batches carried (a target_transform applies), in dataset order
            self._test_labels = self._get("model", "test").labels
            if not bool(torch.isin(self._test_labels, torch.tensor(self.forget)).any()):
                self.note(f"the test data has no sample of the forget classes {self.forget}: "
                          "forget-class test metrics are undefined")
        return self._test_labels

    def _forget_mask(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.isin(labels, torch.tensor(self.forget, dtype=torch.long))

    def _features_or_note(self, role: str, metric: str) -> bool:
        # asks for the classifier only: no inference pass is spent on the check
        if self.cache.classifier(role) is None:
            self.note(f"{metric} skipped for {role}: no classifier layer found (its input is "
                      "the pooled feature vector); set EvalConfig(classifier='name')")
            return False
        return True

    # ------------------------------------------------------------------ metrics
    def accuracy(self) -> None:
        for role in self.models:
            tr, te = self._get(role, "train"), self._get(role, "test")
            self.report.accuracy[role] = accuracy_metrics(
                tr.logits, tr.labels, te.logits, te.labels, self.forget, self.C)
        if "original" in self.report.accuracy:
            ref = self.report.accuracy["original"]
            for role in ("model", "retrained"):
                if role in self.report.accuracy:
                    self.report.accuracy_deltas[role] = accuracy_deltas(
                        self.report.accuracy[role], ref)

    def mia(self) -> None:
        for role in self.models:
            tr, te = self._get(role, "train"), self._get(role, "test")
            mtr, mte = self._forget_mask(tr.labels), self._forget_mask(te.labels)
            self.report.mia[role] = membership_inference(
                per_sample_loss(tr.logits[mtr], tr.labels[mtr]),
                per_sample_loss(te.logits[mte], te.labels[mte]),
                folds=self.cfg.mia_folds, seed=self.cfg.seed)
            if math.isnan(self.report.mia[role].accuracy):
                self.note(f"MIA for {role}: too few forget-class samples for "
                          f"{self.cfg.mia_folds}-fold cross-validation")

    def probe(self) -> None:
        for role in self.models:
            if not self._features_or_note(role, "probe"):
                continue
            tr, te = self._get(role, "train"), self._get(role, "test")
            self.report.probe[role] = linear_probe(
                tr.features, tr.labels, te.features, te.labels, self.forget, self.C,
                epochs=self.cfg.probe_epochs, min_steps=self.cfg.probe_min_steps,
                lr=self.cfg.probe_lr,
                batch_size=self.cfg.probe_batch_size, weight_decay=self.cfg.probe_weight_decay,
                seed=self.cfg.seed, device=model_device(self.models[role]))

    def knn(self) -> None:
        if "retrained" not in self.models:
            self.note("knn skipped: it compares with a retrained model (pass retrained=)")
            return
        if not self._features_or_note("retrained", "knn"):
            return
        ref_tr = self.cache.features("retrained", "train")
        ref_te = self.cache.features("retrained", "test")
        queries = torch.tensor(class_indices(self.test_labels, self.forget), dtype=torch.long)
        for role in ("model", "original"):
            if role not in self.models or not self._features_or_note(role, "knn"):
                continue
            tr, te = self.cache.features(role, "train"), self.cache.features(role, "test")
            self.report.knn[pair_key(role, "retrained")] = knn_agreement(
                te[queries], tr, ref_te[queries], ref_tr, self.cfg.knn_k)

    def retain_accuracy(self) -> dict[str, float]:
        """Retain-class test accuracy per role, from the cached logits (the verdict's
        broken rule reads it whether or not the metric "accuracy" was requested)."""
        if self.report.accuracy:
            return {r: a.retain_test for r, a in self.report.accuracy.items()}
        retain = [c for c in range(self.C) if c not in self.forget]
        out = {}
        for role in self.models:
            te = self._get(role, "test")
            out[role] = class_set_accuracy(te.logits.argmax(1), te.labels, retain)
        return out

    def entropy_mia(self) -> None:
        for role in self.models:
            tr, te = self._get(role, "train"), self._get(role, "test")
            mtr = self._forget_mask(tr.labels)
            self.report.entropy_mia[role] = entropy_mia(tr.logits[~mtr], te.logits,
                                                        tr.logits[mtr])

    def zrf(self) -> None:
        from ..unlearning.request import reinitialised

        idx = class_indices(self._get("model", "train").labels, self.forget)
        if not idx:
            self.note("zrf skipped: no forget-class training samples")
            return
        # one random network of the model's architecture, the same for every role
        random_model, _ = reinitialised(plain_module(self.models["model"]), self.cfg.zrf_seed)
        random_model.eval()
        loader = subset_loader(self.train_data, idx, self.cfg.batch_size)
        device = model_device(random_model)
        outs = []
        with torch.no_grad():
            for batch in loader:
                x, _ = split_batch(batch)
                outs.append(logits_of(random_model(x.to(device))).float().cpu())
        random_logits = torch.cat(outs)
        rows = torch.tensor(idx, dtype=torch.long)
        for role in self.models:
            self.report.zrf[role] = zrf_score(self._get(role, "train").logits[rows],
                                              random_logits)

    def fewshot(self) -> None:
        for role in self.models:
            if not self._features_or_note(role, "fewshot"):
                continue
            tr, te = self._get(role, "train"), self._get(role, "test")
            self.report.fewshot[role] = fewshot_probe(
                tr.features, tr.labels, te.features, te.labels, self.forget, self.C,
                shots=self.cfg.fewshot_shots, draws=self.cfg.fewshot_draws,
                weight_decay=self.cfg.fewshot_weight_decay,
                max_iter=self.cfg.fewshot_max_iter, seed=self.cfg.seed)

    def relearn(self) -> None:
        idx = class_indices(self.test_labels, self.forget)
        if not idx:
            self.note("relearn skipped: no forget-class test samples to measure")
            return
        forget_test = subset_loader(self.test_data, idx, self.cfg.batch_size)
        for role in self.report.models:  # the extra retrained seeds: too costly here
            m = self.models[role]
            self.report.relearn[role] = relearn(
                m, self.train_data, forget_test,
                epochs=self.cfg.relearn_epochs, lr=self.cfg.relearn_lr,
                momentum=self.cfg.relearn_momentum, weight_decay=self.cfg.relearn_weight_decay,
                threshold=self.cfg.relearn_threshold,
                batch_size=self.cfg.relearn_batch_size or self.cfg.batch_size,
                eval_batch_size=self.cfg.batch_size, seed=self.cfg.seed,
                show_progress=self.cfg.show_progress, desc=f"relearn {role}")

    def erm(self) -> None:
        diag = erm_diagnostics(self.models["model"], self.forget)
        if diag is None:
            self.note("erm skipped: the model has no ERM mask (model.erm.G)")
        self.report.erm = diag

    def cka(self) -> None:
        pairs = [(a, b) for a, b in _CKA_PAIRS if a in self.models and b in self.models]
        if not pairs:
            self.note("cka skipped: it compares with original= and/or retrained=")
            return
        idx = class_indices(self.test_labels, self.forget)
        if len(idx) < 2:
            self.note("cka skipped: fewer than 2 forget-class test samples")
            return
        if len(idx) > self.cfg.cka_max_samples:  # seeded subsample, kept in dataset order
            gen = torch.Generator().manual_seed(self.cfg.seed)
            pick = torch.randperm(len(idx), generator=gen)[: self.cfg.cka_max_samples]
            idx = [idx[i] for i in sorted(pick.tolist())]
        roles = sorted({r for pair in pairs for r in pair}, key=ROLES.index)
        layers = self._cka_layers(roles, idx)
        grams: dict[str, dict[str, torch.Tensor]] = {r: {} for r in roles}
        if layers:
            loader = subset_loader(self.test_data, idx, self.cfg.batch_size)
            for role in roles:
                grams[role] = activation_grams(
                    plain_module(self.models[role]), layers[role], loader,
                    max_dim=self.cfg.cka_max_dim, show_progress=self.cfg.show_progress,
                    desc=f"cka {role}")
        pooled = all(self._features_or_note(r, "pooled CKA") for r in roles)
        if pooled:
            rows = torch.tensor(idx, dtype=torch.long)
            for role in roles:
                grams[role]["pooled"] = centered_gram(self.cache.features(role, "test")[rows])
        for a, b in pairs:
            names_a = [*(layers[a] if layers else []), *(["pooled"] if pooled else [])]
            names_b = [*(layers[b] if layers else []), *(["pooled"] if pooled else [])]
            if not names_a:
                continue
            self.report.cka[pair_key(a, b)] = CKAResult(
                reference=b, layers=names_a, reference_layers=names_b,
                values=[cka_from_grams(grams[a][na], grams[b][nb])
                        for na, nb in zip(names_a, names_b, strict=True)],
                n_samples=len(idx))

    def _cka_layers(self, roles: Sequence[str], idx: list[int]) -> dict[str, list[str]] | None:
        """Node names per role (paired by position), or None when fx cannot help."""
        explicit = self.cfg.cka_layers is not None
        example, _ = split_batch(next(iter(subset_loader(self.test_data, idx[:2], 2))))
        try:
            nodes = {r: activation_nodes(plain_module(self.models[r]), example, all_nodes=True)
                     for r in roles}
        except EvaluationError as err:
            if explicit:
                raise
            self.note(f"layer-wise CKA skipped (pooled features only): {err}")
            return None
        stages = {r: stage_names(plain_module(self.models[r])) for r in roles}
        if explicit:
            names = list(self.cfg.cka_layers or [])
            match_layers(names, nodes["model"], self.cfg.cka_max_layers, explicit=True,
                         which="evaluated")
        else:
            names = choose_layers(nodes["model"], self.cfg.cka_max_layers, stages["model"])
            if not names:
                self.note("layer-wise CKA skipped (pooled features only): the model has no "
                          "4-D activations")
                return None
        out = {"model": names}
        for role in roles:
            if role != "model":
                out[role] = match_layers(names, nodes[role], self.cfg.cka_max_layers,
                                         explicit=explicit, reference_stages=stages[role])
        if any(len(v) != len(names) for v in out.values()):
            self.note("layer-wise CKA skipped (pooled features only): the reference models "
                      "have no matching 4-D activations")
            return None
        return out
