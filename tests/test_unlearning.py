"""KTP unlearning on a small real case, sequential requests, checkpoints, bad input."""

import copy
import re
import warnings
from dataclasses import replace

import pytest
import timm
import torch
import torchvision
from helpers import accuracy, entangled_but_separated, separated
from torch.utils.data import DataLoader, Dataset, Subset

import erm_surgery as E
from erm_surgery.methods.ktp import KTPConfig, ktp
from erm_surgery.unlearning import available_methods, unlearn, unlearn_checkpoint

FAST = KTPConfig(show_progress=False)
# mechanics-only tests distil one epoch on 600 samples; quality tests use the defaults
QUICK = KTPConfig(epochs=1, show_progress=False)


@pytest.fixture
def trained(mnist_teacher):
    """The session's ERM-trained tiny ResNet on 2,000 real MNIST digits (conftest.py):
    ``(teacher, train_set, test_set)``."""
    return mnist_teacher.model, mnist_teacher.train, mnist_teacher.test


@pytest.fixture(scope="module")
def forgot_3(_mnist_master):
    """KTP with the default config forgetting class 3, run once for the two tests that
    start from it: ``(teacher, student, info)``, the teacher a copy of the session's one
    (read-only: a test that changes the student copies it first)."""
    teacher = copy.deepcopy(_mnist_master.model)
    return (teacher, *ktp(teacher, [3], copy.deepcopy(_mnist_master.train), config=FAST))


def test_ktp_forgets_one_class_and_keeps_the_rest(mnist_teacher, forgot_3):
    train_set, test_set = mnist_teacher.train, mnist_teacher.test
    teacher, student, info = forgot_3
    retain = [c for c in range(10) if c != 3]
    assert accuracy(student, test_set, [3]) == 0.0
    assert accuracy(student, train_set, [3]) == 0.0
    assert accuracy(student, test_set, retain) >= accuracy(teacher, test_set, retain) - 0.05
    assert student.erm.G[3].abs().sum() == 0 and student.erm.forgotten_classes == [3]
    assert torch.equal(student.erm.G[retain], teacher.erm.G[retain])
    # the teacher is untouched (the trained state, bit for bit), and the student is a
    # separate, fresh model
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, mnist_teacher.state[key]), key
    assert not {p.data_ptr() for p in student.parameters()} & {
        p.data_ptr() for p in teacher.parameters()}
    assert info.not_reinitialised == []
    assert info.samples == sum(1 for _, y in train_set if y != 3)  # retain data only
    assert info.prohibited_channels == int((teacher.erm.G[3] > 0).sum())
    assert student.unlearning_info is info


def test_forget_logits_never_win(trained):
    teacher, train_set, _ = trained
    student = unlearn(teacher, [2, 7], Subset(train_set, range(600)), config=QUICK)
    torch.manual_seed(1)
    with torch.no_grad():
        for scale in (0.1, 1.0, 10.0, 100.0):
            pred = student(torch.randn(512, 1, 32, 32) * scale).argmax(1)
            assert not torch.isin(pred, torch.tensor([2, 7])).any()
    head = student.model.get_classifier()
    assert head.weight[[2, 7]].abs().sum() == 0
    keep = teacher.erm.keep_mask([2, 7])
    assert head.weight[:, ~keep].abs().sum() == 0, "prohibited channels cut from the head"


def test_sequential_requests_forget_both(trained, forgot_3):
    teacher, train_set, test_set = trained
    once = copy.deepcopy(forgot_3[1])  # the first request: class 3, default config
    twice = unlearn(once, [5], train_set, config=KTPConfig(train_head=True,
                                                          show_progress=False))
    assert twice.erm.forgotten_classes == [3, 5]
    assert accuracy(twice, test_set, [3]) == 0.0 and accuracy(twice, test_set, [5]) == 0.0
    retain = [c for c in range(10) if c not in (3, 5)]
    # measured: 0.957 vs the teacher's 0.962 (forgetting 1, then 5: 0.952 vs 0.956)
    assert accuracy(twice, test_set, retain) >= accuracy(teacher, test_set, retain) - 0.08
    # the second request fine-tuned the head: what either request blocked stays blocked
    head = twice.model.get_classifier()
    for model, forget in ((teacher, [3]), (once, [5])):
        assert head.weight[:, ~model.erm.keep_mask(forget)].abs().sum() == 0
    assert head.weight[[3, 5]].abs().sum() == 0
    assert torch.all(head.bias[[3, 5]] == FAST.forget_bias)
    with pytest.raises(E.UnlearningError, match="already forgotten"):
        unlearn(twice, [3], train_set, config=FAST)


def test_train_head_fine_tunes_only_the_kept_head_entries(trained):
    teacher, train_set, _ = trained
    data = Subset(train_set, range(600))
    keep = teacher.erm.keep_mask([2])
    rows = [c for c in range(10) if c != 2]
    teacher_head = teacher.model.get_classifier()
    paper = KTPConfig.paper(epochs=1, show_progress=False)
    assert (paper.optimizer, paper.label_weight, paper.train_head) == ("sgd", 0.0, False)
    trained_head = KTPConfig(epochs=1, train_head=True, show_progress=False)
    for config, trains in ((trained_head, True), (QUICK, False), (paper, False)):
        head = ktp(teacher, [2], data, config=config)[0].model.get_classifier()
        kept_before = teacher_head.weight[rows][:, keep]
        assert torch.equal(head.weight[rows][:, keep], kept_before) is not trains
        assert head.weight[:, ~keep].abs().sum() == 0 and head.weight[2].abs().sum() == 0
        assert head.bias[2] == config.forget_bias


def test_four_classes_keep_retain_accuracy(trained):
    """The retain-label term: on this small set the paper's recipe loses 6.0 points of
    retain accuracy for these four classes (3.4 with another seed); the default, over
    three seeds, about one. One run is not enough: single runs of the default on this
    teacher spread from 0 to -3.6 points (18 runs, 2026-12-03, float32 and bfloat16 steps
    alike: means -1.2 and -1.3), so the mean of three is bounded."""
    teacher, train_set, test_set = trained
    forget = [1, 4, 6, 9]
    retain = [c for c in range(10) if c not in forget]
    gaps = []
    for seed in (0, 1, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # entanglement: a 6-epoch teacher shares channels
            student, _ = ktp(teacher, forget, train_set, config=replace(FAST, seed=seed))
        assert accuracy(student, test_set, forget) == 0.0
        gaps.append(accuracy(student, test_set, retain) - accuracy(teacher, test_set, retain))
    assert sum(gaps) / 3 >= -0.025, gaps


@pytest.mark.filterwarnings("ignore:knowledge entanglement")
def test_logit_term_runs_from_the_same_forward_and_keeps_the_guarantee(trained):
    teacher, train_set, test_set = trained
    config = KTPConfig(epochs=1, logit_weight=1.0, label_weight=0.0, train_head=True,
                       show_progress=False)
    student, _ = ktp(teacher, [6], Subset(train_set, range(600)), config=config)
    assert accuracy(student, test_set, [6]) == 0.0
    head = student.model.get_classifier()
    assert head.weight[6].abs().sum() == 0 and head.bias[6] == config.forget_bias
    assert not torch.equal(head.weight[0], teacher.model.get_classifier().weight[0])


def test_retain_label_loss_ignores_samples_without_a_label():
    from erm_surgery.methods.ktp.ktp import _retain_label_loss

    logits = torch.randn(4, 10)
    assert _retain_label_loss(logits, torch.full((4,), -100)) == 0  # not NaN
    labels = torch.tensor([3, -100, 5, -100])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert torch.allclose(_retain_label_loss(logits, labels), expected)


class ScaledHeadNet(torch.nn.Module):
    """A head that also reads a parameter outside the head (a learned logit scale): it has
    no head-only graph, so the retain-label term cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)
        self.log_scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3))) * self.log_scale.exp()


def test_a_head_without_its_own_graph_skips_the_label_term_with_a_warning():
    model = E.attach(ScaledHeadNet(), input_size=(1, 32, 32))
    assert not model.has_head_graph
    with torch.no_grad():
        model.erm.G.zero_()
        model.erm.G[0, :2] = 1.0
    data = torch.utils.data.TensorDataset(torch.randn(64, 1, 32, 32), torch.arange(64) % 10)
    with pytest.warns(UserWarning, match="label_weight"):
        student, _ = ktp(model, [0], data, config=QUICK)
    model.train()
    with pytest.raises(E.UnlearningError, match="logit_weight"):
        ktp(model, [0], data, config=KTPConfig(logit_weight=1.0, show_progress=False))
    assert model.training, "refused before the teacher was touched"
    # no term reaches the head, so it stays FKT's copy: channels 0-1 and class 0 cut
    expected = model.model.fc.weight.detach().clone()
    expected[:, :2] = 0
    expected[0] = 0
    assert torch.equal(student.model.fc.weight, expected)


def test_unlearn_checkpoint_replaces_the_file(trained, tmp_path):
    teacher, train_set, test_set = trained
    path = E.save(teacher, tmp_path / "model.safetensors", extra={"trained_by": "ci"})
    base = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    info = unlearn_checkpoint(path, [4], Subset(train_set, range(600)), base, config=QUICK)
    assert info.forget_classes == [4]
    meta = E.read_metadata(path)
    assert meta["forgotten_classes"] == [4]
    assert meta["extra"]["unlearning"]["forget_classes"] == [4]
    assert meta["extra"]["trained_by"] == "ci", "earlier metadata is kept"
    unlearn_checkpoint(path, [6], Subset(train_set, range(600)), base, config=QUICK)
    meta = E.read_metadata(path)
    assert meta["forgotten_classes"] == [4, 6]
    assert [h["forget_classes"] for h in meta["extra"]["unlearning_history"]] == [[4], [6]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    reloaded = E.load(path, base)
    assert accuracy(reloaded, test_set, [4]) == 0.0


def test_entanglement_is_reported_with_numbers():
    model = E.attach(timm.create_model("test_resnet", num_classes=3, in_chans=1))
    entangled_but_separated(model, shared=10, own=3)  # 10 shared + 3 own channels a class
    data = torch.utils.data.TensorDataset(torch.randn(24, 1, 32, 32), torch.arange(24) % 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = ktp(model, [0], data, config=KTPConfig(epochs=1, show_progress=False))
    text = " ".join(str(w.message) for w in caught)
    assert "entanglement" in text and "77% of class 1" in text
    assert info.retain_channels_lost == pytest.approx({1: 10 / 13, 2: 10 / 13})


def test_dataloader_input_and_distilling_on_all_data(trained):
    teacher, train_set, test_set = trained
    loader = DataLoader(Subset(train_set, range(600)), batch_size=100)
    student, info = ktp(teacher, [0], loader,
                        config=KTPConfig(distill_on="all", epochs=1, show_progress=False))
    assert info.samples == 600
    assert accuracy(student, test_set, [0]) == 0.0


class NoLabels(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.zeros(1, 32, 32)


def test_bad_model_data_and_method(trained):
    teacher, train_set, _ = trained
    with pytest.raises(E.UnlearningError, match="never attached"):
        unlearn(timm.create_model("test_resnet", num_classes=10), [1], train_set)
    with pytest.raises(E.UnlearningError, match="no labels"):
        unlearn(teacher, [1], NoLabels(), config=FAST)
    with pytest.raises(ValueError, match="unknown unlearning method"):
        unlearn(teacher, [1], train_set, method="magic")
    assert "ktp" in available_methods()


class TwoHeadNet(torch.nn.Module):
    """Parallel classifiers averaged into the logits, like a distilled model's head and
    head_dist: FKT must block the forget classes in both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 10)
        self.head_dist = torch.nn.Linear(16, 10)

    def forward(self, x):
        pooled = torch.relu(self.conv(x)).mean((2, 3))
        return (self.head(pooled) + self.head_dist(pooled)) / 2


@pytest.mark.filterwarnings("ignore:knowledge entanglement")  # untrained G: every channel shared
def test_parallel_heads_are_both_blocked(trained):
    _, train_set, _ = trained
    model = E.attach(TwoHeadNet(), input_size=(1, 32, 32))
    from erm_surgery.methods.ktp.fkt import head_roles

    assert head_roles(model) == (["head", "head_dist"], ["head", "head_dist"])
    separated(model, own=1)
    student = unlearn(model, [2], Subset(train_set, range(300)), config=QUICK)
    for name in ("head", "head_dist"):
        layer = student.model.get_submodule(name)
        assert layer.weight[2].abs().sum() == 0 and layer.bias[2] < -1e3
    with torch.no_grad():
        pred = student(torch.randn(256, 1, 32, 32) * 10).argmax(1)
    assert not (pred == 2).any()


def test_head_roles_of_a_sequential_head():
    from erm_surgery.methods.ktp.fkt import head_roles

    # torchvision's MobileNetV3 head (Linear -> Hardswish -> Linear on a flat vector) keeps
    # the mask on the map, so the head is a sequence (timm's now starts at the classifier)
    model = E.attach(torchvision.models.mobilenet_v3_small(num_classes=10),
                     input_size=(3, 64, 64))
    readers, classifiers = head_roles(model)
    assert readers == ["classifier.0"] and classifiers == ["classifier.3"]


def test_ktp_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_workers"):
        KTPConfig(num_workers=-1)
    with pytest.raises(ValueError, match="distill_on"):
        KTPConfig(distill_on="forget")


def test_unlearn_checkpoint_refuses_a_method_load_cannot_rebuild(trained, tmp_path):
    teacher, train_set, _ = trained
    path = E.save(teacher, tmp_path / "model.safetensors")
    before = path.read_bytes()
    base = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    data = Subset(train_set, range(300))
    # sisa returns an ensemble, which load() cannot rebuild: refused before any work
    with pytest.raises(E.UnlearningError, match="cannot rebuild"):
        unlearn_checkpoint(path, [4], data, base, method="sisa")
    assert path.read_bytes() == before
    # ESC adds projection modules; load() rebuilds them, so its result can replace the file
    info = unlearn_checkpoint(path, [4], data, base, method="esc")
    assert info.method == "esc" and path.read_bytes() != before
    reloaded = E.load(path, base)
    assert "esc_projection" in dict(reloaded.model.named_modules())
    assert E.read_metadata(path)["extra"]["unlearning"]["method"] == "esc"


def test_ktp_leaves_the_global_rng_and_rejects_a_foreign_config(trained):
    teacher, train_set, _ = trained
    state = torch.get_rng_state()
    ktp(teacher, [4], Subset(train_set, range(300)), config=QUICK)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(TypeError, match="KTPConfig"):
        ktp(teacher, [4], train_set, config=E.ERMConfig())


@pytest.mark.filterwarnings("ignore:knowledge entanglement")
@pytest.mark.parametrize("global_pool", ["catavgmax", "avg"])
def test_fkt_cuts_the_right_columns_of_concatenated_pooling(global_pool):
    """timm's catavgmax feeds the head [avg(K), max(K)]: a prohibited channel k is the
    head's columns k and K + k, not two neighbouring columns."""
    model = E.attach(timm.create_model("test_resnet", num_classes=10, in_chans=1,
                                       global_pool=global_pool))
    K = model.surgery.num_channels
    with torch.no_grad():
        model.erm.G.zero_()
        model.erm.G[0, :5] = 1.0
    data = torch.utils.data.TensorDataset(torch.randn(40, 1, 32, 32), torch.arange(40) % 10)
    head = ktp(model, [0], data, config=QUICK)[0].model.get_classifier()
    cut = (head.weight[1:] == 0).all(0).nonzero().flatten().tolist()
    copies = head.weight.shape[1] // K
    assert cut == [c * K + k for c in range(copies) for k in range(5)]


class FlattenHeadNet(torch.nn.Module):
    """A VGG-style head: the (K, H, W) map flattened channel-major into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, stride=8, padding=1)  # 32x32 -> 8 x 4 x 4
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.filterwarnings("ignore:knowledge entanglement")
def test_fkt_cuts_every_position_of_a_prohibited_channel_in_a_flattened_head():
    model = E.attach(FlattenHeadNet(), input_size=(1, 32, 32))
    with torch.no_grad():
        model.erm.G.zero_()
        model.erm.G[0, [1, 6]] = 1.0
    data = torch.utils.data.TensorDataset(torch.randn(40, 1, 32, 32), torch.arange(40) % 10)
    head = ktp(model, [0], data, config=QUICK)[0].model.fc
    cut = (head.weight[1:] == 0).all(0).nonzero().flatten().tolist()
    assert cut == [k * 16 + s for k in (1, 6) for s in range(16)]


def test_check_separation_warns_for_a_few_entangled_classes_and_refuses_many():
    """A retain class whose channels all lie in the forget classes' rows cannot be
    represented: one such class in ten is entanglement (the request goes on and the
    entanglement warning names it; the two-digit class 04 inside 40's row), most of them is
    a G that never separated."""
    from erm_surgery.errors import UnlearningError
    from erm_surgery.unlearning import check_separation
    from erm_surgery.unlearning.request import entanglement_message

    G = torch.zeros(10, 20)
    for c in range(10):
        G[c, 2 * c: 2 * c + 2] = 1.0  # disjoint rows
    G[4] = 0
    G[4, 0] = 1.0  # class 4 uses one channel, which class 0 also uses
    keep = check_separation(G, [0, 1])
    assert keep.tolist() == [False] * 4 + [True] * 16
    lost = {r: (1.0 if r == 4 else 0.0) for r in range(2, 10)}
    message = entanglement_message([0, 1], lost, 0.3)
    assert re.search(r"entanglement.*class\(es\) 4 .*1 of 8", message)
    assert entanglement_message([0, 1], {r: 0.0 for r in range(2, 10)}, 0.3) is None
    assert "40% of class 3" in entanglement_message([0, 1], {3: 0.4, 5: 0.1}, 0.3)
    starved = G.clone()
    starved[2:] = 0
    starved[2:, 0] = 1.0  # every retain class reads only channel 0
    with pytest.raises(UnlearningError, match="has not separated.*8 of 8"):
        check_separation(starved, [0, 1])
