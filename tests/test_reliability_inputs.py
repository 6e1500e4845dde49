"""Issue 15, part B: numbers that are not numbers, labels that are not class ids, empty
data, and the state left behind by an error (teacher mode, resumed runs).

Every model is timm's ``test_resnet`` (10 classes, 1 channel, 32x32) on a few dozen random
images, trained for one epoch at batch 16.
"""

import copy
import os

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import separated, state, unchanged
from torch.utils.data import DataLoader, Dataset, TensorDataset

import erm_surgery as E
from erm_surgery.data import check_class_ids, check_labels
from erm_surgery.errors import TrainingError
from erm_surgery.training.trainer import NonFiniteWatch
from erm_surgery.unlearning.request import labels_of

pytestmark = [pytest.mark.filterwarnings("ignore:knowledge entanglement"),
              pytest.mark.usefixtures("one_thread")]

FIT = dict(epochs=1, batch_size=16, show_progress=False)
KTP = dict(epochs=1, batch_size=16, show_progress=False)


def tiny(num_classes=10):
    return E.attach(timm.create_model("test_resnet", num_classes=num_classes, in_chans=1))


def data(n=48, y=None, x=None, num_classes=10):
    x = torch.randn(n, 1, 32, 32) if x is None else x
    y = torch.arange(n) % num_classes if y is None else y
    return TensorDataset(x, y)


class NoFastLabels(Dataset):
    """Labels only by decoding each sample (no ``.targets``, not a TensorDataset)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


def same(model, before) -> bool:
    """``unchanged`` for tensors that may hold NaN (NaN == NaN here)."""
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        torch.allclose(after[k].double(), before[k].double(), rtol=0, atol=0, equal_nan=True)
        for k in before)


@pytest.fixture(scope="module")
def trained(one_thread):
    """One tiny trained teacher (with an ERM epoch) for the unlearning tests."""
    torch.manual_seed(0)
    model = tiny()
    E.train(model, data(64), epochs=2, batch_size=16, show_progress=False,
            config=E.ERMConfig(warmup_epochs=0))
    return separated(model)  # two epochs do not separate the classes; KTP would refuse


# ----------------------------------------------------------------- 1. non-finite numbers


def test_a_nan_pixel_stops_training_naming_the_epoch_and_batches():
    x = torch.randn(48, 1, 32, 32)
    x[20, 0, 5, 5] = float("nan")  # the second of three batches (no shuffle needed)
    with pytest.raises(TrainingError, match=r"NaN or Inf in epoch 1, batches 1-3.*inputs"):
        E.train(tiny(), data(x=x), **FIT)


def test_the_non_finite_flag_is_read_on_the_host_once_every_n_batches():
    watch = NonFiniteWatch("cpu", "demo", TrainingError, every=4)
    watch.start(0)
    watch.update(torch.tensor(float("inf")))
    for _ in range(2):
        watch.update(torch.tensor(1.0))  # no host look yet: no error
    with pytest.raises(TrainingError, match="epoch 1, batches 1-4"):
        watch.update(torch.tensor(1.0))
    ok = NonFiniteWatch("cpu", "demo", TrainingError, every=4)
    ok.start(2)
    for _ in range(6):
        ok.update(torch.tensor(0.5))
    ok.check()  # finite: nothing raised, the window moves on
    assert ok.checked == 6


@pytest.mark.parametrize("kwargs", [dict(lr=float("nan")), dict(lr=float("inf")),
                                    dict(weight_decay=float("nan"))])
def test_non_finite_lr_or_weight_decay_is_refused_up_front(kwargs):
    model = tiny()
    before = state(model)
    with pytest.raises(ValueError, match="must be a finite number"):
        E.train(model, data(), **FIT, **kwargs)
    assert unchanged(model, before)


@pytest.mark.parametrize("where", ["G row", "head weight"])
def test_unlearning_refuses_a_model_with_non_finite_g_or_head(trained, where):
    model = copy.deepcopy(trained)
    with torch.no_grad():
        if where == "G row":
            model.erm.G[3] = float("nan")  # before: "prohibited 0 channels"
        else:
            model.model.get_submodule(model.surgery.head).weight[0, 0] = float("inf")
    before = state(model)
    for method in ("ktp", "finetune"):
        with pytest.raises(E.UnlearningError, match="NaN or Inf"):
            E.unlearn(model, [3], data(), method=method, epochs=1, show_progress=False)
    assert same(model, before)


def test_a_non_finite_ktp_distillation_is_an_error_and_the_teacher_is_restored(trained):
    teacher = copy.deepcopy(trained).train()
    before = state(teacher)
    with pytest.raises(ValueError, match="lr must be > 0 and finite"):  # refused up front
        E.unlearn(teacher, [3], data(), lr=float("inf"), **KTP)
    bad = data()
    bad.tensors[0][5, 0, 3, 3] = float("nan")  # one NaN pixel: the loss turns NaN
    with pytest.raises(E.UnlearningError, match="KTP distillation: the loss became NaN"):
        E.unlearn(teacher, [3], bad, **KTP)
    assert teacher.training and unchanged(teacher, before)


# ----------------------------------------------------------------- 2. the exact guarantee


def test_forgotten_class_on_finite_and_on_nan_inputs(trained):
    """FAQ: a forgotten class is never predicted for an input whose logits are finite; a
    NaN input gives NaN logits for every class and argmax returns index 0, forgotten or
    not. This test documents both halves."""
    student = E.unlearn(trained, [0], data(), **KTP)
    student.eval()
    with torch.no_grad():
        finite = student(torch.randn(64, 1, 32, 32) * 5)
        nan = student(torch.full((2, 1, 32, 32), float("nan")))
    assert torch.isfinite(finite).all() and (finite.argmax(1) != 0).all()
    assert torch.isnan(nan).all()
    assert nan.argmax(1).tolist() == [0, 0]  # the forgotten class "wins" on NaN


# ----------------------------------------------------------------- 3-5. labels and class ids

y10 = torch.arange(48) % 10
BAD_LABELS = {
    "label C": (torch.where(torch.arange(48) == 5, 10, y10), r"outside 0\.\.9: \[10\]"),
    "label -1": (torch.where(torch.arange(48) == 5, -1, y10), r"\[-1\]"),
    "label -100": (torch.where(torch.arange(48) == 5, -100, y10), "ignore index"),
    "float": (y10.float(), r"\.long\(\)"),
    "float 3.7": (y10.float() + 0.7, "not class ids"),
    "(N, 1)": (y10.view(-1, 1), r"shape \(48, 1\).*view\(-1\)"),
    "one-hot": (F.one_hot(y10, 10), r"one-hot.*argmax\(1\)"),
    "one-hot float": (F.one_hot(y10, 10).float(), "one-hot"),
}


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_bad_training_labels_are_refused_before_the_model_changes(case):
    labels, message = BAD_LABELS[case]
    model = tiny()
    before = state(model)
    with pytest.raises(TrainingError, match=message):
        E.train(model, data(y=labels), **FIT)
    assert unchanged(model, before)


def test_labels_of_a_dataset_without_fast_labels_are_checked_on_the_first_batch():
    model = tiny()
    before = state(model)
    bad = NoFastLabels(data(y=torch.full((48,), 10)))
    with pytest.raises(TrainingError, match=r"first batch.*\[10\]"):
        E.train(model, DataLoader(bad, batch_size=16), **FIT)
    assert unchanged(model, before)


def test_a_class_without_training_samples_warns():
    with pytest.warns(UserWarning, match=r"classes \[9\] have no training samples"):
        E.train(tiny(), data(y=torch.arange(48) % 9), **FIT)


@pytest.mark.parametrize("classes", [torch.tensor([3.7]), 3.0, [3.0], np.float64(3)])
def test_float_class_ids_are_refused_by_every_method(trained, classes):
    with pytest.raises(ValueError, match="integers"):
        check_class_ids(classes, 10)
    for method in E.available_methods():
        # SISA first refuses a model that is not its ensemble, also before any work
        with pytest.raises(E.UnlearningError, match="integers" if method != "sisa" else None):
            E.unlearn(trained, classes, data(), method=method)


def test_integer_class_ids_of_any_type_are_accepted():
    assert check_class_ids(np.int64(3), 10) == [3]
    assert check_class_ids(torch.tensor([3, 4]), 10) == [3, 4]
    assert check_class_ids([np.int32(1)], 10) == [1]


def test_float_data_labels_are_refused_not_truncated(trained):
    with pytest.raises(E.UnlearningError, match=r"\.long\(\)"):
        labels_of(data(y=y10.float()), 10)
    with pytest.raises(E.UnlearningError, match="not class ids"):
        labels_of(data(y=y10.float() + 0.7), 10)  # before: 3.7 silently became class 3
    with pytest.raises(E.UnlearningError, match="not class ids"):
        labels_of(NoFastLabels(data(y=y10.float() + 0.7)), 10)
    before = state(trained)
    with pytest.raises(E.UnlearningError, match=r"\.long\(\)"):
        E.unlearn(trained, [3], data(y=y10.float()), **KTP)
    assert unchanged(trained, before)
    assert labels_of(data(y=y10.view(-1, 1)), 10).tolist() == y10.tolist()
    assert check_labels(y10.int(), 10).dtype == torch.long


def test_val_data_labels_out_of_range_are_an_error_not_zero_accuracy():
    model = tiny()
    with pytest.raises(TrainingError, match=r"val_data labels.*\[12\]"):
        E.train(model, data(), val_data=data(y=torch.full((48,), 12)), **FIT)
    # labels only the validation pass sees: its first batch (32 samples), then the rest
    slow = NoFastLabels(data(y=torch.full((48,), 12)))
    with pytest.raises(TrainingError, match=r"val_data labels.*32 value\(s\) outside"):
        E.train(model, data(), val_data=slow, **FIT)
    slow = NoFastLabels(data(y=torch.where(torch.arange(48) >= 40, 12, y10)))
    with pytest.raises(TrainingError, match="8 val_data labels lie outside 0..9"):
        E.train(model, data(), val_data=slow, **FIT)


def test_evaluate_names_an_out_of_range_test_label_and_refuses_model_none():
    model = tiny()
    test = data(y=torch.where(torch.arange(48) == 5, 12, y10))
    with pytest.raises(E.EvaluationError, match=r"test_data labels.*\[12\]"):
        E.evaluate(model, [3], data(), test, metrics=["accuracy"])
    with pytest.raises(E.EvaluationError, match=r"test_data labels.*\[12\]"):
        E.evaluate(model, [3], data(), NoFastLabels(test), metrics=["accuracy"])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        E.evaluate(None, [3], data(), data(), metrics=["accuracy"])


# ----------------------------------------------------------------- 6. empty and one sample


def test_empty_or_single_sample_data_is_refused_before_any_work(trained):
    with pytest.raises(TrainingError, match="empty"):
        E.train(tiny(), data(0), **FIT)
    with pytest.raises(TrainingError, match="1 sample.*BatchNorm.*more data"):
        E.train(tiny(), data(1), **FIT)
    with pytest.raises(E.UnlearningError, match="empty"):
        E.unlearn(trained, [3], data(0), **KTP)
    before = state(trained)
    with pytest.raises(E.UnlearningError, match="1 sample.*BatchNorm.*more data"):
        E.unlearn(trained, [3], data(2, y=torch.tensor([3, 4])), **KTP)
    # the baselines' shared loop says the same instead of BatchNorm's error from inside torch
    with pytest.raises(E.UnlearningError, match="1 sample.*BatchNorm.*more data"):
        E.unlearn(trained, [3], data(2, y=torch.tensor([3, 4])), method="finetune", epochs=1,
                  show_progress=False)
    assert unchanged(trained, before)


# ----------------------------------------------------------------- 7-10. state after an error


class Raising(Dataset):
    """Raises after ``limit`` samples; exposes its labels (no decoding to split it)."""

    def __init__(self, base, limit):
        self.base, self.limit, self.seen = base, limit, 0
        self.targets = base.tensors[1]

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.seen += 1
        if self.seen > self.limit:
            raise RuntimeError("the data broke")
        return self.base[i]


def test_an_error_mid_distillation_restores_the_teachers_mode_and_device(trained):
    teacher = copy.deepcopy(trained).train()
    device = teacher.erm.G.device
    with pytest.raises(RuntimeError, match="the data broke"):
        E.unlearn(teacher, [3], Raising(data(), 20), cache_teacher=False, **KTP)
    assert teacher.training, "the teacher was left in eval mode"
    assert all(p.device == device for p in teacher.parameters())


def _checkpoint(tmp_path, **kwargs):
    run = dict(epochs=2, batch_size=16, show_progress=False, checkpoint_every=1)
    run.update(kwargs)
    E.train(tiny(), data(), output_dir=tmp_path, **run)
    return tmp_path / "checkpoint"


def test_resume_into_a_model_of_another_class_count_loads_nothing(tmp_path):
    ckpt = _checkpoint(tmp_path)
    model = tiny(5)
    before = state(model)
    with pytest.raises(E.CheckpointError, match=r"does not match the model.*fc\.weight"):
        E.train(model, data(num_classes=5), resume_from=ckpt, epochs=3, batch_size=16,
                show_progress=False)
    assert unchanged(model, before)


def test_resume_with_other_run_settings_is_refused_but_more_epochs_are_fine(tmp_path):
    ckpt = _checkpoint(tmp_path)
    cases = {"batch_size=8": dict(batch_size=8), "seed=1": dict(seed=1),
             "config.lambda2=1.0": dict(config=E.ERMConfig(lambda2=1.0)),
             "epochs=1": dict(epochs=1)}
    for name, change in cases.items():
        run = dict(epochs=2, batch_size=16, show_progress=False)
        run.update(change)
        model = tiny()
        before = state(model)
        with pytest.raises(E.CheckpointError, match=rf"settings differ.*{name}"):
            E.train(model, data(), resume_from=ckpt, **run)
        assert unchanged(model, before), name
    longer = E.train(tiny(), data(), resume_from=ckpt, epochs=3, batch_size=16,
                     show_progress=False)
    assert [h.epoch for h in longer.history] == [0, 1, 2]


def test_resume_finds_checkpoint_old_after_a_save_killed_mid_swap(tmp_path):
    ckpt = _checkpoint(tmp_path, epochs=1)
    os.replace(ckpt, tmp_path / "checkpoint.old")  # killed between the two renames
    stale = tmp_path / ".checkpoint.k1ll3d_x"  # the temp folder it was assembling
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="resuming from .*checkpoint.old"):
        result = E.train(tiny(), data(), resume_from=ckpt, epochs=2, batch_size=16,
                         show_progress=False, output_dir=tmp_path, checkpoint_every=1)
    assert [h.epoch for h in result.history] == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "history.json"]
