"""The verdict, the few-shot probe and the field's logit-only diagnostics (entropy MIA, ZRF).

The calibration test at the end is the point: on the 8x8 digits, the verdict calls the
original and a "logit-only" fake (head rows blocked, the original's features) "not
forgotten" and a model retrained without the classes "forgotten", while the logit-only
diagnostics are fooled by the fake.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import erm_surgery as E
from erm_surgery.evaluation import (
    EvalConfig,
    EvaluationError,
    FewShotResult,
    UnlearningReport,
    entropy_mia,
    evaluate,
    fewshot_probe,
    js_divergence,
    judge,
    logit_only,
    output_entropy,
    zrf_score,
)
from erm_surgery.evaluation.features import FeatureCache
from erm_surgery.evaluation.verdict import CALIBRATED

pytestmark = pytest.mark.usefixtures("one_thread")

FORGET = [4, 9]  # the digits teacher's recorded classes (any two would do)


# ----------------------------------------------------------------- few-shot probe


def _clusters(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 4
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def test_fewshot_probe_needs_one_shot_on_features_that_separate_the_class():
    xtr, ytr = _clusters(30, 4, 8, 0.5, seed=0)
    xte, yte = _clusters(20, 4, 8, 0.5, seed=1)
    res = fewshot_probe(xtr, ytr, xte, yte, [3], 4, shots=(5, 1), draws=3)
    assert res.shots == [1, 5]  # sorted
    assert res.mean[0] > 0.9 and res.mean[1] > 0.9
    assert res.retain_acc[0] > 0.95
    assert len(res.draws[0]) == 3 and res.ci_low[0] <= res.mean[0] <= res.ci_high[0]
    assert res.at(5) == res.mean[1] and math.isnan(res.at(7))


def test_fewshot_probe_scores_low_when_the_features_do_not_hold_the_class():
    # class 3's features are those of class 2: no head can tell them apart from k samples
    xtr, ytr = _clusters(30, 4, 8, 0.5, seed=0)
    xte, yte = _clusters(20, 4, 8, 0.5, seed=1)
    xtr[ytr == 3], xte[yte == 3] = xtr[ytr == 2], xte[yte == 2]
    res = fewshot_probe(xtr, ytr, xte, yte, [3], 4, shots=(1, 5), draws=3)
    assert res.mean[0] < 0.35 and res.mean[1] < 0.5


def test_fewshot_probe_draws_are_seeded_and_shared_by_every_model():
    xtr, ytr = _clusters(30, 4, 8, 2.0, seed=0)
    xte, yte = _clusters(20, 4, 8, 2.0, seed=1)
    a = fewshot_probe(xtr, ytr, xte, yte, [3], 4, shots=(1,), draws=4, seed=3)
    b = fewshot_probe(xtr, ytr, xte, yte, [3], 4, shots=(1,), draws=4, seed=3)
    c = fewshot_probe(xtr, ytr, xte, yte, [3], 4, shots=(1,), draws=4, seed=4)
    assert a.draws == b.draws
    assert a.draws != c.draws  # another seed, other samples
    with pytest.raises(EvaluationError, match="needs 31 training samples of forget class 3"):
        fewshot_probe(xtr, ytr, xte, yte, [3], 4, shots=(31,), draws=2)
    with pytest.raises(EvaluationError, match="shots"):
        fewshot_probe(xtr, ytr, xte, yte, [3], 4, shots=(0,), draws=2)


# ----------------------------------------------------------------- entropy MIA, ZRF


def test_entropy_and_js_known_answers():
    uniform = torch.zeros(3, 5)
    assert torch.allclose(output_entropy(uniform),
                          torch.full((3,), math.log(5), dtype=torch.float64))
    blocked = torch.tensor([[0.0, 0.0, float("-inf")]])  # 0 log 0 = 0, not NaN
    assert output_entropy(blocked).item() == pytest.approx(math.log(2))
    onehot = torch.tensor([[1e4, 0.0]])
    # JS(one-hot, uniform over 2) = 0.5 KL(p||m) + 0.5 KL(q||m), m = (0.75, 0.25)
    expect = 0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2))
    assert js_divergence(onehot, torch.zeros(1, 2)).item() == pytest.approx(expect)
    assert zrf_score(uniform, uniform).score == pytest.approx(1.0)
    assert zrf_score(torch.zeros(0, 5), torch.zeros(0, 5)).n_samples == 0
    with pytest.raises(ValueError, match="same samples"):
        zrf_score(uniform, torch.zeros(2, 5))


def test_entropy_mia_calls_confident_forget_samples_members():
    g = torch.Generator().manual_seed(0)
    confident = torch.randn(60, 5, generator=g) + torch.tensor([12.0, 0, 0, 0, 0])
    unsure = torch.randn(60, 5, generator=g) * 0.1
    members_like = entropy_mia(confident, unsure, confident[:20])
    assert members_like.member_fraction == 1.0 and members_like.n_forget == 20
    nonmembers_like = entropy_mia(confident, unsure, unsure[:20])
    assert nonmembers_like.member_fraction == 0.0
    assert math.isnan(entropy_mia(confident, unsure, torch.zeros(0, 5)).member_fraction)


# ----------------------------------------------------------------- the verdict's rules


def _fewshot(mean5: float, hw: float = 0.01) -> FewShotResult:
    return FewShotResult(shots=[5], mean=[mean5], ci_low=[mean5 - hw], ci_high=[mean5 + hw],
                         draws=[[mean5]], retain_acc=[0.9])


def _report(model: float, original: float | None, retrained: list[float]) -> UnlearningReport:
    roles = ["model", *(["original"] if original is not None else []),
             *(["retrained"] if retrained else [])]
    seeds = [f"retrained_{i + 2}" for i in range(max(len(retrained) - 1, 0))]
    rep = UnlearningReport(forget_classes=[0], num_classes=3, models=roles,
                           metrics=["fewshot"], retrained_seeds=seeds)
    rep.fewshot["model"] = _fewshot(model)
    if original is not None:
        rep.fewshot["original"] = _fewshot(original)
    for role, value in zip(["retrained", *seeds][:len(retrained)], retrained, strict=True):
        rep.fewshot[role] = _fewshot(value)
    return rep


FINE = {"model": 0.9, "original": 0.9, "retrained": 0.9}


@pytest.mark.parametrize("model, status, words", [
    (0.30, "forgotten", "like the retrained reference"),
    (0.20, "forgotten", "like the retrained reference"),  # beyond the reference: forgotten
    (0.81, "not forgotten", "not distinguishable from the original"),
    (0.55, "not forgotten", "part of the way"),
])
def test_judge_places_the_model_between_original_and_retrained(model, status, words):
    rep = _report(model, 0.8, [0.3, 0.34])
    v = judge(rep, FINE, seeds=rep.retrained_seeds)
    assert v.status == status and words in v.reason
    pos = next(p for p in v.metrics if p.name == "fewshot@5")
    assert pos.calibrated and pos.band == pytest.approx(0.04)  # the seeds' spread
    assert pos.position == pytest.approx((model - 0.8) / (0.3 - 0.8))


def test_judge_inconclusive_and_broken():
    assert judge(_report(0.3, 0.8, []), FINE).status == "inconclusive"
    v = judge(_report(0.3, None, [0.3]), FINE)
    assert v.status == "inconclusive" and "original" in v.reason
    # the retrained seeds disagree by more than a third of the gap: nothing is separable
    rep = _report(0.3, 0.8, [0.3, 0.5])
    v = judge(rep, FINE, seeds=rep.retrained_seeds)
    assert v.status == "inconclusive" and "too close" in v.reason
    v = judge(_report(0.3, 0.8, [0.3]), {**FINE, "model": 0.79})
    assert v.status == "broken" and "79.0%" in v.reason and "90.0%" in v.reason
    assert judge(_report(0.3, 0.8, [0.3]), {**FINE, "model": 0.81}).status == "forgotten"
    assert judge(_report(0.3, 0.8, [0.3]), {**FINE, "model": 0.81},
                 retain_drop=0.05).status == "broken"


def test_eval_config_checks_the_new_fields():
    with pytest.raises(EvaluationError, match="fewshot_draws must be an int >= 2"):
        EvalConfig(fewshot_draws=1)
    with pytest.raises(EvaluationError, match="fewshot_shots"):
        EvalConfig(fewshot_shots=(0, 5))
    with pytest.raises(EvaluationError, match="retain_drop"):
        EvalConfig(retain_drop=10)
    assert EvalConfig(fewshot_shots=5).fewshot_shots == (5,)


# ----------------------------------------------------------------- calibration on digits


def test_logit_only_blocks_the_head_and_keeps_the_features(digits_teacher):
    teacher = digits_teacher.model
    fake = logit_only(teacher, FORGET)
    cache = FeatureCache(num_classes=10)
    cache.add_model("teacher", teacher)
    cache.add_model("fake", fake)
    cache.add_split("test", digits_teacher.test)
    real, blocked = cache.get("teacher", "test"), cache.get("fake", "test")
    assert torch.equal(real.features, blocked.features)
    assert not torch.isin(blocked.logits.argmax(1), torch.tensor(FORGET)).any()
    retain = ~torch.isin(real.labels, torch.tensor(FORGET))
    assert torch.isfinite(blocked.logits).all()
    # the retain classes' logits are the teacher's
    keep = [c for c in range(10) if c not in FORGET]
    assert torch.equal(real.logits[retain][:, keep], blocked.logits[retain][:, keep])
    with pytest.raises(EvaluationError, match=r"unknown class ids \[10\]"):
        logit_only(teacher, [10])


@pytest.fixture(scope="module")
def digits_retrained(_digits_master):
    """Two models retrained without FORGET (seeds 1, 2), 4 epochs each (a few seconds).

    ``retrain`` works on a deep copy, so the session's teacher is only read."""
    master = _digits_master
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in (1, 2):
            out.append(E.unlearn(master.model, FORGET, master.train, method="retrain",
                                 epochs=4, seed=seed, show_progress=False).eval())
    return out


def test_verdict_calibration_original_and_logit_only_not_forgotten_retrained_forgotten(
        digits_teacher, digits_retrained, tmp_path):
    teacher, train, test = digits_teacher.model, digits_teacher.train, digits_teacher.test
    r1, r2 = digits_retrained
    fake = logit_only(teacher, FORGET)
    # the calibrated k only (5 draws: fewer widen the t interval too much to separate)
    cfg = EvalConfig(fewshot_shots=(5,), fewshot_draws=5)
    metrics = ["accuracy", "entropy_mia", "fewshot"]

    def verdict_of(model, refs):
        return evaluate(model, FORGET, train, test, original=teacher, retrained=refs,
                        metrics=metrics, config=cfg)

    rep_a = verdict_of(teacher, [r1, r2])
    rep_b = verdict_of(fake, [r1, r2])
    rep_c = verdict_of(r1, [r2])  # (c) against another seed's retraining
    assert rep_a.verdict.status == "not forgotten", rep_a.verdict.reason
    assert rep_b.verdict.status == "not forgotten", rep_b.verdict.reason
    assert rep_c.verdict.status == "forgotten", rep_c.verdict.reason
    assert "not distinguishable from the original" in rep_b.verdict.reason

    calls_b = {p.name: p for p in rep_b.verdict.metrics}
    # the fake hides the class from everything that reads the logits...
    assert rep_b.accuracy["model"].forget_test == 0.0
    assert calls_b["forget_acc"].call == "like retrained"
    assert calls_b["entropy_mia"].position > calls_b["fewshot@5"].position + 0.5
    # ...and those metrics are diagnostics: the verdict rests on the calibrated ones only
    assert not calls_b["entropy_mia"].calibrated and not calls_b["forget_acc"].calibrated
    assert {p.name for p in rep_b.verdict.metrics if p.calibrated} == set(CALIBRATED)
    assert rep_a.verdict.metrics[0].band >= abs(
        rep_a.verdict.metrics[0].retrained - rep_a.verdict.metrics[0].retrained_seeds[0])
    assert "retrained_2" in rep_a.fewshot and "retrained_2" not in rep_a.models

    # the report leads with the verdict, in every format, and stays strict JSON
    rep_b.save(tmp_path, plots=False)
    md = (tmp_path / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## Summary")
    assert "**NOT FORGOTTEN**" in md and "| fewshot@5 | verdict |" in md
    html = (tmp_path / "report.html").read_text()
    assert html.index("<h2>Verdict</h2>") < html.index("<h2>Summary</h2>")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["verdict"]["status"] == "not forgotten"
    assert data["fewshot"]["retrained_2"]["shots"] == [5]


def test_verdict_inconclusive_without_reference_and_broken_when_retain_collapses(
        digits_teacher):
    teacher, train, test = digits_teacher.model, digits_teacher.train, digits_teacher.test
    cfg = EvalConfig(fewshot_shots=(5,), fewshot_draws=2)
    alone = evaluate(teacher, FORGET, train, test, original=teacher, metrics=["fewshot"],
                     config=cfg)
    assert alone.verdict.status == "inconclusive"
    assert "no retrained reference" in alone.verdict.reason
    # every retain class blocked: retain accuracy collapses to 0
    collapsed = logit_only(teacher, [c for c in range(10) if c not in FORGET])
    broken = evaluate(collapsed, FORGET, train, test, original=teacher, retrained=teacher,
                      metrics=["accuracy"], config=cfg)
    assert broken.verdict.status == "broken"
    assert broken.verdict.retain_acc["model"] == 0.0
    assert "retain accuracy collapsed" in broken.verdict.line()


def test_evaluate_refuses_an_empty_list_of_references(digits_teacher):
    with pytest.raises(EvaluationError, match="retrained= is an empty list"):
        evaluate(digits_teacher.model, FORGET, digits_teacher.train, digits_teacher.test,
                 retrained=[], metrics=["accuracy"])


def test_zrf_and_entropy_mia_inside_evaluate_read_the_same_samples(digits_teacher):
    teacher, train, test = digits_teacher.model, digits_teacher.train, digits_teacher.test
    rep = evaluate(teacher, FORGET, train, test, metrics=["entropy_mia", "zrf"])
    n_forget = int(torch.isin(torch.as_tensor([y for _, y in train]), torch.tensor(FORGET)).sum())
    assert rep.zrf["model"].n_samples == n_forget == rep.entropy_mia["model"].n_forget
    assert rep.entropy_mia["model"].n_members == len(train) - n_forget
    # a trained model is confident where a random one is not: ZRF well below 1
    assert rep.zrf["model"].score < 0.8


def test_logit_only_needs_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        logit_only("model", [0])
    with pytest.raises(EvaluationError, match="no classifier"):
        logit_only(nn.Sequential(nn.ReLU()), [0])
