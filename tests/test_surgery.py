"""attach(): one sweep over many architectures, then the special cases one by one."""

import copy
import io
import os
import tempfile

import pytest
import timm
import torch
import torchvision
from torch import nn

import erm_surgery as E
from erm_surgery.surgery.mask import apply_channel_mask

TIMM = [
    "resnet18", "resnet50", "resnext50_32x4d", "efficientnet_b0", "mobilenetv3_large_100",
    "convnext_tiny", "densenet121", "regnety_016", "vgg16",
    "test_resnet", "test_efficientnet", "test_convnext", "test_byobnet", "test_nfnet",
    "test_mambaout",
]
TORCHVISION = [
    "resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "vgg11",
    "convnext_tiny", "regnet_y_400mf", "squeezenet1_0",
]


def build(source: str, name: str, **kwargs) -> nn.Module:
    if source == "timm":
        return timm.create_model(name, num_classes=10, **kwargs)
    return getattr(torchvision.models, name)(num_classes=10, **kwargs)


@pytest.mark.parametrize(
    "source,name", [("timm", n) for n in TIMM] + [("torchvision", n) for n in TORCHVISION]
)
def test_attach_sweep(source, name):
    model = build(source, name).eval()
    attached = E.attach(model).eval()
    info = attached.surgery
    assert info.num_classes == 10
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        std = attached(x)
        assert torch.equal(plain, std), "STD path must be bit-identical to the original"
        feats = attached.forward_features(x)
        assert feats.shape[info.channel_dim] == info.num_channels
        erm = attached(x, labels=torch.tensor([3, 7]))
        assert not torch.equal(erm, std), "the ERM path must change the output"
        # nothing reaches the head around the mask: with G = 0 the output is input-free
        attached.erm.G.data.zero_()
        zero_a = attached(x, labels=torch.tensor([3, 7]))
        zero_b = attached(torch.randn_like(x), labels=torch.tensor([3, 7]))
        assert torch.allclose(zero_a, zero_b, atol=1e-5)
    assert attached.erm.G.shape == (10, info.num_channels)


def test_resnet_relu_called_twice_is_masked_after_the_node_not_swapped():
    model = torchvision.models.resnet18(num_classes=10)
    attached = E.attach(model)
    # the block's single ReLU module runs twice; the mask follows its second call
    assert attached.surgery.feature_node == "layer4_1_relu_1"
    assert type(attached.model.layer4[1].relu) is nn.ReLU
    assert attached.surgery.head == "fc" and attached.surgery.num_channels == 512


def test_densenet_functional_relu_is_the_feature_node():
    attached = E.attach(torchvision.models.densenet121(num_classes=10))
    node = next(n for n in attached._graphs["full_eval"].graph.nodes
                if n.name == attached.surgery.feature_node)
    assert node.op == "call_function"  # F.relu inside DenseNet.forward, not a module
    assert attached.surgery.num_channels == 1024


def test_timm_batchnormact_leaf_hides_the_activation():
    attached = E.attach(timm.create_model("test_efficientnet", num_classes=10))
    node = next(n for n in attached._graphs["full_eval"].graph.nodes
                if n.name == attached.surgery.feature_node)
    assert node.op == "call_module"
    assert type(attached.model.get_submodule(node.target)).__name__ == "BatchNormAct2d"


def test_squeezenet_mask_sits_on_the_classifier_input_not_the_score_map():
    attached = E.attach(torchvision.models.squeezenet1_0(num_classes=10))
    assert attached.surgery.num_channels == 512  # not the 10-channel class-score map
    assert attached.surgery.head == "classifier.1"


def test_mobilenetv3_mask_sits_where_the_classifier_reads_after_conv_head():
    model = timm.create_model("mobilenetv3_large_100", num_classes=10).eval()
    attached = E.attach(model).eval()
    # pool -> conv_head (960 -> 1280) -> act -> linear: the mask on the 1280-vector
    assert attached.surgery.feature_node == "act2"
    assert attached.surgery.num_channels == 1280 and attached.surgery.head_modules == (
        "classifier",)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(attached(x), model(x))
    # torchvision's head is Linear -> Hardswish -> Linear on a flat vector: no 4-D tensor
    # to mask there, so the map before pooling is kept
    tv = E.attach(torchvision.models.mobilenet_v3_small(num_classes=10)).surgery
    assert tv.num_channels == 576 and tv.head_modules == ("classifier.0", "classifier.3")


class _FlatNormHead(nn.Module):
    """pool -> flatten -> LayerNorm -> linear: the norm's output is 2-D, nothing to mask."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.norm(torch.relu(self.conv(x)).mean((2, 3))))


@pytest.mark.parametrize("source,name,node", [("timm", "convnext_atto", "permute_33"),
                                              ("tv", "convnext_tiny", "permute_7")])
def test_convnext_mask_sits_after_the_head_layernorm(source, name, node):
    """The mask goes where the classifier reads (``_at_classifier_input``)."""
    model = (timm.create_model(name, num_classes=10) if source == "timm"
             else getattr(torchvision.models, name)(num_classes=10)).eval()
    attached = E.attach(model).eval()
    info = attached.surgery
    assert info.feature_node == node and info.feature_shape[1:] == (1, 1)
    assert len(info.head_modules) == 1  # the norm is before the mask now: only the linear
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(attached(x), model(x))  # the plain path is unchanged
        feats = attached.forward_features(x)
        keep = torch.ones(info.num_channels)
        keep[:5] = 0
        # a prohibited channel is 0 where the classifier reads it: nothing re-normalises it
        masked = E.surgery.apply_channel_mask(feats, keep.view(1, -1, 1, 1), info.channel_dim)
        linear = attached.get_submodule(f"model.{info.head}")
        expected = linear(masked.flatten(1))
        assert torch.allclose(attached.forward_head(masked), expected, atol=1e-5)


def test_a_head_holding_the_norm_or_a_flat_norm_keeps_the_map():
    convnext = timm.create_model("test_convnext", num_classes=10)
    assert E.attach(convnext).surgery.feature_shape[1:] == (1, 1)
    whole_head = E.attach(convnext, head="head").surgery  # the container holds head.norm
    assert whole_head.feature_node == "norm_pre" and "head.norm" in whole_head.head_modules
    flat = E.attach(_FlatNormHead(), input_size=(3, 16, 16)).surgery
    assert flat.feature_shape == (16, 16, 16)


def test_channels_last_feature_map_is_masked_on_the_last_dim():
    attached = E.attach(timm.create_model("test_mambaout", num_classes=10)).eval()
    assert attached.surgery.channel_dim == 3
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(attached.surgery.num_channels)
    mask[:5] = 1
    feats = attached.forward_features(x, channel_mask=mask)
    assert feats.shape[-1] == attached.surgery.num_channels
    assert feats[..., 5:].abs().sum() == 0 and feats[..., :5].abs().sum() > 0


class NHWCNet(nn.Module):
    """A hand-made net whose last map is channels-last and pooled over dims (1, 2)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1).relu()
        return self.fc(x.mean((1, 2)))


def test_hand_made_nhwc_model():
    attached = E.attach(NHWCNet(), input_size=(3, 20, 20))
    assert attached.surgery.channel_dim == 3 and attached.surgery.num_channels == 12


@pytest.mark.parametrize("name", [
    "test_efficientnet", "test_convnext", "test_resnet",
    "test_mambaout",  # its feature node is an add: traced-through drop-path shifted names
])
def test_train_mode_keeps_dropout_droppath_and_batchnorm(name):
    model = timm.create_model(name, num_classes=10, drop_rate=0.3, drop_path_rate=0.3)
    attached = E.attach(model)
    model.train()
    attached.train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(123)
    a = model(x)
    torch.manual_seed(123)
    b = attached(x)
    assert torch.equal(a, b)
    torch.manual_seed(7)
    assert not torch.equal(attached(x), b), "stochastic depth / dropout must stay active"
    # BatchNorm statistics moved the same way (two calls on each side now)
    model(x)
    ref = dict(model.named_buffers())
    for key, buf in attached.model.named_buffers():
        if "running_mean" in key:
            assert torch.equal(ref[key], buf)


def test_forward_features_and_head_compose_to_forward():
    attached = E.attach(timm.create_model("test_resnet", num_classes=10)).eval()
    x = torch.randn(3, 3, 48, 48)
    y = torch.tensor([0, 4, 9])
    with torch.no_grad():
        assert torch.equal(attached.forward_head(attached.forward_features(x)), attached(x))
        assert torch.allclose(attached.forward_head(attached.forward_features(x, labels=y)),
                              attached(x, labels=y))
        pre = attached.forward_head(attached.forward_features(x), pre_logits=True)
        features, logits = attached(x, labels=y, return_features="both")  # one pass
        assert torch.equal(features, attached.forward_features(x, labels=y))
        assert torch.equal(logits, attached.forward_head(features))
    assert pre.shape == (3, attached.num_features)
    assert attached.has_head_graph


def test_timm_interface_is_kept():
    model = timm.create_model("test_resnet", num_classes=7)
    attached = E.attach(model)
    assert attached.num_classes == 7
    assert attached.num_features == model.num_features
    assert attached.pretrained_cfg == model.pretrained_cfg
    assert attached.default_cfg == model.default_cfg
    assert attached.get_classifier() is attached.model.fc
    tv = E.attach(torchvision.models.resnet18(num_classes=4))
    assert tv.get_classifier() is tv.model.fc and tv.num_classes == 4


def test_channel_mask_prohibits_channels():
    attached = E.attach(timm.create_model("test_resnet", num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    K = attached.surgery.num_channels
    with torch.no_grad():
        ones = attached(x, channel_mask=torch.ones(K))
        assert torch.equal(ones, attached(x))  # multiplying by 1 changes nothing
        per_sample = attached(x, channel_mask=torch.ones(2, K, dtype=torch.bool))
        assert torch.equal(per_sample, ones)
        f = attached.forward_features(x, channel_mask=torch.zeros(K))
    assert f.abs().sum() == 0


def test_user_model_is_not_modified_and_shares_no_parameters():
    model = timm.create_model("test_resnet", num_classes=10)
    before = copy.deepcopy(model.state_dict())
    attached = E.attach(model)
    own = {p.data_ptr() for p in model.parameters()}
    assert not own & {p.data_ptr() for p in attached.parameters()}
    opt = torch.optim.SGD(attached.parameters(), lr=0.1)
    attached.train()
    loss = attached(torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 3])).sum()
    loss.backward()
    opt.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert attached.erm.G.grad is not None


def test_parameters_are_registered_once():
    attached = E.attach(timm.create_model("test_resnet", num_classes=10))
    names = [n for n, _ in attached.named_parameters()]
    assert "erm.G" in names
    assert len(names) == len(list(attached.model.parameters())) + 1
    assert all(k.startswith(("model.", "erm.")) for k in attached.state_dict())


def test_pickle_deepcopy_and_dtype_move_keep_graphs_wired():
    attached = E.attach(timm.create_model("test_resnet", num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = attached(x, labels=torch.tensor([1, 2]))
    buf = io.BytesIO()
    torch.save(attached, buf)
    buf.seek(0)
    restored = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(attached)
    with torch.no_grad():
        assert torch.equal(restored(x, labels=torch.tensor([1, 2])), ref)
        clone.model.fc.weight.zero_()  # the graph must call the copied module
        assert not torch.equal(clone(x), attached(x))
        assert torch.equal(clone(x)[:, 0], clone.model.fc.bias[0].expand(2))
        double = copy.deepcopy(attached).double()
        assert double(x.double()).dtype == torch.float64


def test_works_under_ddp_single_process():
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}",
                                rank=0, world_size=1)
        try:
            attached = E.attach(timm.create_model("test_resnet", num_classes=10))
            ddp = nn.parallel.DistributedDataParallel(attached)
            out = ddp(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1]))
            out.sum().backward()
            assert attached.erm.G.grad is not None
        finally:
            dist.destroy_process_group()


# ----------------------------------------------------------------- bad input


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        E.attach("resnet18")


def test_model_without_classifier():
    with pytest.raises(E.SurgeryError, match="classifier"):
        E.attach(timm.create_model("test_resnet", num_classes=0))


def test_num_classes_disagreeing_with_head():
    with pytest.raises(E.SurgeryError, match="num_classes=5 disagrees"):
        E.attach(timm.create_model("test_resnet", num_classes=10), num_classes=5)


def test_attaching_twice():
    attached = E.attach(timm.create_model("test_resnet", num_classes=10))
    with pytest.raises(E.SurgeryError, match="already"):
        E.attach(attached)


def test_vit_has_no_conv_feature_map_and_the_error_lists_candidates():
    with pytest.raises(E.SurgeryError, match="feature_node=") as err:
        E.attach(timm.create_model("test_vit", num_classes=10))
    assert "no conv feature map" in str(err.value)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            x = -x
        return self.fc(self.conv(x).mean((2, 3)))


def test_untraceable_model():
    with pytest.raises(E.SurgeryError, match="cannot trace Untraceable"):
        E.attach(Untraceable())


def test_feature_node_override_and_bad_override():
    model = timm.create_model("test_resnet", num_classes=10)
    auto = E.attach(model)
    with pytest.raises(E.SurgeryError, match="candidates") as err:
        E.attach(model, feature_node="nope")
    assert auto.surgery.feature_node in str(err.value)
    earlier = E.attach(model, feature_node="layer3_0_act3")  # output of stage 3
    assert earlier.surgery.feature_node == "layer3_0_act3"
    assert earlier.erm.G.shape[1] == earlier.surgery.num_channels
    # mid-block: the residual shortcut would carry the input around the mask
    with pytest.raises(E.SurgeryError, match="around the feature map"):
        E.attach(model, feature_node="layer3_0_act2")
    with pytest.raises(E.SurgeryError, match="not a submodule"):
        E.attach(model, head="classifier_that_is_not_there")


@pytest.mark.parametrize(
    "labels,exc,match",
    [
        (torch.tensor([0, 10]), ValueError, "0..9"),
        (torch.tensor([-1, 0]), ValueError, "0..9"),
        (torch.tensor([0, 1, 2]), ValueError, "shape"),
        (torch.tensor([[0], [1]]), ValueError, "shape"),
        # float labels are soft targets (N, C): a float vector of ids is refused, not cast
        (torch.tensor([0.0, 1.0]), ValueError, r"soft targets.*shape \(2, 10\).*integer"),
        (torch.tensor([True, False]), TypeError, "integer class ids or float soft targets"),
        ([0, 1], TypeError, "torch.Tensor"),
    ],
)
def test_bad_labels(labels, exc, match):
    attached = E.attach(timm.create_model("test_resnet", num_classes=10))
    with pytest.raises(exc, match=match):
        attached(torch.randn(2, 3, 32, 32), labels=labels)


def test_bad_channel_mask_and_both_paths():
    attached = E.attach(timm.create_model("test_resnet", num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="channel_mask must have shape"):
        attached(x, channel_mask=torch.ones(3))
    with pytest.raises(ValueError, match="not both"):
        attached(x, labels=torch.tensor([0, 1]), channel_mask=torch.ones(96))


def test_apply_channel_mask_identity_when_no_weights():
    f = torch.randn(2, 3, 4, 4)
    assert apply_channel_mask(f, None) is f


def test_detach_returns_the_plain_model():
    attached = E.attach(torchvision.models.resnet18(num_classes=10)).eval()
    plain = E.detach(attached)
    assert not E.is_attached(plain) and isinstance(plain, torchvision.models.ResNet)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), attached(x))
    with pytest.raises(TypeError):
        E.detach(plain)


class TimmLinearHeadNet(nn.Module):
    """A head built with timm.layers.Linear (an nn.Linear subclass outside torch.nn)."""

    def __init__(self, optional_mask_arg: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = timm.layers.Linear(8, 5)

    def forward(self, x, mask=None):
        if mask is not None:  # a data-dependent branch fx can only trace with mask fixed
            x = x * mask
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_timm_linear_head_and_optional_none_argument():
    attached = E.attach(TimmLinearHeadNet(), input_size=(3, 8, 8))
    assert attached.surgery.head == "fc" and attached.surgery.num_channels == 8
    assert attached.get_classifier() is attached.model.fc
    attached.erm.G.data.zero_()
    with torch.no_grad():
        a = attached(torch.randn(2, 3, 8, 8), labels=torch.tensor([0, 4]))
        b = attached(torch.randn(2, 3, 8, 8), labels=torch.tensor([0, 4]))
    assert torch.allclose(a, b)


def test_auxiliary_classifiers_get_a_clear_error():
    model = torchvision.models.googlenet(num_classes=10, init_weights=True)
    with pytest.raises(E.SurgeryError, match="aux_logits=False"):
        E.attach(model, input_size=(3, 64, 64))
    model = torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=True)
    attached = E.attach(model, input_size=(3, 64, 64)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(attached(x), model.eval()(x))


def test_attention_pooling_vit_is_refused_as_a_transformer():
    # its attention tensors (N, heads, L, D) pass the 4-D filter; the bypass check catches
    # it and the error says why
    with pytest.raises(E.SurgeryError, match="ERM needs a CNN"):
        E.attach(timm.create_model("test_vit3", num_classes=10))


class FunctionalHeadNet(nn.Module):
    """Its classifier is F.linear on a bare parameter of the root module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(5, 8))

    def forward(self, x):
        return torch.nn.functional.linear(torch.relu(self.conv(x)).mean((2, 3)), self.w)


def test_functional_head_on_root_parameters_is_a_clear_error():
    with pytest.raises(E.SurgeryError, match="not a module"):
        E.attach(FunctionalHeadNet(), input_size=(3, 8, 8))
