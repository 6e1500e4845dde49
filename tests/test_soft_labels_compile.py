"""A timm-style recipe on the ERM path (issue 14, items 2 and 5): soft targets from
mixup / CutMix / label smoothing, any criterion, and torch.compile without graph breaks."""

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import separated
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch.utils.data import TensorDataset

import erm_surgery as E
from erm_surgery.training import ERMConfig, erm_loss


def tiny(num_classes: int = 5) -> E.ERMModel:
    torch.manual_seed(0)
    model = E.attach(timm.create_model("test_resnet", num_classes=num_classes, in_chans=1),
                     input_size=(1, 32, 32))
    with torch.no_grad():  # a G with distinct rows, so a wrong row would show
        model.erm.G.uniform_()
    return model.eval()


def batch(n: int = 6, num_classes: int = 5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 32, 32, generator=g), torch.arange(n) % num_classes


def test_soft_targets_mix_the_rows_of_g():
    model, (x, y) = tiny(), batch()
    G = model.erm.G
    one_hot = F.one_hot(y, 5).float()
    # a one-hot soft target is the class id
    torch.testing.assert_close(model(x, labels=one_hot), model(x, labels=y))
    # a 50/50 mix of classes 0 and 1 masks with the mean of their rows
    mix = torch.zeros(6, 5)
    mix[:, 0] = mix[:, 1] = 0.5
    features = model.forward_features(x, channel_mask=(0.5 * (G[0] + G[1])).expand(6, -1))
    torch.testing.assert_close(model(x, labels=mix), model.forward_head(features))
    # and differs from either class alone
    assert not torch.allclose(model(x, labels=mix), model(x, labels=torch.zeros_like(y)))


@pytest.mark.parametrize("labels, error, match", [
    (torch.zeros(6, 4), ValueError, r"soft targets and must have shape \(6, 5\)"),
    (torch.zeros(6, dtype=torch.bool), TypeError, "integer class ids or float soft targets"),
    (torch.full((6,), 5), ValueError, r"class ids in 0\.\.4"),
])
def test_bad_labels_are_refused_with_the_fix(labels, error, match):
    model, (x, _) = tiny(), batch()
    with pytest.raises(error, match=match):
        model(x, labels=labels)


def test_erm_loss_takes_soft_targets_and_any_criterion():
    model, (x, y) = tiny(), batch()
    model.train()
    cfg = ERMConfig()
    one_hot = F.one_hot(y, 5).float()
    ids_loss, ids_terms = erm_loss(model, x, y, cfg, return_terms=True)
    soft_loss, soft_terms = erm_loss(model, x, one_hot, cfg, criterion=SoftTargetCrossEntropy(),
                                     return_terms=True)
    # one-hot targets with timm's soft-target CE give the same objective, term by term
    for name in ("ce", "prohibit"):
        torch.testing.assert_close(ids_terms[name], soft_terms[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ids_loss, soft_loss, rtol=1e-5, atol=1e-6)
    # a criterion is really used: one that doubles the CE doubles the CE term (label
    # smoothing, tried before, can lower the CE of near-uniform logits: not a sure sign)
    doubled = erm_loss(model, x, y, cfg, criterion=lambda z, t: 2 * F.cross_entropy(z, t),
                       return_terms=True)[1]
    torch.testing.assert_close(doubled["ce"], 2 * ids_terms["ce"], rtol=1e-5, atol=1e-6)
    # gradients reach G through the soft mix
    soft_loss.backward()
    assert model.erm.G.grad is not None and model.erm.G.grad.abs().sum() > 0


def test_train_runs_a_timm_mixup_recipe():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 32, 32, generator=g), torch.arange(64) % 5)
    seen = []

    def mixup(x, y):  # timm's Mixup, recording what the loss received
        x, y = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=5)(x, y)
        seen.append(y)
        return x, y

    model = E.attach(timm.create_model("test_resnet", num_classes=5, in_chans=1),
                     input_size=(1, 32, 32))
    result = E.train(model, data, epochs=2, batch_size=16, show_progress=False,
                     mixup=mixup, criterion=SoftTargetCrossEntropy(),
                     config=ERMConfig(warmup_epochs=0, erm_every=1))
    assert len(seen) == 8 and all(y.shape == (16, 5) and y.is_floating_point() for y in seen)
    assert all(torch.isfinite(torch.tensor(h.loss)) for h in result.history)
    assert result.history[-1].path == "erm"
    # G moved off its initial 0.5 (the soft masks trained it) and stayed in [0, 1]
    G = model.erm.G
    assert not torch.allclose(G, torch.full_like(G, 0.5)) and G.min() >= 0 and G.max() <= 1


def test_the_erm_path_compiles_without_graph_breaks():
    import torch._dynamo as dynamo

    model, (x, y) = tiny(), batch()
    for labels in (y, F.one_hot(y, 5).float()):  # class ids, soft targets
        dynamo.reset()
        explained = dynamo.explain(model)(x, labels=labels)
        assert explained.graph_break_count == 0, explained.break_reasons


def test_compiled_equals_eager_on_both_paths():
    model, (x, y) = tiny(), batch()
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    torch.testing.assert_close(compiled(x, labels=y), model(x, labels=y))


def test_train_accepts_a_compiled_model_and_compile_true(monkeypatch):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 32, 32, generator=g), torch.arange(32) % 5)
    kw = dict(epochs=1, batch_size=16, show_progress=False,
              config=ERMConfig(warmup_epochs=0, erm_every=1))
    runs = {}
    for how in ("eager", "compiled"):
        torch.manual_seed(0)
        model = E.attach(timm.create_model("test_resnet", num_classes=5, in_chans=1),
                         input_size=(1, 32, 32))
        run_on = torch.compile(model, backend="aot_eager") if how == "compiled" else model
        result = E.train(run_on, data, **kw)
        assert result.model is model  # the attached model, not the compiled wrapper
        assert model.training_data.data is data
        runs[how] = model
    for (name, a), b in zip(runs["eager"].state_dict().items(),
                            runs["compiled"].state_dict().values(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5, msg=name)
    # compile=... compiles the attached model with the given options (the compiled run
    # itself is the case above; a spy keeps this one fast)
    calls = []
    monkeypatch.setattr(torch, "compile", lambda m, **o: calls.append((m, o)) or m)
    model = tiny().train()
    E.train(model, data, compile={"mode": "reduce-overhead"}, **kw)
    assert calls == [(model, {"mode": "reduce-overhead"})]
    with pytest.raises(TypeError, match="torch.compile of one"):
        E.train(torch.nn.Linear(2, 2), data, **kw)


def test_unlearn_takes_a_compiled_teacher():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 1, 32, 32, generator=g), torch.arange(40) % 5)
    teacher = separated(tiny(), own=8)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    compiled = torch.compile(teacher, backend="aot_eager")
    student = E.unlearn(compiled, [2], data, epochs=1, show_progress=False)
    assert isinstance(student, E.ERMModel) and student.erm.forgotten_classes == [2]
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
