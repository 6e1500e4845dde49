"""Evaluation suite: every metric on a case whose answer is known, then one real run.

The integration test at the end is the point of the suite: a model that only masks the
forget classes' logits scores 0% on them, yet the linear probe on its features still
recognises them, so head-only forgetting is caught.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import erm_surgery.evaluation as EV
from erm_surgery.data import load_digits8x8, make_loader, split_by_class
from erm_surgery.evaluation import EvalConfig, EvaluationError, UnlearningReport, evaluate
from erm_surgery.evaluation.features import FeatureCache
from erm_surgery.evaluation.files import atomic_write_text
from erm_surgery.evaluation.models import find_classifier, pool_classifier_input

pytestmark = pytest.mark.usefixtures("one_thread")

FORGET = [0, 1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- helpers


class Tiny(nn.Module):
    """conv -> global pool -> linear: the smallest model with pooled features."""

    def __init__(self, num_classes: int = 4, in_chans: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


class MaskLogits(nn.Module):
    """A fake "unlearned" model: the original with the forget classes' logits set to -inf.

    Forgetting through the head only: the features are untouched.
    """

    def __init__(self, model: nn.Module, classes: list[int], num_classes: int) -> None:
        super().__init__()
        self.model = model
        mask = torch.zeros(num_classes, dtype=torch.bool)
        mask[classes] = True
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).masked_fill(self.mask, float("-inf"))


class FakeERM(nn.Module):
    """Duck-typed attached model: ``.model``, ``.erm.G``, ``.erm.forgotten``."""

    def __init__(self, model: nn.Module, G: torch.Tensor, forgotten: list[int]) -> None:
        super().__init__()
        self.model = model
        self.erm = nn.Module()
        self.erm.G = nn.Parameter(G.clone())
        flags = torch.zeros(G.shape[0], dtype=torch.bool)
        flags[forgotten] = True
        self.erm.register_buffer("forgotten", flags)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def tiny_data(n: int = 40, num_classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g),
                         torch.arange(n) % num_classes)


# --------------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors():
    model, data = Tiny(), tiny_data()
    with pytest.raises(EvaluationError, match="forget_classes is empty"):
        evaluate(model, [], data, data)
    with pytest.raises(EvaluationError, match=r"out of range.*4 classes"):
        evaluate(model, [1, 7], data, data)
    with pytest.raises(EvaluationError, match=r"out of range"):
        evaluate(model, [-1], data, data)
    with pytest.raises(EvaluationError, match=r"unknown metric.*'acuracy'"):
        evaluate(model, [1], data, data, metrics=["acuracy"])
    with pytest.raises(EvaluationError, match="every class"):
        evaluate(model, [0, 1, 2, 3], data, data)
    with pytest.raises(EvaluationError, match="integer class ids"):
        evaluate(model, [1.0], data, data)
    with pytest.raises(EvaluationError, match="disagree on the number of classes"):
        evaluate(model, [1], data, data, original=Tiny(num_classes=5))
    with pytest.raises(EvaluationError, match="mia_folds"):
        EvalConfig(mia_folds=1)
    with pytest.raises(EvaluationError, match="relearn_threshold"):
        EvalConfig(relearn_threshold=50)
    with pytest.raises(TypeError, match="EvalConfig"):
        evaluate(model, [1], data, data, config={"batch_size": 8})
    with pytest.raises(TypeError, match="Dataset or DataLoader"):
        evaluate(model, [1], data, torch.zeros(3))
    # all errors are ValueErrors, like the rest of the library's
    assert issubclass(EvaluationError, ValueError)


# --------------------------------------------------------------------------- accuracy


def test_accuracy_known_answer():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 0, 2, 2, 2])
    acc = EV.per_class_accuracy(preds, labels, num_classes=4)
    assert acc[:3].tolist() == [0.5, 1.0, 0.75]
    assert math.isnan(acc[3])  # class 3 has no samples
    logits = F.one_hot(preds, 4).float()  # logits give the same answer as predictions
    assert torch.equal(EV.per_class_accuracy(logits, labels, 4)[:3], acc[:3])
    assert EV.class_set_accuracy(preds, labels, [0]) == 0.5
    assert EV.class_set_accuracy(preds, labels, [1, 2]) == 5 / 6  # sample-weighted
    assert math.isnan(EV.class_set_accuracy(preds, labels, [3]))

    res = EV.accuracy_metrics(logits, labels, logits[:4], labels[:4], [0], 4)
    assert (res.forget_train, res.retain_train) == (0.5, 5 / 6)
    assert (res.forget_test, res.retain_test) == (0.5, 1.0)
    ref = EV.accuracy_metrics(F.one_hot(labels, 4).float(), labels, F.one_hot(labels, 4).float(),
                              labels, [0], 4)
    delta = EV.accuracy_deltas(res, ref)
    assert delta["forget_train"] == pytest.approx(-0.5)
    assert delta["retain_test"] == pytest.approx(0.0)


# --------------------------------------------------------------------------- MIA


def test_mia_identical_losses_is_chance():
    g = torch.Generator().manual_seed(1)
    member = torch.rand(600, generator=g) * 2
    nonmember = torch.rand(600, generator=g) * 2
    res = EV.membership_inference(member, nonmember, folds=5, seed=0)
    assert abs(res.accuracy - 0.5) < 0.06
    assert res.folds == 5 and res.n_per_side == 600


def test_mia_separated_losses_is_perfect_and_balanced():
    g = torch.Generator().manual_seed(2)
    member = torch.rand(300, generator=g) * 0.1  # trained-on samples: low loss
    nonmember = 2 + torch.rand(500, generator=g)  # unseen samples: high loss
    res = EV.membership_inference(member, nonmember)
    assert res.accuracy > 0.99
    assert res.n_per_side == 300  # the larger side is subsampled to balance the classes


def test_mia_hard_masked_class_gives_chance_not_a_crash():
    # a logit set to -inf gives infinite loss on both sides: no signal, finite features
    logits = torch.zeros(20, 3)
    logits[:, 0] = float("-inf")
    loss = EV.per_sample_loss(logits, torch.zeros(20, dtype=torch.long))
    assert torch.isinf(loss).all()
    res = EV.membership_inference(loss[:10], loss[10:], folds=5)
    assert res.accuracy == pytest.approx(0.5)
    assert math.isinf(res.member_loss_mean)
    # too few samples for cross-validation: NaN, not an exception
    assert math.isnan(EV.membership_inference(loss[:1], loss[1:3]).accuracy)


# --------------------------------------------------------------------------- probe


def _clusters(n_per_class: int, num_classes: int, dim: int, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    centres = torch.eye(num_classes, dim) * 4
    return centres[labels] + 0.3 * torch.randn(len(labels), dim, generator=g), labels


def test_probe_separable_features_recover_the_forget_class():
    xtr, ytr = _clusters(50, 5, 16, seed=0)
    xte, yte = _clusters(20, 5, 16, seed=1)
    res = EV.linear_probe(xtr, ytr, xte, yte, [0], 5, epochs=15, seed=0)
    assert res.forget_acc == 1.0
    assert res.retain_acc == 1.0
    again = EV.linear_probe(xtr, ytr, xte, yte, [0], 5, epochs=15, seed=0)
    assert again == res  # deterministic for a fixed seed


def test_probe_features_without_the_forget_class_score_near_zero():
    xtr, ytr = _clusters(50, 5, 16, seed=0)
    xte, yte = _clusters(20, 5, 16, seed=1)
    # class 0 samples get the features of random retain classes: nothing to find
    for x, y, seed in ((xtr, ytr, 2), (xte, yte, 3)):
        g = torch.Generator().manual_seed(seed)
        idx = torch.nonzero(y == 0).flatten()
        donors = torch.nonzero(y != 0).flatten()
        x[idx] = x[donors[torch.randint(len(donors), (len(idx),), generator=g)]]
    res = EV.linear_probe(xtr, ytr, xte, yte, [0], 5, epochs=15, seed=0)
    assert res.forget_acc < 0.3  # chance among the 5 classes is 0.2; at most that
    assert res.retain_acc > 0.7


# --------------------------------------------------------------------------- CKA


def test_cka_known_answers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 20, generator=g, dtype=torch.float64)
    assert EV.linear_cka(x, x) == pytest.approx(1.0, abs=1e-10)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    assert EV.linear_cka(x, 3.7 * x @ q) == pytest.approx(1.0, abs=1e-10)  # rotation + scale
    assert EV.linear_cka(x, x + 5.0) == pytest.approx(1.0, abs=1e-10)  # centring: shift-free
    independent = torch.randn(3000, 8, generator=g), torch.randn(3000, 8, generator=g)
    assert EV.linear_cka(*independent) < 0.02
    # not invariant to an anisotropic rescaling (the property that sets CKA apart from CCA)
    assert EV.linear_cka(x, x * torch.linspace(0.01, 10, 20, dtype=torch.float64)) < 0.99
    # the Gram form (used across models) equals the feature form, also for 4-D maps
    maps = torch.randn(30, 4, 5, 5, generator=g)
    other = maps * 2 + 0.5 * torch.randn(30, 4, 5, 5, generator=g)
    via_grams = EV.cka_from_grams(EV.centered_gram(maps), EV.centered_gram(other))
    assert via_grams == pytest.approx(EV.linear_cka(maps, other), abs=1e-10)
    assert math.isnan(EV.linear_cka(torch.ones(10, 3), x[:10]))  # constant: undefined
    with pytest.raises(ValueError, match="same inputs"):
        EV.linear_cka(x, x[:10])


def test_choose_layers_picks_stage_outputs():
    resnet = ["conv1", "bn1", "relu", "maxpool"] + [
        f"layer{i}.{b}.{op}" for i in range(1, 5) for b in range(2)
        for op in ("conv1", "bn1", "relu", "conv2", "bn2", "add", "relu_1")]
    assert EV.choose_layers(resnet) == [f"layer{i}.1.relu_1" for i in range(1, 5)]
    # ConvNeXt: "stem" and "stages" at depth 1 are too few, depth 2 has the stages
    convnext = ["stem.0", "stem.1"] + [f"stages.{s}.blocks.{b}.conv_dw"
                                       for s in range(4) for b in range(3)]
    assert EV.choose_layers(convnext) == [f"stages.{s}.blocks.2.conv_dw" for s in range(4)]
    # a head's 4-D nodes (timm ConvNeXt's norm on the pooled map) are not a stage
    assert EV.choose_layers(convnext + ["head.norm.permute", "head.norm.permute_1"]) == [
        f"stages.{s}.blocks.2.conv_dw" for s in range(4)]
    # flat VGG-like features: evenly spaced nodes, first and last included
    flat = [f"features.{i}" for i in range(20)]
    assert EV.choose_layers(flat, max_layers=4) == ["features.0", "features.6", "features.13",
                                                    "features.19"]
    # timm's declared stages win when the graph has them (module prefixes are fine)
    assert EV.choose_layers(resnet, stages=["maxpool", "layer2", "layer4", "nope"]) == [
        "maxpool", "layer2", "layer4"]
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    assert EV.stage_names(model) == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert EV.stage_names(MaskLogits(model, [0], 10))[0] == "model.act1"  # wrapper prefix
    assert EV.stage_names(Tiny()) is None


# --------------------------------------------------------------------------- k-NN


def test_knn_agreement_known_answers():
    g = torch.Generator().manual_seed(0)
    keys, queries = torch.randn(200, 16, generator=g), torch.randn(30, 16, generator=g)
    same = EV.knn_agreement(queries, keys, queries, keys, k=5)
    assert same.agreement == 1.0 and same.k == 5 and same.n_queries == 30
    # a rotation preserves cosine similarity, so retrieval is unchanged
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert EV.knn_agreement(queries, keys, queries @ q, keys @ q, k=5).agreement == 1.0
    # unrelated features: about k / n_keys = 0.025 shared neighbours
    unrelated = EV.knn_agreement(queries, keys, torch.randn(30, 16, generator=g),
                                 torch.randn(200, 16, generator=g), k=5)
    assert unrelated.agreement < 0.15
    # each query's nearest key is itself a copy of it: top-1 is known exactly
    top1 = EV.knn_indices(keys[:10] + 1e-4, keys, k=1)
    assert top1.flatten().tolist() == list(range(10))


# --------------------------------------------------------------------------- ERM


def test_erm_diagnostics_known_answer():
    G = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.4], [0.0, 0.0, 0.0]])
    model = FakeERM(Tiny(num_classes=3), G, forgotten=[2])
    d = EV.erm_diagnostics(model, [2])
    assert d is not None
    assert d.csi == pytest.approx(0.0)  # disjoint rows
    assert d.l1_density == pytest.approx(2.4 / 9)
    assert d.ones_per_row == pytest.approx(2 / 3)
    assert d.zero_rows == [2] and d.forgotten == [2] and d.forget_rows_zero
    assert d.shape == (3, 3)
    assert EV.erm_diagnostics(model, [1]).forget_rows_zero is False
    assert EV.erm_diagnostics(Tiny(), [1]) is None
    assert "G" not in UnlearningReport([2], 3, ["model"], ["erm"], erm=d).to_dict()["erm"]


# --------------------------------------------------------------------------- features


def test_feature_cache_one_pass_and_classifier_input():
    model, data = Tiny(), tiny_data(24)
    model.eval()
    cache = FeatureCache(batch_size=10, num_classes=4)
    cache.add_model("model", model)
    cache.add_split("test", DataLoader(data, batch_size=7, shuffle=True))  # order restored
    out = cache.get("model", "test")
    cache.get("model", "test")
    assert cache.passes == 1
    x, y = data.tensors
    with torch.no_grad():
        pooled = model.pool(model.act(model.conv(x))).flatten(1)
        assert torch.allclose(out.features, pooled, atol=1e-6)
        assert torch.allclose(out.logits, model(x), atol=1e-6)
    assert torch.equal(out.labels, y)


def test_find_classifier_conv_head_and_pooling():
    squeeze_like = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 1),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
    name, head = find_classifier(squeeze_like, num_classes=5)
    assert name == "2" and isinstance(head, nn.Conv2d)
    fmap = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(2, 6, 2, 2)
    assert torch.equal(pool_classifier_input(fmap, head), fmap.mean(dim=(2, 3)))
    wrapped = MaskLogits(Tiny(), [0], 4)  # a wrapper: the inner model's head
    assert find_classifier(wrapped, 4)[0] == "model.fc"
    assert find_classifier(Tiny(), 4, name="conv")[0] == "conv"
    with pytest.raises(EvaluationError, match="not a submodule"):
        find_classifier(Tiny(), 4, name="head.fc")


def test_evaluate_restores_mode_and_reports_skips():
    model, data = Tiny(), tiny_data(40)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = evaluate(model, [1], data, data, metrics=["accuracy", "knn", "cka", "erm",
                                                       "relearn"],
                      config=EvalConfig(relearn_epochs=1, batch_size=16), device="cpu")
    assert model.training and model.conv.training  # mode restored
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # relearn used a copy
    notes = " ".join(report.notes)
    assert "knn skipped" in notes and "cka skipped" in notes and "erm skipped" in notes
    assert report.resources is not None and report.resources.wall_time_s > 0
    assert set(report.resources.metric_seconds) == {"accuracy", "knn", "cka", "erm", "relearn"}
    with pytest.raises(EvaluationError, match="not found in the evaluated model"):
        evaluate(model, [1], data, data, original=Tiny(), metrics=["cka"],
                 config=EvalConfig(cka_layers=["no_such_node"]))


def test_relearn_known_answers():
    model, data = Tiny(), tiny_data(40)
    with torch.no_grad():  # a model that predicts class 1 for everything
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))
    forget_test = torch.utils.data.Subset(data, list(range(1, 40, 4)))  # class-1 samples
    done = EV.relearn(model, data, forget_test, epochs=3, threshold=0.5)
    assert done.epochs_to_threshold == 0 and done.curve == [1.0]  # already there: no training
    never = EV.relearn(MaskLogits(model, [1], 4), data, forget_test, epochs=2, threshold=0.5)
    assert never.epochs_to_threshold is None and never.curve == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- report files


def test_report_serialisation_and_atomic_save(tmp_path):
    report = UnlearningReport(forget_classes=[0], num_classes=2, models=["model"],
                              metrics=["accuracy"])
    report.accuracy["model"] = EV.AccuracyResult(0.0, math.nan, 1.0, 1.0, [0.0, 1.0],
                                                 [math.nan, 1.0])
    data = json.loads(report.to_json())  # strict JSON: NaN became null
    assert data["accuracy"]["model"]["forget_test"] is None
    assert "| Forget acc (test) | n/a |" in report.to_markdown()
    written = report.save(tmp_path / "r")
    assert {"report.json", "report.md", "report.html", "per_class_accuracy.png"} <= set(written)
    assert (tmp_path / "r" / "per_class_accuracy.png").read_bytes().startswith(PNG_MAGIC)
    assert not [p for p in os.listdir(tmp_path / "r") if p.endswith(".tmp")]
    # an interrupted write leaves the previous file whole
    target = tmp_path / "r" / "report.md"
    old = target.read_text()

    class Boom(str):
        def encode(self, *args, **kwargs):  # fails before anything is written
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_text(target, Boom("new"))
    assert target.read_text() == old


# --------------------------------------------------------------------------- integration


def _train(model: nn.Module, data, steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    loader = make_loader(data, batch_size=64, shuffle=True, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    step = 0
    while step < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return model.eval()


@pytest.fixture(scope="module")
def digits_models():
    train, test = load_digits8x8(n_train=1400, size=16, seed=0)
    torch.manual_seed(0)
    original = _train(timm.create_model("test_resnet", num_classes=10, in_chans=1),
                      train, steps=150, seed=0)
    retain_train, _ = split_by_class(train, FORGET)
    torch.manual_seed(1)
    retrained = _train(timm.create_model("test_resnet", num_classes=10, in_chans=1),
                       retain_train, steps=80, seed=1)
    return train, test, original, retrained


def test_head_only_forgetting_is_caught_by_the_probe(digits_models, tmp_path, monkeypatch):
    train, test, original, retrained = digits_models
    G = (torch.rand(10, 96, generator=torch.Generator().manual_seed(0)) > 0.8).float()
    G[FORGET] = 0.0
    # head-only forgetting, dressed as an attached ERM model to exercise the diagnostics
    fake = FakeERM(MaskLogits(original, FORGET, 10), G, forgotten=FORGET)

    passes: list[tuple[str, str]] = []
    extract = FeatureCache._extract

    def counting(self, role, split):
        passes.append((role, split))
        return extract(self, role, split)

    monkeypatch.setattr(FeatureCache, "_extract", counting)
    shuffled_train = DataLoader(train, batch_size=128, shuffle=True)  # order must not matter
    report = evaluate(fake, FORGET, shuffled_train, test, original=original,
                      retrained=retrained,
                      config=EvalConfig(probe_epochs=10, relearn_epochs=1, batch_size=512,
                                        fewshot_shots=(5, 10), fewshot_draws=2))

    # one inference pass per model per split, shared by accuracy, MIA, probe, CKA, k-NN
    assert sorted(passes) == sorted({(r, s) for r in ("model", "original", "retrained")
                                     for s in ("train", "test")})
    acc = report.accuracy
    assert acc["model"].forget_test == 0.0 and acc["model"].forget_train == 0.0
    assert acc["original"].forget_test > 0.9
    # masking forget logits can only turn retain mistakes (predicted as a forget class) right
    assert acc["model"].retain_test >= acc["original"].retain_test > 0.9
    assert report.accuracy_deltas["model"]["forget_test"] == -acc["original"].forget_test
    # the whole point: the features still know the forgotten classes
    assert report.probe["model"].forget_acc > 0.9
    assert report.probe["model"].forget_acc == report.probe["original"].forget_acc
    assert report.mia["model"].accuracy == pytest.approx(0.5)  # infinite losses: no signal
    same = report.cka["model~original"]
    assert same.layers[-1] == "pooled" and len(same.layers) >= 4
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in same.values)
    assert report.cka["model~retrained"].values == pytest.approx(
        report.cka["retrained~original"].values)
    assert report.knn["model~retrained"].agreement == report.knn["original~retrained"].agreement
    assert report.relearn["model"].epochs_to_threshold is None  # a hard mask never relearns
    assert report.relearn["original"].epochs_to_threshold == 0
    assert report.erm is not None and report.erm.zero_rows == FORGET
    # the few-shot probe sees what the logits hide: the verdict never calls the fake forgotten
    assert report.fewshot["model"].mean == report.fewshot["original"].mean
    assert report.verdict is not None and report.verdict.status != "forgotten"
    assert report.zrf["model"].score > report.zrf["original"].score  # ZRF is fooled

    written = report.save(tmp_path / "report")
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["forget_classes"] == FORGET
    assert data["probe"]["model"]["forget_acc"] > 0.9
    assert data["relearn"]["model"]["epochs_to_threshold"] is None
    assert data["verdict"]["status"] == report.verdict.status
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| Probe acc, forget classes (KR) |" in md and "![mia](mia.png)" in md
    pngs = {"erm_mask", "per_class_accuracy", "cka_by_layer", "relearn_curves", "mia"}
    for name in pngs:
        assert (tmp_path / "report" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs)
    assert set(written) == {f"{n}.png" for n in pngs} | {"report.json", "report.md",
                                                          "report.html"}
