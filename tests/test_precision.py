"""bfloat16 on a CPU: the convolutions whose bfloat16 weight gradient oneDNN leaves partly
uninitialised (a stride above 1 over a one-pixel map) are found, and neither KTP's student
nor erm_surgery.train runs them in bfloat16."""

import itertools
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import separated
from torch import nn
from torch.utils.data import TensorDataset

import erm_surgery
from erm_surgery.errors import TrainingError, UnlearningError
from erm_surgery.methods.ktp import KTPConfig, ktp, layout
from erm_surgery.training.precision import (
    bfloat16_gradient_hazards,
    strided_depthwise_convolutions,
)


def _test_resnet(num_classes: int = 4) -> erm_surgery.ERMModel:
    torch.manual_seed(0)
    return erm_surgery.attach(timm.create_model("test_resnet", num_classes=num_classes,
                                                in_chans=1))


def _digits(px: int, n: int = 96, classes: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    x = torch.randn(n, 1, px, px, generator=g) + y.view(-1, 1, 1, 1) * 0.5
    return TensorDataset(x, y)


def test_hazards_are_the_strided_convolutions_that_meet_a_one_pixel_map():
    model = _test_resnet()
    model.train()
    # test_resnet's stride-2 layer4 convolution gets a 1 x 1 map at 16 px, 2 x 2 at 32 px
    assert bfloat16_gradient_hazards(model, torch.randn(1, 1, 16, 16)) == [
        "model.layer4.0.conv1"]
    assert bfloat16_gradient_hazards(model, torch.randn(2, 1, 32, 32)) == []
    assert model.training  # mode restored
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
    # one dimension is enough: a 1 x 8 map under a stride of 2 along it
    conv = nn.Conv2d(4, 4, (3, 3), stride=(1, 2), padding=1)
    assert bfloat16_gradient_hazards(nn.Sequential(conv), torch.randn(1, 4, 8, 1)) == ["0"]
    assert bfloat16_gradient_hazards(nn.Sequential(conv), torch.randn(1, 4, 1, 8)) == []
    # a 1 x 1 kernel has no padding-only tap, whatever the stride
    point = nn.Sequential(nn.Conv2d(4, 4, 1, stride=2))
    assert bfloat16_gradient_hazards(point, torch.randn(1, 4, 1, 1)) == []


def test_strided_depthwise_convolutions_are_named():
    effnet = timm.create_model("test_efficientnet", num_classes=4, in_chans=1)
    assert strided_depthwise_convolutions(effnet)
    assert strided_depthwise_convolutions(timm.create_model("test_resnet")) == []


def _padding_tap_gradient(hw, kernel, stride, groups, nhwc) -> tuple[torch.Tensor, torch.Tensor]:
    """A bfloat16-autocast convolution's weight gradient on a CPU, and which taps meet only
    padding (their float64 gradient is exactly 0), after dirtying freed memory with NaN."""
    cin = cout = 32
    w = torch.randn(cout, cin // groups, kernel, kernel)
    x = torch.randn(8, cin, hw, hw)
    if nhwc:
        w, x = (t.contiguous(memory_format=torch.channels_last) for t in (w, x))
    w.requires_grad_()
    junk = [torch.full((cin * cout * 9 + 1000 * i,), float("nan")) for i in range(8)]
    del junk  # freed memory full of NaN: what an uninitialised gradient would read
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.conv2d(x, w, stride=stride, padding=kernel // 2, groups=groups)
    out.float().sum().backward()
    w64 = w.detach().double().requires_grad_()
    F.conv2d(x.double(), w64, stride=stride, padding=kernel // 2, groups=groups).sum().backward()
    dead = (w64.grad == 0).all(0).all(0)
    return w.grad, dead


@pytest.mark.parametrize("nhwc", [False, True])
def test_bfloat16_weight_gradients_are_exact_zeros_where_no_hazard_is_flagged(nhwc):
    """The flag is what keeps bfloat16 steps safe: every geometry it lets through must give
    exact zeros on the taps that meet only padding (NaN-dirtied memory, so an
    uninitialised gradient would show)."""
    torch.manual_seed(0)
    checked = 0
    for hw, kernel, stride, groups in itertools.product((1, 2, 3), (3, 5), (1, 2), (1, 32)):
        conv = nn.Conv2d(32, 32, kernel, stride=stride, padding=kernel // 2, groups=groups)
        if bfloat16_gradient_hazards(nn.Sequential(conv), torch.randn(1, 32, hw, hw)):
            continue
        grad, dead = _padding_tap_gradient(hw, kernel, stride, groups, nhwc)
        assert torch.isfinite(grad).all(), (hw, kernel, stride, groups)
        if dead.any():
            checked += 1
            assert (grad[:, :, dead] == 0).all(), (hw, kernel, stride, groups)
    assert checked >= 8  # geometries with padding-only taps were among them


def test_ktp_auto_keeps_float32_where_bfloat16_would_train_garbage(monkeypatch):
    monkeypatch.setattr(layout, "fast_bfloat16", lambda device: True)
    config = dict(epochs=1, show_progress=False, teacher_precision="float32")
    for px, expected in ((32, "bfloat16"), (16, "float32")):
        teacher = _test_resnet()
        separated(teacher)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a weak hand-set prohibition: not the point
            student, info = ktp(teacher, [1], _digits(px), config=KTPConfig(**config))
        assert info.student_precision == expected, px
        assert all(torch.isfinite(p).all() for p in student.parameters())
    # asked for explicitly, it is refused before any work, naming the convolution and fixes
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with pytest.raises(UnlearningError, match=r"layer4\.0\.conv1.*'auto' or 'float32'"):
        ktp(teacher, [1], _digits(16),
            config=KTPConfig(**config, student_precision="bfloat16"))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_ktp_auto_keeps_float32_for_a_strided_depthwise_student(monkeypatch):
    """Speed, not correctness: oneDNN's bfloat16 backward of a strided depthwise
    convolution is slower than float32 on a CPU."""
    monkeypatch.setattr(layout, "fast_bfloat16", lambda device: True)
    torch.manual_seed(0)
    teacher = erm_surgery.attach(timm.create_model("test_efficientnet", num_classes=4,
                                                   in_chans=1))
    separated(teacher)
    cpu = torch.device("cpu")
    sample = torch.randn(1, 1, 32, 32)
    assert bfloat16_gradient_hazards(teacher, sample) == []
    assert layout.student_autocast(teacher, "auto", cpu, sample) is None
    assert layout.student_autocast(teacher, "bfloat16", cpu, sample) is torch.bfloat16
    assert layout.student_autocast(_test_resnet(), "auto", cpu, sample) is torch.bfloat16
    assert layout.student_autocast(_test_resnet(), "float32", cpu, sample) is None
    # without fast bfloat16 "auto" is float32 whatever the model
    monkeypatch.setattr(layout, "fast_bfloat16", lambda device: False)
    assert layout.student_autocast(_test_resnet(), "auto", cpu, sample) is None


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one mixed-precision setting per process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_train_refuses_cpu_bf16_for_a_hazard_before_the_first_step(fresh_accelerate_state):
    model = _test_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingError, match=r"layer4\.0\.conv1.*mixed_precision='no'"):
        erm_surgery.train(model, _digits(16), epochs=1, mixed_precision="bf16",
                          show_progress=False, batch_size=32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_takes_cpu_bf16_where_no_hazard_is_flagged(fresh_accelerate_state):
    model = _test_resnet()
    result = erm_surgery.train(model, _digits(32), epochs=1, mixed_precision="bf16",
                               show_progress=False, batch_size=32)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


@pytest.mark.parametrize("method", ["ktp", "finetune", "scrub", "ec"])
def test_every_training_loop_refuses_a_cpu_bf16_accelerator_on_a_hazard(
        method, fresh_accelerate_state):
    """KTP, the SGD loop (fine-tune, retrain, amnesiac, SISA), the step loop (SCRUB,
    SalUn, ...) and EC all train under the caller's accelerator: a CPU bf16 one on a
    model with a one-pixel-map hazard is refused before the first step, and the model
    the caller passed is unchanged."""
    from erm_surgery.training import make_accelerator

    model = _test_resnet()
    separated(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accelerator = make_accelerator("bf16")
    with warnings.catch_warnings(), pytest.raises(UnlearningError,
                                                  match=r"layer4\.0\.conv1.*'no'"):
        warnings.simplefilter("ignore")  # a weak hand-set prohibition: not the point
        erm_surgery.unlearn(model, [1], _digits(16), method=method, accelerator=accelerator,
                            show_progress=False, epochs=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_check_reads_no_sample_unless_it_runs():
    """A dataset with random transforms must not be read one extra time (its draws would
    shift the run's random stream) when the accelerator is not a CPU bf16 one."""
    from types import SimpleNamespace

    from erm_surgery.training.precision import refuse_cpu_bfloat16_hazards

    def reader():
        raise AssertionError("read a sample")

    model = _test_resnet()
    for device, precision in (("cpu", "no"), ("cuda", "bf16")):
        acc = SimpleNamespace(device=torch.device(device), mixed_precision=precision)
        refuse_cpu_bfloat16_hazards(model, reader, acc, UnlearningError, "test")
    cpu_bf16 = SimpleNamespace(device=torch.device("cpu"), mixed_precision="bf16")
    with pytest.raises(UnlearningError, match=r"^test: .*layer4\.0\.conv1"):
        refuse_cpu_bfloat16_hazards(model, lambda: torch.randn(1, 1, 16, 16), cpu_bf16,
                                    UnlearningError, "test")
    refuse_cpu_bfloat16_hazards(model, lambda: None, cpu_bf16, UnlearningError, "test")
