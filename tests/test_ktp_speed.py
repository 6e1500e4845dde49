"""KTP's bounded teacher cache, its per-rank shards and its batch policy (issue 18)."""

import pytest
import torch
from helpers import separated
from torch import nn
from torch.utils.data import Subset

from erm_surgery.errors import UnlearningError
from erm_surgery.methods.ktp import KTPConfig, ktp
from erm_surgery.methods.ktp.cache import rank_shard
from erm_surgery.methods.ktp.layout import channels_last_weights

# a few steps on a slice of the session teacher's digits: enough to tell students apart.
# float32 steps: these tests compare caches, and bfloat16 steps would turn a last-bit
# difference between two teacher passes into a 1e-2 one (measured, 2 threads)
SMALL = dict(show_progress=False, epochs=1, batch_size=32, seed=3, student_precision="float32")


def _data(teacher, n=320):
    return Subset(teacher.train, list(range(n)))


def _run(teacher, **fields):
    return ktp(teacher.model, [3], _data(teacher), config=KTPConfig(**{**SMALL, **fields}))


def _same_weights(a, b, atol):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if sa[key].is_floating_point():
            assert torch.allclose(sa[key], sb[key], atol=atol), key
        else:
            assert torch.equal(sa[key], sb[key]), key


def test_a_tiny_cache_budget_streams_the_rest_and_trains_the_same_student(mnist_teacher):
    full, full_info = _run(mnist_teacher)
    samples = full_info.samples
    assert full_info.cached_samples == samples and full_info.streamed_batches == 0
    per_sample = full_info.cache_bytes // samples
    budget = 40 * per_sample + per_sample // 2  # room for 40 maps, not 41
    part, info = _run(mnist_teacher, cache_bytes=budget)
    assert info.cached_samples == 40 and info.cache_bytes == 40 * per_sample
    # 40 of ~290 cached samples cannot fill a shuffled batch of 32: every batch streams
    batches = samples // SMALL["batch_size"]
    assert info.streamed_batches == batches
    _same_weights(full, part, atol=1e-4)
    assert abs(info.final_mse - full_info.final_mse) < 1e-4


def test_no_cache_recomputes_every_batch_and_matches_the_cached_run(mnist_teacher):
    full, full_info = _run(mnist_teacher)
    none, info = _run(mnist_teacher, cache_bytes=0)
    assert (info.cached_samples, info.cache_bytes) == (0, 0)
    assert info.streamed_batches == info.samples // SMALL["batch_size"]
    _same_weights(full, none, atol=1e-4)
    # where the time went: a cached run has a teacher pass, a streaming one has none
    # (its teacher forwards are inside the steps); the parts never exceed the whole
    assert full_info.teacher_pass_s > 0 and info.teacher_pass_s == 0.0
    for i in (full_info, info):
        assert 0 < i.distill_s and i.teacher_pass_s + i.distill_s < i.total_s
        assert i.to_dict()["total_s"] == i.total_s


def test_a_half_precision_cache_takes_half_the_bytes(mnist_teacher):
    fp32 = dict(teacher_precision="float32")  # float32 maps, rounded by the cache
    full, full_info = _run(mnist_teacher, **fp32)
    assert full_info.teacher_precision == "float32"
    half, info = _run(mnist_teacher, cache_dtype="bfloat16", **fp32)
    assert info.cache_bytes * 2 == full_info.cache_bytes
    assert info.cached_samples == full_info.cached_samples
    # rounded targets: a close student, not the same one
    diffs = [(a - b).abs().max() for a, b in zip(full.parameters(), half.parameters(), strict=True)]
    assert max(diffs) > 0
    assert abs(info.final_mse - full_info.final_mse) < 0.05 * full_info.final_mse + 1e-3


def test_the_student_precision_takes_effect_and_is_recorded(mnist_teacher, monkeypatch):
    from erm_surgery.methods.ktp import layout

    teacher_fp32 = dict(teacher_precision="float32")  # the same targets for every run
    fp32, info32 = _run(mnist_teacher, student_precision="float32", **teacher_fp32)
    bf16, info16 = _run(mnist_teacher, student_precision="bfloat16", **teacher_fp32)
    assert (info32.student_precision, info16.student_precision) == ("float32", "bfloat16")
    # another arithmetic: a close student, not the same one
    diffs = [(a - b).abs().max() for a, b in zip(fp32.parameters(), bf16.parameters(), strict=True)]
    assert max(diffs) > 0
    assert abs(info16.final_mse - info32.final_mse) < 0.1 * info32.final_mse + 1e-3
    # "auto" on hardware without fast bfloat16 is the float32 run, exactly
    monkeypatch.setattr(layout, "fast_bfloat16", lambda device: False)
    auto, info = _run(mnist_teacher, student_precision="auto", **teacher_fp32)
    assert info.student_precision == "float32"
    _same_weights(auto, fp32, atol=0)


@pytest.mark.parametrize("n,procs", [(10, 3), (101, 2), (4, 4)])
def test_rank_shards_are_equal_disjoint_and_fixed_by_the_seed(n, procs):
    shards = [rank_shard(n, procs, r, seed=5) for r in range(procs)]
    assert {len(s) for s in shards} == {n // procs}  # same step count on every rank
    flat = [p for s in shards for p in s]
    assert len(set(flat)) == len(flat) and all(0 <= p < n for p in flat)
    assert shards == [rank_shard(n, procs, r, seed=5) for r in range(procs)]
    assert shards != [rank_shard(n, procs, r, seed=6) for r in range(procs)]


def test_a_bfloat16_teacher_pass_gives_close_maps_and_an_exact_half_size_cache(mnist_teacher):
    from erm_surgery.methods.ktp.cache import TeacherCache

    teacher = mnist_teacher.model.eval()
    data, keep = _data(mnist_teacher), teacher.erm.keep_mask([3], 0.0).float().view(1, -1, 1, 1)
    positions, cpu = list(range(len(data))), torch.device("cpu")
    exact = TeacherCache(teacher, keep, data, positions, cpu, (1 << 30, 0), dtype=None)
    fast = TeacherCache(teacher, keep, data, positions, cpu, (1 << 30, 0), dtype=None,
                        autocast=torch.bfloat16)
    # "auto" storage = the maps' dtype: bfloat16 maps take half the bytes
    assert exact.dev.dtype == torch.float32 and fast.dev.dtype == torch.bfloat16
    assert fast.nbytes * 2 == exact.nbytes
    err = (fast.dev.float() - exact.dev).norm() / exact.dev.norm()
    assert 0 < err < 0.03  # bfloat16 rounding through the network, not another map
    assert (fast.dev[:, ~keep.view(-1).bool()] == 0).all()  # prohibited channels stay 0

    bf16 = dict(teacher_precision="bfloat16")
    student, info = _run(mnist_teacher, **bf16)
    assert info.teacher_precision == "bfloat16"
    # the cache stores the bfloat16 maps as they are: an explicit bfloat16 cache is the
    # same run, and so is streaming every batch through the bfloat16 teacher
    same, _ = _run(mnist_teacher, cache_dtype="bfloat16", **bf16)
    _same_weights(student, same, atol=0)
    streamed, s_info = _run(mnist_teacher, cache_bytes=0, **bf16)
    assert s_info.cached_samples == 0
    _same_weights(student, streamed, atol=1e-4)


def test_auto_precision_takes_bfloat16_only_where_the_hardware_is_fast(monkeypatch):
    from erm_surgery.methods.ktp import layout

    cpu = torch.device("cpu")
    assert layout.autocast_dtype(cpu, "float32") is None
    assert layout.autocast_dtype(cpu, "bfloat16") is torch.bfloat16
    monkeypatch.setattr(layout, "fast_bfloat16", lambda device: False)
    assert layout.autocast_dtype(cpu, "auto") is None
    monkeypatch.setattr(layout, "fast_bfloat16", lambda device: True)
    assert layout.autocast_dtype(cpu, "auto") is torch.bfloat16
    with pytest.raises(ValueError, match="teacher_precision"):
        layout.autocast_dtype(cpu, "fp8", name="teacher_precision")


def test_fast_bfloat16_on_cuda_means_ampere_or_later_not_emulation(monkeypatch):
    """torch.cuda.is_bf16_supported() says yes on a T4 or V100, which only emulate
    bfloat16: "auto" must keep float32 there."""
    from erm_surgery.methods.ktp import layout

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, fast in [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None, c=capability: c)
        assert layout.fast_bfloat16(cuda) is fast
        assert (layout.autocast_dtype(cuda, "auto") is torch.bfloat16) is fast


def test_auto_student_steps_on_a_gpu_take_bfloat16_without_a_cpu_check(monkeypatch):
    """The one-pixel-map hazard is oneDNN's (a CPU); on a fast-bfloat16 GPU "auto" takes
    bfloat16 for the student's steps without a probe forward (tests/test_precision.py has
    the CPU rules)."""
    from erm_surgery.methods.ktp import layout

    monkeypatch.setattr(layout, "fast_bfloat16", lambda device: True)

    class NoForward(nn.Module):
        def forward(self, x):
            raise AssertionError("no probe forward on a GPU")

    cuda = torch.device("cuda")
    assert layout.student_autocast(NoForward(), "auto", cuda, torch.zeros(1)) is torch.bfloat16
    assert layout.student_autocast(NoForward(), "float32", cuda, torch.zeros(1)) is None
    assert layout.autocast_dtype(torch.device("cpu"), "auto") is torch.bfloat16  # teacher
    with pytest.raises(ValueError, match="student_precision"):
        layout.student_autocast(NoForward(), "fp8", cuda, torch.zeros(1))


def test_a_non_finite_weight_is_refused_with_the_precision_to_blame():
    from erm_surgery.errors import UnlearningError
    from erm_surgery.methods.ktp.ktp import _check_finite_weights

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(2, 2))
    _check_finite_weights(model, torch.bfloat16)  # finite: nothing to say
    with torch.no_grad():
        model[0].weight[0, 0, 2, 2] = float("nan")
    with pytest.raises(UnlearningError, match=r"\['0.weight'\].*student_precision='float32'"):
        _check_finite_weights(model, torch.bfloat16)
    with pytest.raises(UnlearningError, match="0.weight") as err:
        _check_finite_weights(model, None)
    assert "student_precision" not in str(err.value)


@pytest.mark.parametrize("fields,word", [(dict(cache_bytes=-1), "cache_bytes"),
                                         (dict(cache_dtype="int8"), "cache_dtype"),
                                         (dict(teacher_precision="half"),
                                          "teacher_precision"),
                                         (dict(student_precision="fp16"),
                                          "student_precision")])
def test_bad_cache_settings_name_the_field(fields, word):
    with pytest.raises(ValueError, match=word):
        KTPConfig(**fields)


class _Rank:
    """One rank of a two-process run, without a process group: Accelerate's calls that KTP
    makes, each doing what one process would."""

    num_processes = 2
    is_main_process = True
    mixed_precision = "no"
    device = torch.device("cpu")

    def __init__(self, index: int) -> None:
        self.process_index = index

    def prepare(self, *objects):
        return objects

    def backward(self, loss):
        loss.backward()

    def unwrap_model(self, model):
        return model

    def reduce(self, tensor, reduction="sum"):
        return tensor


def test_each_rank_caches_its_own_shard_and_streaming_it_changes_nothing(mnist_teacher):
    def run(rank, **fields):
        return ktp(mnist_teacher.model, [3], _data(mnist_teacher),
                   config=KTPConfig(**{**SMALL, **fields}), accelerator=_Rank(rank))

    s0, i0 = run(0)
    shard = i0.samples // 2
    assert i0.cached_samples == shard  # its half, not the whole data
    assert i0.steps == shard // SMALL["batch_size"] and i0.streamed_batches == 0
    s1, i1 = run(1)
    assert i1.cached_samples == shard
    # the other half of the data: another student
    assert any(not torch.equal(a, b)
               for a, b in zip(s0.parameters(), s1.parameters(), strict=True))
    streamed, info = run(0, cache_bytes=0)  # the cache is an optimisation only
    assert info.cached_samples == 0 and info.streamed_batches == i0.steps
    _same_weights(s0, streamed, atol=1e-4)


def test_the_batch_grows_with_the_data_and_keeps_enough_steps():
    config = KTPConfig(batch_size=32, max_batch_size=128, min_steps=100, epochs=2, lr=0.004,
                       lr_scaling="sqrt")
    assert config.batch_for(1800) == (32, 0.004)  # 2 * 1800 // 64 = 56 steps: too few
    batch, lr = config.batch_for(3600)
    assert batch == 64 and lr == pytest.approx(0.004 * 2 ** 0.5)
    assert config.batch_for(50_000)[0] == 128  # capped
    for samples in (10, 1800, 3600, 7000, 50_000):  # whatever the data: enough steps
        batch, _ = config.batch_for(samples)
        assert batch == 32 or config.epochs * (samples // batch) >= config.min_steps
    fixed = KTPConfig(batch_size=32, max_batch_size=32)
    assert fixed.batch_for(50_000) == (32, fixed.lr)
    assert KTPConfig.paper().batch_for(50_000)[0] == 32  # the reference recipe's batch
    # the default keeps 100 steps and scales lr linearly: batch 64 (lr 0.01, a 20-step
    # warmup) on MNIST-5k's 3,588 retain digits, 32 (no warmup) below 3,200, 128 from 6,400
    default = KTPConfig()
    assert default.batch_for(3588) == (64, pytest.approx(2 * default.lr))
    assert [default.batch_for(n)[0] for n in (3199, 3200, 6399, 6400)] == [32, 64, 64, 128]
    assert default.warmup_for(64) == 20 and default.warmup_for(32) == 0
    assert KTPConfig(warmup_steps=5).warmup_for(32) == 5  # an explicit warmup always runs


def test_linear_lr_scaling_follows_the_batch_and_bad_settings_are_refused():
    config = KTPConfig(batch_size=32, max_batch_size=128, min_steps=10, epochs=2,
                       lr=0.004, lr_scaling="linear")
    assert config.batch_for(50_000) == (128, pytest.approx(0.016))
    assert config.batch_for(100)[0] == 32 and config.batch_for(100)[1] == 0.004
    with pytest.raises(ValueError, match="lr_scaling"):
        KTPConfig(lr_scaling="cube")
    with pytest.raises(ValueError, match="warmup_steps"):
        KTPConfig(warmup_steps=-1)


def _factors(total, warmup):
    from erm_surgery.training import cosine_schedule

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = cosine_schedule(opt, total, warmup)
    out = []
    for _ in range(total + 2):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_the_warmup_rises_linearly_then_the_cosine_decays_to_zero():
    from erm_surgery.training import cosine_schedule

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    plain, sched = [], cosine_schedule(opt, 20)
    for _ in range(22):
        plain.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert _factors(20, 0) == pytest.approx(plain)  # no warmup: train()'s schedule
    lrs = _factors(20, 4)
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # step + 1 over warmup + 1
    assert all(a >= b for a, b in zip(lrs[4:-1], lrs[5:], strict=True))  # then only down
    assert lrs[20:] == pytest.approx([0.0, 0.0], abs=1e-12)  # held at 0 after the run


def test_peak_memory_sees_a_block_held_during_the_call():
    import time

    from erm_surgery.methods.ktp.memory import PeakMemory

    with PeakMemory() as peak:
        block = torch.ones(64 << 20)  # 256 MiB, written, so resident
        time.sleep(0.1)  # a few of the sampler's 10 ms periods
        del block
    assert peak.cuda_peak_mib is None  # a CPU device
    assert peak.peak_rss_mib - peak.rss_before_mib >= 240


def test_ktp_reports_its_peak_memory(mnist_teacher):
    import psutil

    before = psutil.Process().memory_info().rss / (1 << 20)
    _, info = _run(mnist_teacher)
    assert info.cuda_peak_mib is None  # no GPU here
    # the whole process: at least what it held before the call (the teacher, the data)
    assert info.peak_rss_mib >= 0.95 * before


def test_the_teacher_pass_runs_in_nhwc_and_leaves_the_teacher_as_it_was(mnist_teacher):
    teacher = mnist_teacher.model
    before = {k: (t.data_ptr(), t.stride()) for k, t in teacher.state_dict().items()}
    nhwc, info = _run(mnist_teacher)
    assert info.teacher_channels_last
    after = {k: (t.data_ptr(), t.stride()) for k, t in teacher.state_dict().items()}
    assert after == before  # the very tensors, in their own layout
    own, own_info = _run(mnist_teacher, teacher_channels_last=False)
    assert not own_info.teacher_channels_last
    # the layout changes the speed, not the targets: the cached maps agree to float noise
    from erm_surgery.methods.ktp.cache import TeacherCache

    data, keep = _data(mnist_teacher), teacher.erm.keep_mask([3], 0.0).float().view(1, -1, 1, 1)
    positions = list(range(len(data)))
    teacher.eval()
    plain = TeacherCache(teacher, keep, data, positions, torch.device("cpu"), (1 << 30, 0))
    with channels_last_weights(teacher):
        fast = TeacherCache(teacher, keep, data, positions, torch.device("cpu"), (1 << 30, 0),
                            channels_last=True)
    assert fast.cached == plain.cached == len(data)
    assert torch.allclose(fast.dev, plain.dev, atol=1e-5)
    # (the students differ by more: Adam's normalised steps carry that noise into the
    # weights over the run, as any change of convolution algorithm does)
    assert abs(info.final_mse - own_info.final_mse) < 0.05 * own_info.final_mse


class _NoNHWC(torch.nn.Module):
    """A CNN whose forward flattens a map with ``.view``: NHWC tensors are refused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(2, 8, 3, padding=1)  # 2: a 1-channel weight is NHWC already
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = x.view(x.size(0), -1).view_as(x)
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def test_a_teacher_that_refuses_nhwc_runs_in_its_own_layout():
    import erm_surgery

    torch.manual_seed(0)
    teacher = erm_surgery.attach(_NoNHWC())
    with torch.no_grad():  # a hand-separated G: channel c is class c's
        teacher.erm.G.zero_()
        for c in range(10):
            teacher.erm.G[c, c] = 1.0
    x = torch.randn(64, 2, 8, 8)
    with channels_last_weights(teacher), pytest.raises(RuntimeError, match="view"):
        teacher.forward_features(x)
    data = torch.utils.data.TensorDataset(x, torch.arange(64) % 10)
    student, info = ktp(teacher, [3], data, config=KTPConfig(**SMALL))
    assert not info.teacher_channels_last and info.steps == 1
    assert all(p.is_contiguous() for p in teacher.parameters())
    # the student's NHWC steps ("auto" on a CPU) fall back the same way; asked for, they
    # are refused with the fix named
    assert not info.student_channels_last
    with pytest.raises(UnlearningError, match="refuses NHWC.*channels_last='auto'"):
        ktp(teacher, [3], data, config=KTPConfig(**SMALL, channels_last=True))


def test_the_student_steps_in_nhwc_on_a_cpu_and_comes_back_in_the_default_layout(
        mnist_teacher):
    nhwc, info = _run(mnist_teacher)  # channels_last="auto"
    assert info.student_channels_last
    # returned like any other model: every weight in the default (NCHW) layout
    assert all(p.is_contiguous() for p in nhwc.parameters())
    nchw, nchw_info = _run(mnist_teacher, channels_last=False)
    assert not nchw_info.student_channels_last
    # the layout changes the convolution algorithms, not what is learned: the same loss
    # to within the noise Adam carries from any algorithm change (1.6% with one thread,
    # 2.3% with two, measured)
    assert abs(info.final_mse - nchw_info.final_mse) < 0.1 * nchw_info.final_mse
    with pytest.raises(ValueError, match="channels_last must be True, False or 'auto'"):
        KTPConfig(channels_last="nhwc")


def test_auto_nhwc_is_for_cpus_only():
    """'auto' leaves a GPU student in its own layout (NHWC was measured on CPUs only); the
    decision is made before any tensor moves, so no GPU is needed to check it."""
    from erm_surgery.methods.ktp.layout import student_in_channels_last

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU())
    x = torch.randn(1, 2, 8, 8)
    assert not student_in_channels_last(model, "auto", torch.device("cuda"), x)
    assert not student_in_channels_last(model, False, torch.device("cpu"), x)
    assert model[0].weight.is_contiguous()
    assert student_in_channels_last(model, "auto", torch.device("cpu"), x)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.training  # the probe's eval mode does not stick


def test_nhwc_weights_get_the_nhwc_strides_even_where_a_size_1_dim_hides_them():
    """A depthwise (C, 1, k, k), a 1 x 1 (C, K, 1, 1) or a one-channel stem weight is
    "channels_last contiguous" in NCHW strides too, and oneDNN reads those as NCHW: the
    teacher pass of efficientnet_b0 ran 4.6x slower so. Inside the block every 4-D weight
    has the strides Module.to(memory_format=channels_last) gives; after it, its own."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3),  # one-channel stem
        torch.nn.Conv2d(8, 8, 3, groups=8),  # depthwise
        torch.nn.Conv2d(8, 16, 1),  # pointwise
        torch.nn.Conv2d(16, 16, 3))  # plain
    own = {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()}
    with channels_last_weights(model):
        for name, p in model.named_parameters():
            if p.dim() == 4:
                want = torch.empty_like(p, memory_format=torch.channels_last).stride()
                assert p.stride() == want, name
    assert {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()} == own


@pytest.mark.parametrize("name", ["test_efficientnet", "test_convnext", "test_byobnet",
                                  "test_nfnet", "test_mambaout"])
def test_the_nhwc_student_default_across_tiny_timm_families(name):
    """channels_last='auto' on a CPU: each of these families steps in NHWC (none refuses
    it), and the student comes back finite, in the default layout, with the forget class
    blocked. G is set by hand (disjoint channels per class): this checks the layout path,
    not how well the student learns."""
    import timm

    import erm_surgery

    torch.manual_seed(0)
    teacher = erm_surgery.attach(timm.create_model(name, num_classes=10))
    separated(teacher, own=teacher.surgery.num_channels // 10)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(72, 3, 32, 32, generator=g),
                                          torch.arange(72) % 10)
    student, info = ktp(teacher, [3], data, config=KTPConfig(**SMALL))
    assert info.steps == 64 // SMALL["batch_size"]
    assert info.student_channels_last and info.teacher_channels_last
    assert all(p.is_contiguous() and torch.isfinite(p).all() for p in student.parameters())
    with torch.no_grad():
        assert (student.eval()(data.tensors[0][:16]).argmax(1) != 3).all()
