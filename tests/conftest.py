"""Shared fixtures: the seed, and the teachers every unlearning test starts from.

Two teachers are trained once per session (not once per module):

- ``mnist_teacher``: timm ``test_resnet`` (in_chans=1) ERM-trained on 2,000 real MNIST
  digits at 32x32, 6 epochs at batch 64 (KTP's tests; about 10 s on 2 cores);
- ``digits_teacher``: the same network on scikit-learn's 1,400 8x8 digits at 16x16,
  8 epochs at batch 128, with an Amnesiac :class:`UpdateRecorder` watching classes 4 and
  9 (the baselines, ESC / EC and the method contract; about 8 s).

Each test gets its own deep copy of the model and of the data, so nothing a test does
to them reaches a later test; ``state`` is the trained state dict to compare against.
The recorder is shared (it holds about 100 MiB of deltas, most on disk): a test that
changes it fails at teardown.
"""

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

# two cores on CI: threads beyond that only add contention
torch.set_num_threads(min(2, os.cpu_count() or 1))

#: classes the digits teacher's update recorder watches (Amnesiac can forget only these)
RECORDED = [4, 9]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@dataclass(frozen=True)
class Teacher:
    """One trained original: the model (eval mode), its data, and what tests compare with.

    Attributes:
        model: the attached, ERM-trained model (this test's own copy).
        train, test: the training and test data (this test's own copies).
        state: the model's state dict right after training.
        init: its parameters before training (``unwrap(model).named_parameters()``).
        recorder: the digits teacher's Amnesiac recorder (shared, read-only), else None.
    """

    model: Any
    train: Dataset
    test: Dataset
    state: dict[str, torch.Tensor]
    init: dict[str, torch.Tensor] = field(default_factory=dict)
    recorder: Any = None

    def untouched(self) -> None:
        """Assert that ``model`` still holds the trained state, bit for bit."""
        after = self.model.state_dict()
        assert after.keys() == self.state.keys(), "the teacher's state dict keys changed"
        for key, value in self.state.items():
            assert torch.equal(after[key], value), f"the teacher changed: {key}"


def _copy_data(data: Dataset) -> Dataset:
    if isinstance(data, Subset):
        return Subset(_copy_data(data.dataset), list(data.indices))
    if isinstance(data, TensorDataset):
        return TensorDataset(*(t.clone() for t in data.tensors))
    return copy.deepcopy(data)


def _hand_out(master: Teacher) -> Teacher:
    """This test's copy of ``master``: a test may do anything with it."""
    return Teacher(model=copy.deepcopy(master.model), train=_copy_data(master.train),
                   test=_copy_data(master.test), state=master.state, init=master.init,
                   recorder=master.recorder)


def _trained_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def _mnist_master() -> Teacher:
    import erm_surgery as E
    from erm_surgery.data import load_mnist5k

    torch.manual_seed(0)
    train_set, test_set = load_mnist5k(n_train=4000)
    train_set, test_set = Subset(train_set, range(2000)), Subset(test_set, range(600))
    model = E.attach(timm.create_model("test_resnet", num_classes=10, in_chans=1))
    E.train(model, train_set, epochs=6, batch_size=64, show_progress=False)
    model.eval()
    return Teacher(model=model, train=train_set, test=test_set, state=_trained_state(model))


@pytest.fixture(scope="session")
def _digits_master(tmp_path_factory) -> Teacher:
    import erm_surgery as E
    from erm_surgery.data import load_digits8x8
    from erm_surgery.methods.baselines import UpdateRecorder
    from erm_surgery.surgery import unwrap

    torch.manual_seed(0)
    train_set, test_set = load_digits8x8()
    model = E.attach(timm.create_model("test_resnet", num_classes=10, in_chans=1))
    init = {n: p.detach().clone() for n, p in unwrap(model).named_parameters()}
    # a 16 MiB memory budget: most of the ~115 MiB of deltas spill to disk
    recorder = UpdateRecorder(classes=RECORDED, memory_limit_mb=16,
                              spill_dir=tmp_path_factory.mktemp("deltas"))
    E.train(model, train_set, epochs=8, batch_size=128, show_progress=False,
            callbacks=[recorder])
    model.eval()
    yield Teacher(model=model, train=train_set, test=test_set, state=_trained_state(model),
                  init=init, recorder=recorder)
    recorder.cleanup()


def _recorder_state(recorder) -> tuple:
    return (recorder.total_steps, recorder.memory_bytes, recorder.disk_bytes,
            [(s.step, tuple(s.classes), s.path, s.nbytes) for s in recorder.steps])


@pytest.fixture
def mnist_teacher(_mnist_master) -> Teacher:
    """The MNIST teacher (2,000 training / 600 test digits), this test's own copy."""
    return _hand_out(_mnist_master)


@pytest.fixture
def digits_teacher(_digits_master) -> Teacher:
    """The 8x8-digits teacher (1,400 training / 397 test digits) with its recorder, this
    test's own copy (the recorder is shared and must not change)."""
    rec = _digits_master.recorder
    before = _recorder_state(rec)
    yield _hand_out(_digits_master)
    assert _recorder_state(rec) == before, "a test changed the session's UpdateRecorder"
    assert all(Path(s.path).is_file() for s in rec.steps if s.path is not None), \
        "a test deleted spill files of the session's UpdateRecorder"
