"""ERM training: loss pieces with known answers, the schedule, a small real run, resume."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers import separated
from torch.utils.data import Dataset, Subset

import erm_surgery as E
from erm_surgery.data import load_mnist5k
from erm_surgery.surgery.mask import ERMMask
from erm_surgery.training import g_metrics as metrics
from erm_surgery.training import train
from erm_surgery.training.losses import ERMConfig, erm_loss, inner_product, is_erm_epoch, l1_hinge
from erm_surgery.training.prohibition import prohibition_accuracy

HERE = Path(__file__).parent


# ----------------------------------------------------------------- known answers


def test_inner_product_and_l1_hinge_known_answers():
    ones = torch.ones(3, 4)
    assert inner_product(ones) == 12  # 3 pairs x 4 shared channels
    assert inner_product(torch.eye(4)) == 0
    assert l1_hinge(ones, alpha=12) == 0  # exactly on budget
    assert l1_hinge(ones, alpha=6) == 6  # each row 4 vs budget 2
    assert torch.isclose(l1_hinge(ones, alpha=6, p=2), torch.tensor(12.0).sqrt())


def test_g_metrics_known_answers():
    assert metrics.csi(torch.eye(5)) == 0
    assert torch.isclose(metrics.csi(torch.ones(4, 6)), torch.tensor(12.0))
    assert metrics.l1_density(torch.eye(4)) == 0.25
    assert metrics.ones_per_row(torch.eye(4)) == 1
    assert metrics.zero_rows(torch.tensor([[0.0, 0], [1, 0]])).tolist() == [True, False]


def test_projection_rows_and_channels():
    mask = ERMMask(3, 4)
    mask.G.data = torch.tensor([[0.2, 0.4, -0.1, 0.1], [2.0, 1.0, 0.0, 0.5], [0.0, 0, 0, 0]])
    mask.forgotten[1] = True
    mask.project_("row")
    assert torch.allclose(mask.G[0], torch.tensor([0.5, 1.0, 0.0, 0.25]))
    assert mask.G[1].abs().sum() == 0  # forgotten rows stay zero
    assert mask.G[2].abs().sum() == 0
    m2 = ERMMask(2, 2)
    m2.G.data = torch.tensor([[0.5, 0.2], [0.25, 0.4]])
    m2.project_("channel")
    assert torch.allclose(m2.G, torch.tensor([[1.0, 0.5], [0.5, 1.0]]))
    with pytest.raises(ValueError, match="row"):
        m2.project_("diagonal")


def test_prune_zeroes_small_entries_and_keeps_the_rest():
    mask = ERMMask(2, 4)
    mask.G.data = torch.tensor([[1.0, 0.09, 0.1, 0.0], [0.05, 1.0, 0.5, 0.099]])
    mask.prune_(0.1)
    assert torch.equal(mask.G, torch.tensor([[1.0, 0.0, 0.1, 0.0], [0.0, 1.0, 0.5, 0.0]]))
    assert mask.keep_mask([1]).tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="below"):
        mask.prune_(1.0)
    with pytest.raises(ValueError, match="prune_below"):
        ERMConfig(prune_below=-0.1)


def test_keep_mask_threshold():
    mask = ERMMask(3, 4)
    mask.G.data = torch.tensor([[1.0, 0.3, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    assert mask.keep_mask([0]).tolist() == [False, False, True, True]
    assert mask.keep_mask([0], threshold=0.5).tolist() == [False, True, True, True]
    assert mask.keep_mask([0, 1]).tolist() == [False, False, False, True]


def test_schedule():
    alternate = ERMConfig(erm_every=2, warmup_epochs=1)
    assert [is_erm_epoch(e, alternate) for e in range(6)] == [False, False, True, False, True,
                                                                False]
    reference = ERMConfig(erm_every=3, warmup_epochs=0)
    assert [is_erm_epoch(e, reference) for e in range(6)] == [False, False, True] * 2
    assert all(is_erm_epoch(e, ERMConfig(erm_every=1, warmup_epochs=0)) for e in range(3))
    with pytest.raises(ValueError, match="erm_every"):
        ERMConfig(erm_every=0)
    with pytest.raises(ValueError, match="projection"):
        ERMConfig(projection="col")


def test_erm_loss_is_one_forward_and_reaches_g():
    model = E.attach(timm.create_model("test_resnet", num_classes=10, in_chans=1))
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
    calls = []
    handle = model.model.fc.register_forward_hook(lambda *a: calls.append(1))
    loss, terms = erm_loss(model, x, y, ERMConfig(), return_terms=True)
    handle.remove()
    assert len(calls) == 1
    loss.backward()
    # only the rows of labels in the batch get a CE gradient; regularisers touch all rows
    assert model.erm.G.grad is not None and model.erm.G.grad.abs().sum() > 0
    assert set(terms) == {"ce", "l1", "inner", "prohibit", "permitted", "std", "logits"}
    with pytest.raises(TypeError, match="attach"):
        erm_loss(timm.create_model("test_resnet", num_classes=10), x, y)


def test_erm_loss_permitted_and_std_terms_are_what_they_say():
    """Issue 13's joint step: ``std`` is the standard path's CE and ``permitted`` the CE of
    the sample's own label with a random other class's channels prohibited, both from the
    one backbone pass; weights of 0 drop them from the loss."""
    torch.manual_seed(0)
    model = E.attach(timm.create_model("test_resnet", num_classes=10, in_chans=1)).eval()
    with torch.no_grad():
        model.erm.G.copy_((torch.rand_like(model.erm.G) > 0.7).float())
    x, y = torch.randn(6, 1, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    torch.manual_seed(1)
    loss, terms = erm_loss(model, x, y, ERMConfig(), return_terms=True)
    torch.manual_seed(1)
    other = (y + torch.randint(1, 10, y.shape)) % 10  # the draw erm_loss makes
    assert (other != y).all()
    with torch.no_grad():
        std = torch.nn.functional.cross_entropy(model(x), y)
        keep = (model.erm.G[other] <= 0).float()
        permitted = torch.nn.functional.cross_entropy(model(x, channel_mask=keep), y)
    assert terms["std"] == pytest.approx(std.item(), rel=1e-5)
    assert terms["permitted"] == pytest.approx(permitted.item(), rel=1e-5)
    paper = ERMConfig(permitted_weight=0.0, std_weight=0.0)
    torch.manual_seed(1)
    loss_paper, terms_paper = erm_loss(model, x, y, paper, return_terms=True)
    assert terms_paper["std"] == 0 and terms_paper["permitted"] == 0
    assert loss.item() == pytest.approx(loss_paper.item() + std.item() + permitted.item(),
                                        rel=1e-5)
    with pytest.raises(ValueError, match="permitted_weight"):
        ERMConfig(permitted_weight=-1.0)


def test_train_rejects_bad_arguments():
    model = E.attach(timm.create_model("test_resnet", num_classes=10, in_chans=1))
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 32, 32), torch.arange(8) % 10)
    with pytest.raises(TypeError, match="attach"):
        train(model.model, data, epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        train(model, data, epochs=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # includes G
    with pytest.raises(ValueError, match="G"):
        train(model, data, epochs=1, optimizer=opt)


# ----------------------------------------------------------------- a small real run


@pytest.fixture(scope="module")
def mnist_small():
    train_set, test_set = load_mnist5k(n_train=4000)
    return Subset(train_set, range(2000)), Subset(test_set, range(600))


def test_erm_training_reaches_the_paper_properties_on_real_digits(mnist_small, tmp_path):
    """A small version of the issue's target: accuracy kept, G sparse and orthogonal,
    prohibiting a class's channels removes that class only."""
    train_set, test_set = mnist_small
    base = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    plain = E.attach(base)
    std_only = ERMConfig(erm_every=10**6, warmup_epochs=0)
    # batch 64: ~32 steps per epoch, enough G updates in two ERM epochs
    ref = train(plain, train_set, epochs=6, val_data=test_set, config=std_only,
                batch_size=64, show_progress=False)
    model = E.attach(base)
    result = train(model, train_set, epochs=6, val_data=test_set, show_progress=False,
                   batch_size=64, output_dir=tmp_path)
    last = result.history[-1]
    assert [h.path for h in result.history] == ["std", "erm", "erm", "erm", "erm", "erm"]
    # measured (2 threads): STD 0.958 (plain 0.958), CSI 3.1, density 0.092, prohibited
    # 0.000, permitted 0.959; the paper's alternate objective: 0.947, 0.004, 0.947
    assert ref.health is None  # no ERM epoch: G untrained, no health to report
    assert result.health is not None
    assert last.val_accuracy >= ref.history[-1].val_accuracy - 0.01
    assert last.csi < 9.0, "rows of G should be nearly orthogonal (max is 90)"
    assert 0.02 <= last.l1_density <= 0.2
    table = prohibition_accuracy(model, test_set)
    assert table.mean_prohibited <= 0.05
    assert table.mean_permitted >= table.std_accuracy - 0.01
    saved = json.loads((tmp_path / "history.json").read_text())
    assert len(saved["history"]) == 6 and saved["config"]["lambda2"] == ERMConfig().lambda2


def test_train_prunes_g_only_when_asked_and_only_after_the_last_erm_epoch(mnist_small):
    train_set, _ = mnist_small
    data = Subset(train_set, range(256))

    def run(**fields):
        torch.manual_seed(0)
        model = E.attach(timm.create_model("test_resnet", num_classes=10, in_chans=1))
        train(model, data, epochs=3, batch_size=64, show_progress=False,
              config=ERMConfig(warmup_epochs=1, erm_every=1, **fields))
        return model.erm.G.detach()

    small = lambda G: ((G > 0) & (G < 0.3)).sum()  # noqa: E731
    default, pruned = run(), run(prune_below=0.3)
    assert small(default) > 0  # Adam leaves small positive entries: the default keeps them
    assert small(pruned) == 0
    # the same run up to the prune: every entry >= 0.3 is untouched
    assert torch.equal(pruned, default * (default >= 0.3))


class Crashing(Dataset):
    """Raises after ``limit`` samples: a job killed in the middle of an epoch."""

    def __init__(self, base, limit):
        self.base, self.limit, self.seen = base, limit, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.seen += 1
        if self.seen > self.limit:
            raise RuntimeError("killed")
        return self.base[i]


def test_resume_after_a_crash_continues_exactly(mnist_small, tmp_path):
    train_set = Subset(mnist_small[0], range(256))
    start = E.attach(timm.create_model("test_resnet", num_classes=10, in_chans=1))
    kwargs = dict(epochs=3, batch_size=64, show_progress=False, checkpoint_every=1,
                  config=ERMConfig(warmup_epochs=0))
    full = train(copy.deepcopy(start), train_set, output_dir=tmp_path / "a", **kwargs)
    crashing = Crashing(train_set, limit=256 * 2 + 100)  # dies inside the third epoch
    with pytest.raises(RuntimeError, match="killed"):
        train(copy.deepcopy(start), crashing, output_dir=tmp_path / "b", **kwargs)
    assert E.read_metadata(tmp_path / "b" / "checkpoint" / "model.safetensors")
    resumed = train(copy.deepcopy(start), train_set, output_dir=tmp_path / "b",
                    resume_from=tmp_path / "b" / "checkpoint", **kwargs)
    assert [h.epoch for h in resumed.history] == [0, 1, 2]
    for (name, a), b in zip(full.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not list((tmp_path / "b").glob(".*")), "no temp folders left behind"


# ----------------------------------------------------------------- two processes


def test_two_cpu_processes_with_torchrun(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000),
           str(HERE / "dist_train_script.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["g_sum"] == ranks[1]["g_sum"] and ranks[0]["w_sum"] == ranks[1]["w_sum"]
    assert ranks[0]["g_equal_across_ranks"] and ranks[0]["w_equal_across_ranks"]
    # metrics over the whole validation set: 101 samples, none dropped or duplicated
    assert ranks[0]["val_seen"] == ranks[1]["val_seen"] == 101
    assert abs(ranks[0]["val_accuracy"] - ranks[0]["reference_val_accuracy"]) < 1e-9
    assert (tmp_path / "out" / "history.json").exists()
    assert (tmp_path / "out" / "checkpoint" / "model.safetensors").exists()
    # KTP under the same two processes: the students agree, class 1 is gone on both
    for rank in ranks:
        assert rank["ktp_equal_across_ranks"] and rank["ktp_forgotten"] == [1]
        assert not rank["ktp_predicts_forgotten"]
        assert rank["ktp_samples"] == rank["retain_count"]


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one mixed-precision setting per process; reset it around a test
    that needs another one (accelerate's own tests do the same)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_second_mixed_precision_setting_is_a_clear_error(fresh_accelerate_state):
    from erm_surgery.training import make_accelerator

    make_accelerator()
    with pytest.raises(ValueError, match="pass it as accelerator="):
        make_accelerator("bf16")


@pytest.mark.filterwarnings("ignore:knowledge entanglement")  # one short epoch: G still dense
def test_bf16_autocast_and_channels_last_on_cpu(mnist_small, fresh_accelerate_state):
    """Mixed precision (Accelerate's CPU bf16 autocast) and NHWC run through training and
    KTP; the numbers stay close to the fp32 NCHW run."""
    from accelerate.state import AcceleratorState

    from erm_surgery.methods.ktp import KTPConfig, ktp
    from erm_surgery.training import make_accelerator

    train_set, test_set = mnist_small
    train_set = Subset(train_set, range(512))
    base = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    config = ERMConfig(warmup_epochs=0, erm_every=1)  # every epoch takes the ERM path
    ref = train(E.attach(base), train_set, epochs=1, batch_size=64, config=config,
                show_progress=False)
    model = E.attach(base)
    AcceleratorState._reset_state(reset_partial_state=True)
    bf16 = make_accelerator("bf16")
    fast = train(model, train_set, epochs=1, batch_size=64, config=config,
                 show_progress=False, accelerator=bf16, channels_last=True)
    assert model.model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert abs(fast.history[0].loss - ref.history[0].loss) < 0.05
    assert (model.erm.G - ref.model.erm.G).abs().mean() < 0.03  # chaotic, but close
    separated(model)  # one epoch does not separate the classes; KTP would refuse
    student, info = ktp(model, [3], train_set, accelerator=bf16,
                        config=KTPConfig(epochs=1, channels_last=True, show_progress=False))
    # the accelerator's autocast runs the student's steps; KTP adds none of its own
    assert info.student_precision == "bf16 (accelerator)"
    with torch.no_grad():
        pred = student(torch.stack([test_set[i][0] for i in range(200)])).argmax(1)
    assert not (pred == 3).any()


def test_make_optimizer_fuses_where_pytorch_can_and_falls_back_where_it_cannot():
    from erm_surgery.training import make_optimizer

    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    sgd = make_optimizer(torch.optim.SGD, params, lr=0.1, momentum=0.9)
    assert sgd.defaults["fused"] is True and sgd.defaults["momentum"] == 0.9
    lbfgs = make_optimizer(torch.optim.LBFGS, params, lr=0.1)  # takes no fused=
    assert isinstance(lbfgs, torch.optim.LBFGS) and "fused" not in lbfgs.defaults
    # the fused step computes the same update as the loop over parameters
    ref = [p.detach().clone().requires_grad_() for p in params]
    loop = torch.optim.Adam(ref, lr=0.01, weight_decay=5e-4, foreach=False)
    fused = make_optimizer(torch.optim.Adam, params, lr=0.01, weight_decay=5e-4)
    for _ in range(3):
        for group in (params, ref):
            for p in group:
                p.grad = torch.ones_like(p)
        loop.step()
        fused.step()
    for a, b in zip(params, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_two_digit_mnist_has_100_real_classes():
    from erm_surgery.data import load_mnist5k, load_two_digit_mnist

    train_set, test_set = load_two_digit_mnist(per_class_train=3, per_class_test=2, size=16)
    x, y = train_set.tensors
    assert x.shape == (300, 1, 16, 32) and test_set.tensors[0].shape == (200, 1, 16, 32)
    assert torch.equal(torch.bincount(y, minlength=100), torch.full((100,), 3))
    digits_train, digits_test = load_mnist5k(size=16)
    # class 10a + b: the left half is a train image of digit a, the right one of digit b
    for k in (0, 125, 299):
        left, right = x[k, :, :, :16], x[k, :, :, 16:]
        a, b = divmod(int(y[k]), 10)
        for half, digit in ((left, a), (right, b)):
            match = (digits_train.tensors[0] == half).flatten(1).all(1)
            assert match.any() and (digits_train.tensors[1][match] == digit).all()
    # test pairs come from the test digits only
    half = test_set.tensors[0][0, :, :, :16]
    assert (digits_test.tensors[0] == half).flatten(1).all(1).any()
    assert not (digits_train.tensors[0] == half).flatten(1).all(1).any()
    again = load_two_digit_mnist(per_class_train=3, per_class_test=2, size=16)
    assert torch.equal(again[0].tensors[0], x)  # a fixed seed
    with pytest.raises(ValueError, match="per_class_train"):
        load_two_digit_mnist(per_class_train=0)


# ------------------------------------------------------- the default optimiser by family


class _LayerNormAndBatchNorm(torch.nn.Module):
    """A CNN with both norms: BatchNorm decides (the rule is LayerNorm *only*)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.ln = torch.nn.LayerNorm(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.ln(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


def test_the_default_optimiser_follows_the_model_family():
    from erm_surgery.training.optim import default_optimizer

    convnext = timm.create_model("test_convnext", num_classes=10, in_chans=1)
    assert default_optimizer(convnext).name == "adamw"  # LayerNorm only: SGD collapses it
    for model in (timm.create_model("test_resnet", num_classes=10, in_chans=1),
                  timm.create_model("test_efficientnet", num_classes=10, in_chans=1),
                  _LayerNormAndBatchNorm()):
        assert default_optimizer(model).name == "sgd"


def test_train_builds_the_family_optimiser_and_says_which(mnist_small):
    data = Subset(mnist_small[0], range(64))
    torch.manual_seed(0)
    convnext = E.attach(timm.create_model("test_convnext", num_classes=10, in_chans=1))
    result = train(convnext, data, epochs=1, show_progress=False)
    assert result.optimizer.startswith("adamw lr=0.002 weight_decay=0.05 (default:")
    assert json.loads(result.to_json())["optimizer"] == result.optimizer
    with pytest.warns(UserWarning, match="lr=0.05 goes to adamw"):  # an SGD value
        train(convnext, data, epochs=1, show_progress=False, lr=0.05)
    # lr= and weight_decay= still set the default optimiser's values
    result = train(convnext, data, epochs=1, show_progress=False, lr=0.01, weight_decay=0.0)
    assert result.optimizer.startswith("adamw lr=0.01 weight_decay=0 ")
    resnet = E.attach(timm.create_model("test_resnet", num_classes=10, in_chans=1))
    assert train(resnet, data, epochs=1, show_progress=False).optimizer.startswith(
        "sgd lr=0.05 weight_decay=0.0005 ")
    own = torch.optim.SGD([p for p in resnet.model.parameters()], lr=0.01)
    assert train(resnet, data, epochs=1, show_progress=False,
                 optimizer=own).optimizer == "SGD (the caller's)"


def test_a_recipe_resolves_auto_to_the_family_optimiser():
    from erm_surgery.methods.baselines import RetrainConfig
    from erm_surgery.training.optim import Recipe

    convnext = timm.create_model("test_convnext", num_classes=10, in_chans=1)
    resnet = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    auto = RetrainConfig()
    assert (auto.optimizer, auto.lr, auto.weight_decay) == ("auto", None, None)
    c = auto.resolved(convnext)
    assert (c.optimizer, c.lr, c.weight_decay) == ("adamw", 2e-3, 0.05)
    assert isinstance(c.build_optimizer(list(convnext.parameters())), torch.optim.AdamW)
    r = RetrainConfig(lr=0.01).resolved(resnet)  # an explicit value is kept
    assert (r.optimizer, r.lr, r.weight_decay) == ("sgd", 0.01, 5e-4)
    assert RetrainConfig(optimizer="adam", lr=0.001).resolved(convnext).optimizer == "adam"
    with pytest.raises(ValueError, match="auto"):  # needs the model
        auto.build_optimizer(list(resnet.parameters()))
    with pytest.raises(ValueError, match="not available for Recipe"):
        Recipe(optimizer="auto")
    with pytest.raises(ValueError, match="lr"):
        RetrainConfig(optimizer="sgd", lr=None)
