"""The timm / torchvision interface of an attached model (issue 14, item 3).

reset_classifier and a replaced head, grad checkpointing, feature extraction, loading
plain weights, optimiser parameter groups (ours and timm's factory), and a feature-node
choice that does not depend on the class count.
"""

import copy
import warnings

import pytest
import timm
import torch
import torch.utils.checkpoint
import torchvision
from torch import nn

import erm_surgery as E
from erm_surgery import SurgeryError

X = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 3, 7, 9])


@pytest.fixture(scope="module")
def plain() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=10, in_chans=1).eval()


@pytest.fixture(scope="module")
def _attached(plain) -> E.ERMModel:
    model = E.attach(plain, input_size=(1, 32, 32))
    with torch.no_grad():  # a G that is not uniform, so the ERM path depends on the labels
        model.erm.G.copy_(torch.rand(model.erm.G.shape, generator=torch.Generator()
                                     .manual_seed(2)))
    return model


@pytest.fixture
def attached(_attached) -> E.ERMModel:
    return copy.deepcopy(_attached)


# --------------------------------------------------------------------------- 1. the head


def test_reset_classifier_reattaches_with_a_new_G_and_warns(attached):
    K = attached.surgery.num_channels
    with pytest.warns(UserWarning, match=r"G was reset to a new 7 x \d+ matrix"):
        attached.reset_classifier(7)
    assert attached.num_classes == 7 and attached.erm.G.shape == (7, K)
    with torch.no_grad():
        logits = attached(X)
        assert logits.shape == (4, 7)
        # the new head is what runs: the traced forward equals the module tree's own
        assert torch.equal(logits, attached.model(X))
        assert attached(X, labels=torch.tensor([0, 1, 5, 6])).shape == (4, 7)
    assert attached.state_dict()["model.fc.weight"].shape[0] == 7
    copied = copy.deepcopy(attached)
    with torch.no_grad():
        assert torch.equal(copied(X), logits)


def test_reset_classifier_with_the_same_count_keeps_G(attached):
    G = attached.erm.G.detach().clone()
    old_head = attached.model.fc
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: G still fits
        attached.reset_classifier(10)
    assert attached.model.fc is not old_head
    assert torch.equal(attached.erm.G, G)
    with torch.no_grad():
        assert torch.equal(attached(X), attached.model(X))


@pytest.mark.parametrize("n", [0, 1])
def test_reset_classifier_below_two_classes_is_refused_before_any_change(attached, n):
    with torch.no_grad():
        before = attached(X)
    head = attached.model.fc
    with pytest.raises(SurgeryError, match="detach"):
        attached.reset_classifier(n)
    assert attached.model.fc is head
    with torch.no_grad():
        assert torch.equal(attached(X), before)


@pytest.mark.parametrize("how", ["inner", "wrapper"])
def test_replacing_the_head_module_reattaches_and_a_copy_behaves_the_same(attached, how):
    torch.manual_seed(3)
    new_head = nn.Linear(attached.model.fc.in_features, 5)
    if how == "inner":
        attached.model.fc = new_head
    else:  # assigning on the wrapper sets the model's attribute, not a stray module
        attached.fc = new_head
        assert "fc" not in attached._modules and attached.model.fc is new_head
    with pytest.warns(UserWarning, match="G was reset"):
        copied = copy.deepcopy(attached)  # copied before the first call: still stale
        with torch.no_grad():
            logits = attached(X)
            copied_logits = copied(X)
    assert logits.shape == (4, 5) and attached.erm.G.shape[0] == 5
    with torch.no_grad():
        assert torch.equal(logits, attached.model(X))
    assert torch.equal(copied_logits, logits)
    assert copied.erm.G.shape == attached.erm.G.shape


# --------------------------------------------------------------------------- 2. checkpointing


@pytest.fixture
def count_checkpoints(monkeypatch):
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    return calls


# test_convnext: the flag is on each stage (ConvNeXtStage.grad_checkpointing), not the model
@pytest.mark.parametrize("name,size,when", [("test_resnet", 32, "before"),
                                            ("test_resnet", 32, "after"),
                                            ("test_convnext", 64, "after")])
def test_grad_checkpointing_is_kept_and_gives_the_same_gradients(count_checkpoints, name,
                                                                  size, when):
    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=10, in_chans=1)
    reference = E.attach(net, input_size=(1, size, size))
    if when == "before":
        net.set_grad_checkpointing(True)
        model = E.attach(net, input_size=(1, size, size))
    else:
        model = copy.deepcopy(reference)
        model.set_grad_checkpointing(True)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(4, 1, size, size)
    count_checkpoints.clear()  # count the calls of the training step only, not of tracing
    losses = []
    for m in (reference, model):
        m.train()
        torch.manual_seed(5)
        loss = m(x, labels=Y).logsumexp(1).mean() + m(x).square().mean()
        loss.backward()
        losses.append(loss.detach())
    assert len(count_checkpoints) >= 2, "checkpointing must actually run"
    assert torch.equal(losses[0], losses[1])
    for (name_a, a), (_, b) in zip(reference.named_parameters(), model.named_parameters(),
                                   strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=name_a)
    count_checkpoints.clear()
    model.eval()
    with torch.no_grad():
        model(x)
    assert not count_checkpoints, "eval mode runs no checkpoint"
    model.set_grad_checkpointing(False)
    model.train()
    model(x).sum().backward()
    assert not count_checkpoints, "switching it off is seen too"


# --------------------------------------------------------------------------- 3. features


def test_torchvision_feature_extraction_on_both_paths(attached, plain):
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    train_nodes, eval_nodes = get_graph_node_names(attached)
    assert "erm_mask" in eval_nodes and "erm_mask" in train_nodes
    assert any(n.startswith("model.layer2.") for n in eval_nodes)
    extractor = create_feature_extractor(
        attached, {"model.layer2": "l2", "erm_mask": "features", "model.fc": "logits"}).eval()
    reference = create_feature_extractor(plain, {"layer2": "l2"})
    with torch.no_grad():
        std = extractor(X)
        erm = extractor(X, Y)
        assert torch.equal(std["logits"], attached(X))
        assert torch.equal(std["features"], attached.forward_features(X))
        assert torch.equal(std["l2"], reference(X)["l2"])
        assert torch.equal(erm["logits"], attached(X, labels=Y))
        assert torch.equal(erm["features"], attached.forward_features(X, labels=Y))
        assert not torch.equal(erm["logits"], std["logits"])
        mask = torch.zeros(attached.surgery.num_channels)
        assert torch.equal(extractor(X, channel_mask=mask)["features"],
                           torch.zeros_like(std["features"]))


def test_timm_feature_extraction_on_both_paths(attached):
    from timm.models import create_feature_extractor

    extractor = create_feature_extractor(attached, {"erm_mask": "features",
                                                    "model.fc": "logits"}).eval()
    with torch.no_grad():
        assert torch.equal(extractor(X)["logits"], attached(X))
        assert torch.equal(extractor(X, Y)["logits"], attached(X, labels=Y))


# --------------------------------------------------------------------------- 4. weights


def test_plain_weights_load_into_an_attached_model_and_back(attached, plain):
    other = timm.create_model("test_resnet", num_classes=10, in_chans=1).eval()
    G = attached.erm.G.detach().clone()
    result = attached.load_state_dict(other.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(attached.erm.G, G), "G is kept"
    with torch.no_grad():
        assert torch.equal(attached(X), other(X))
    attached.load_plain_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(attached(X), plain(X))
    # the reverse: a plain model takes the detached weights
    other.load_state_dict(E.detach(attached).state_dict())
    with torch.no_grad():
        assert torch.equal(other(X), plain(X))


def test_loading_plain_weights_refuses_an_attached_state_dict_and_mismatches(attached):
    with pytest.raises(SurgeryError, match="load_state_dict"):
        attached.load_plain_state_dict(attached.state_dict())
    state = {k: v for k, v in E.detach(attached).state_dict().items() if k != "fc.bias"}
    with pytest.raises(RuntimeError, match="fc.bias"):
        attached.load_state_dict(state)


# --------------------------------------------------------------------------- 5. optimisers


def _group_of(groups, param):
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_param_groups_put_G_alone_without_weight_decay(attached):
    attached.model.conv1[0].weight.requires_grad_(False)  # frozen: left out
    groups = E.param_groups(attached, lr=0.1, weight_decay=0.05, g_lr=0.3)
    params = [p for g in groups for p in g["params"]]
    trainable = [p for p in attached.parameters() if p.requires_grad]
    assert len(params) == len(trainable) and {id(p) for p in params} == {id(p) for p in
                                                                       trainable}
    g_group = _group_of(groups, attached.erm.G)
    assert g_group["params"] == [attached.erm.G] and g_group["weight_decay"] == 0.0
    assert g_group["lr"] == 0.3
    assert _group_of(groups, attached.model.fc.bias)["weight_decay"] == 0.0
    assert _group_of(groups, attached.model.fc.weight)["weight_decay"] == 0.05
    # any optimiser: a step with zero gradients decays the weights and leaves G alone
    opt = torch.optim.SGD(groups)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    G, w = attached.erm.G.detach().clone(), attached.model.fc.weight.detach().clone()
    opt.step()
    assert torch.equal(attached.erm.G, G)
    assert torch.allclose(attached.model.fc.weight, w * (1 - 0.1 * 0.05))
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})  # a caller's own group


def test_param_groups_layer_decay_scales_the_lr_by_depth(attached):
    groups = E.param_groups(attached, lr=0.1, layer_decay=0.5)
    stem = _group_of(groups, attached.model.conv1[0].weight)["lr"]
    deep = _group_of(groups, attached.model.layer4[0].conv1.weight)["lr"]
    head = _group_of(groups, attached.model.fc.weight)["lr"]
    assert head == 0.1 and stem < deep < head
    assert _group_of(groups, attached.erm.G)["lr"] == 0.1
    with pytest.raises(SurgeryError, match="group_matcher"):
        E.param_groups(torchvision.models.squeezenet1_1(num_classes=3), lr=0.1,
                       layer_decay=0.5)
    with pytest.raises(ValueError, match="layer_decay"):
        E.param_groups(attached, lr=0.1, layer_decay=1.5)


def test_timm_optimizer_factory_keeps_G_out_of_weight_decay_and_sees_layers(attached):
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(attached, "sgd", lr=0.1, weight_decay=0.05, layer_decay=0.5)
    assert _group_of(opt.param_groups, attached.erm.G)["weight_decay"] == 0.0
    stem = _group_of(opt.param_groups, attached.model.conv1[0].weight)["lr_scale"]
    head = _group_of(opt.param_groups, attached.model.fc.weight)["lr_scale"]
    assert stem < head == 1.0
    opt = create_optimizer_v2(attached, "adamw", lr=0.1, weight_decay=0.05)
    assert _group_of(opt.param_groups, attached.erm.G)["weight_decay"] == 0.0
    assert _group_of(opt.param_groups, attached.model.fc.weight)["weight_decay"] == 0.05


# --------------------------------------------------------------------------- 6. the node


class ConvClassifierNet(nn.Module):
    """A 1x1-conv classifier after global pooling (timm dla / dpn / resnetv2 heads)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(24, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x))).flatten(1)


def _build(source: str, name: str, num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    if source == "toy":
        return ConvClassifierNet(num_classes)
    if source == "timm":
        return timm.create_model(name, num_classes=num_classes)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


# 224 px: a 7 x 7 last map at stride 32, so C = 7 equals the map's width (28 px for the toy)
@pytest.mark.parametrize("source,name,side", [
    ("toy", "conv_classifier", 28), ("timm", "dla46_c", 224), ("timm", "test_resnet", 224),
    ("timm", "test_efficientnet", 224), ("timm", "test_byobnet", 224), ("timm", "test_nfnet", 224),
    ("timm", "test_mambaout", 224), ("torchvision", "squeezenet1_1", 224)])
def test_the_feature_node_does_not_depend_on_the_class_count(source, name, side):
    found = {}
    for C in (7, 10, 1000):
        info = E.attach(_build(source, name, C), input_size=(3, side, side)).surgery
        found[C] = (info.feature_node, info.num_channels, info.channel_dim, info.feature_shape)
    assert found[7] == found[10] == found[1000], found
    assert found[7][1] not in (7, 10, 1000)


def test_a_model_without_reset_classifier_says_how_to_replace_its_head():
    model = E.attach(ConvClassifierNet(10), input_size=(3, 28, 28))
    with pytest.raises(AttributeError, match=r"model\.model\.fc = nn\.Linear"):
        model.reset_classifier(5)
    model.model.fc = nn.Conv2d(24, 5, 1)  # the way it says: re-attached on the next call
    x = torch.randn(2, 3, 28, 28)
    with pytest.warns(UserWarning, match="G was reset"), torch.no_grad():
        assert torch.equal(model(x), model.model(x))
    assert model.erm.G.shape == (5, 24) and model.surgery.channel_dim == 1
