"""Drop-in behaviour: unlearn without a data argument, refusing an unseparated G, frozen
backbones, and leaving the caller's process (Accelerator settings, RNG streams) as it was."""

import copy
import random
import warnings

import numpy as np
import pytest
import timm
import torch
from helpers import entangled_but_separated
from torch.utils.data import TensorDataset

import erm_surgery as E
from erm_surgery.errors import UnlearningError

QUICK = {"epochs": 1, "batch_size": 16, "show_progress": False}


def tiny_data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 32, 32, generator=g), torch.arange(n) % 10)


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=10, in_chans=1)


def separated(model: E.ERMModel) -> E.ERMModel:
    """G with 4 own channels per class and the rest unused: KTP may run."""
    with torch.no_grad():
        model.erm.G.zero_()
        for c in range(10):
            model.erm.G[c, 4 * c:4 * c + 4] = 1.0
    return model


def train(model: E.ERMModel, data, **kwargs) -> E.TrainResult:
    return E.train(model, data, epochs=1, batch_size=16, show_progress=False, **kwargs)


def test_unlearn_without_data_uses_the_training_data():
    data = tiny_data()
    model = E.attach(tiny_net())
    with pytest.raises(UnlearningError, match=r"erm_surgery.unlearn\(model, classes, data\)"):
        E.unlearn(model, [3])
    train(model, data)
    assert model.training_data.data is data  # a reference, not a copy
    assert "training_data" not in str(list(model.state_dict()))
    twin = copy.deepcopy(model)
    assert twin.training_data is model.training_data  # deepcopy shares the data
    separated(model)
    student = E.unlearn(model, [3], **QUICK)
    assert student.unlearning_info.forget_classes == [3]
    assert student.erm.forgotten_classes == [3]
    # the registry wrapper (a method called directly) takes no data either
    plain = E.unlearn(model, [2], method="finetune", epochs=1, show_progress=False)
    assert plain.unlearning_info.forget_classes == [2]


@pytest.mark.parametrize("case", ["untrained", "ema", "starved"])
def test_a_g_that_has_not_separated_the_classes_is_refused_before_any_work(case):
    model = E.attach(tiny_net())
    G = model.erm.G
    with torch.no_grad():
        if case == "ema":  # an average of separated rows: every entry a little above 0
            separated(model)
            G.mul_(0.9).add_(0.01)
        elif case == "starved":  # classes 0, 1 and 3 use only channels 0-7, all class 5's
            separated(model)
            G[5, :8] = 1.0
            G[3, :] = 0.0
            G[3, :8] = 1.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {"untrained": r"cover all 96 channels.*never been trained",
                "ema": r"cover all 96 channels.*96 of 96 channels are in use",
                "starved": r"every channel that class\(es\) 0, 1, 3 use \(3 of 9 retain"}[case]
    forget = [5] if case == "starved" else [3]
    with pytest.raises(UnlearningError, match=expected) as err:
        E.unlearn(model, forget, tiny_data(), **QUICK)
    assert "Nothing was changed" in str(err.value) and "train() ends with an ERM health" in str(
        err.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.erm.forgotten_classes == []
    if case == "ema":  # the documented fixes: the live model's G, or a threshold above noise
        student = E.unlearn(model, [3], tiny_data(), threshold=0.02, **QUICK)
        assert student.erm.forgotten_classes == [3]
        live = separated(E.attach(tiny_net()))
        model.erm.load_state_dict(live.erm.state_dict())
        assert E.unlearn(model, [3], tiny_data(), **QUICK).erm.forgotten_classes == [3]


def test_entanglement_warning_is_short():
    model = entangled_but_separated(E.attach(tiny_net()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        E.unlearn(model, [3], tiny_data(), **QUICK)
    text = [str(w.message) for w in caught if "entanglement" in str(w.message)]
    assert len(text) == 1 and "worst 3 of 9 classes" in text[0]
    assert text[0].count("% of class") == 3


@pytest.mark.parametrize("method", ["ktp", "finetune"])
def test_a_frozen_backbone_unlearns(method):
    model = separated(E.attach(tiny_net()))
    names = [n for n, _ in model.model.named_parameters()]
    for name, p in model.model.named_parameters():
        p.requires_grad_(name.startswith("fc."))  # everything but the head frozen
    flags = {n: p.requires_grad for n, p in model.model.named_parameters()}
    student = E.unlearn(model, [3], tiny_data(), method=method, **(
        QUICK if method == "ktp" else {"epochs": 1, "show_progress": False}))
    assert {n: p.requires_grad for n, p in model.model.named_parameters()} == flags
    if method == "ktp":  # the fresh student trained its backbone
        fresh, _ = E.unlearning.request.reinitialised(model, 0)
        moved = [n for n, p in student.model.named_parameters()
                 if not n.startswith("fc.") and p.numel()
                 and not torch.equal(p, dict(fresh.model.named_parameters())[n])]
        assert len(moved) > len(names) // 2
    for p in model.model.parameters():
        p.requires_grad_(False)
    if method == "ktp":  # everything frozen: KTP still trains its fresh student
        E.unlearn(model, [3], tiny_data(), **QUICK)
    else:
        with pytest.raises(UnlearningError, match="no parameter of the model requires grad"):
            E.unlearn(model, [3], tiny_data(), method=method, epochs=1, show_progress=False)


def test_the_callers_accelerator_and_rng_are_left_alone():
    from accelerate import Accelerator

    data = tiny_data()
    acc = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = E.attach(tiny_net())
    train(model, data)  # the library's own default accelerator
    assert acc.gradient_accumulation_steps == 4
    train(model, data, accelerator=acc)
    assert acc.gradient_accumulation_steps == 4
    separated(model)
    E.unlearn(model, [3], data, **QUICK)  # default accelerator
    assert acc.gradient_accumulation_steps == 4
    E.unlearn(model, [3], data, accelerator=acc, **QUICK)
    assert acc.gradient_accumulation_steps == 4

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()

    def seed():
        torch.manual_seed(123)
        np.random.seed(123)
        random.seed(123)

    nets = [E.attach(tiny_net()), E.attach(tiny_net())]  # tiny_net() seeds torch itself
    seed()
    expected = draws()
    seed()
    first = train(nets[0], data, seed=7).model
    assert draws() == expected
    second = train(nets[1], data, seed=7).model  # still reproducible from seed
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:ERM prohibition is weak", "ignore:knowledge entanglement")
def test_retrofit_a_plainly_trained_model():
    """A trained plain network -> attach -> a short ERM fine-tune with
    ``ERMConfig.retrofit()`` -> KTP: every fine-tune epoch is on the ERM path, the weights
    are kept as a start, and G separates enough for KTP to run (benchmarks/retrofit.py
    measures the quality)."""
    from erm_surgery.data import load_mnist5k
    from erm_surgery.training.prohibition import prohibition_accuracy

    cfg = E.ERMConfig.retrofit(lambda4=0.5)
    assert (cfg.warmup_epochs, cfg.erm_every, cfg.lambda4) == (0, 1, 0.5)
    train_set, test_set = load_mnist5k()
    train_set = TensorDataset(*(t[:600] for t in train_set.tensors))
    test_set = TensorDataset(*(t[:300] for t in test_set.tensors))
    plain = tiny_net()  # the user's model, trained their way (here: plain SGD, 2 epochs)
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for x, y in torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True):
            torch.nn.functional.cross_entropy(plain(x), y).backward()
            opt.step()
            opt.zero_grad()
    model = E.attach(plain)
    before = prohibition_accuracy(model, test_set)
    result = E.train(model, train_set, epochs=3, lr=0.01, batch_size=64, show_progress=False,
                     config=E.ERMConfig.retrofit())
    assert [h.path for h in result.history] == ["erm"] * 3
    after = prohibition_accuracy(model, test_set)
    assert before.mean_prohibited > 0.09 and after.mean_prohibited < before.mean_prohibited
    assert after.std_accuracy > before.std_accuracy - 0.05  # the trained weights were kept
    student = E.unlearn(model, [3], **QUICK)
    assert student.erm.forgotten_classes == [3]
