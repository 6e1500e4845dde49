"""Shared fixtures: the seed, and the teachers every unlearning test starts from.

Two teachers are trained once per session (not once per module):

- ``mnist_teacher``: timm ``test_resnet`` (in_chans=1) ERM-trained on 2,000 real MNIST
  digits at 32x32, 6 epochs at batch 64 (KTP's tests; about 20 s on one thread);
- ``digits_teacher``: the same network on scikit-learn's 1,400 8x8 digits at 16x16,
  8 epochs at batch 128, with an Amnesiac :class:`UpdateRecorder` watching classes 4 and
  9 (the baselines, ESC / EC and the method contract; about 6 s).

The trained master is never handed out. Tests borrow one working copy of it: after each
test the copy is checked against the master (every tensor of the state dict, each
module's mode, attributes and hooks, each parameter's ``requires_grad``), so a test that
changed the model it was lent errors at teardown, and the next test gets a fresh copy:
no test can silently change the teacher of a later one. (A deep copy per test would cost
about 60 ms each: copying an attached model traces it again.) The data are copied for
each test. The recorder is shared read-only: a test that changes it errors at teardown.
"""

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from helpers import RECORDED
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

# two cores on CI: threads beyond that only add contention. OMP_NUM_THREADS, when set, wins:
# on a machine shared with other jobs two threads spin at every barrier while the other
# core is busy (measured: the digits teacher trains in 9.5 s with one thread, 105 s with
# two, on two cores with two other jobs running)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: a second thread only waits for the
    first (measured: 10-30x slower on a loaded 2-core machine). Restored afterwards. A
    module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@dataclass(frozen=True)
class Teacher:
    """One trained original: the model (eval mode), its data, and what tests compare with.

    Attributes:
        model: the attached, ERM-trained model (lent to this test: see the module doc).
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


def _copy_data(data: Dataset) -> Dataset:
    if isinstance(data, Subset):
        return Subset(_copy_data(data.dataset), list(data.indices))
    if isinstance(data, TensorDataset):
        return TensorDataset(*(t.clone() for t in data.tensors))
    return copy.deepcopy(data)


def _layout(model: nn.Module) -> list:
    """What a test could change in a model besides its tensors: each module's type, mode,
    attribute names and hooks, each parameter's ``requires_grad``."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
             "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")
    modules = [(name, type(m).__name__, m.training, sorted(vars(m)),
                [len(getattr(m, h, ())) for h in hooks]) for name, m in model.named_modules()]
    return modules + [(name, p.requires_grad) for name, p in model.named_parameters()]


def _changes(model: nn.Module, trained: dict[str, torch.Tensor], layout: list) -> list[str]:
    state = model.state_dict()
    if state.keys() != trained.keys():
        return ["the state dict keys"]
    changed = [k for k, v in trained.items() if not torch.equal(state[k], v)]
    if _layout(model) != layout:
        changed.append("a module's mode, attributes or hooks, or a requires_grad flag")
    return changed


class _Lender:
    """Lends the working copy of one trained master to each test, and takes it back."""

    def __init__(self, master: Teacher) -> None:
        self.master = master
        self.copy: nn.Module | None = None
        self.layout: list = []

    def lend(self) -> Teacher:
        if self.copy is None:
            self.copy = copy.deepcopy(self.master.model)
            self.layout = _layout(self.copy)
        m = self.master
        return Teacher(model=self.copy, train=_copy_data(m.train), test=_copy_data(m.test),
                       state=m.state, init=m.init, recorder=m.recorder)

    def take_back(self) -> None:
        changed = _changes(self.copy, self.master.state, self.layout)
        if changed:
            self.copy = None  # the next test gets a fresh copy
            pytest.fail(f"the test changed the session's teacher it was lent ({changed[:3]}); "
                        "deep-copy it before changing it", pytrace=False)


def _trained_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def _mnist_master() -> Teacher:
    """The trained MNIST teacher itself: never hand it to a test (copy it)."""
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
    """The trained digits teacher itself: never hand it to a test (copy it)."""
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


@pytest.fixture(scope="session")
def _mnist_lender(_mnist_master) -> _Lender:
    return _Lender(_mnist_master)


@pytest.fixture(scope="session")
def _digits_lender(_digits_master) -> _Lender:
    return _Lender(_digits_master)


def _recorder_state(recorder) -> tuple:
    return (recorder.total_steps, recorder.memory_bytes, recorder.disk_bytes,
            [(s.step, tuple(s.classes), s.path, s.nbytes) for s in recorder.steps])


@pytest.fixture
def mnist_teacher(_mnist_lender) -> Teacher:
    """The MNIST teacher (2,000 training / 600 test digits)."""
    yield _mnist_lender.lend()
    _mnist_lender.take_back()


@pytest.fixture
def digits_teacher(_digits_lender) -> Teacher:
    """The 8x8-digits teacher (1,400 training / 397 test digits) with its recorder."""
    rec = _digits_lender.master.recorder
    before = _recorder_state(rec)
    yield _digits_lender.lend()
    _digits_lender.take_back()
    if _recorder_state(rec) != before or not all(
            Path(s.path).is_file() for s in rec.steps if s.path is not None):
        pytest.fail("the test changed the session's UpdateRecorder", pytrace=False)
