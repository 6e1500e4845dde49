"""The pieces the layout has once: the registry's contract, the class-id check, the
classifier and stage lookups, the tracer's leaf rules, user-facing warnings, the API."""

import dataclasses
import math
import warnings

import numpy as np
import pytest
import timm
import torch
from helpers import entangled_but_separated
from torch import nn
from torch.utils.data import TensorDataset

import erm_surgery as E
from erm_surgery.data import check_class_ids
from erm_surgery.errors import warn_user
from erm_surgery.surgery import find_classifier, stage_names
from erm_surgery.surgery.tracing import leaf_modules, trace_model, trace_with_names
from erm_surgery.training.optim import Recipe
from erm_surgery.unlearning import MethodInfo, get_method, register_method, registry
from erm_surgery.unlearning.request import mark_forgotten, parse_request


def tiny_data(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 32, 32, generator=g), torch.arange(n) % 10)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=10, in_chans=1).eval()


# --------------------------------------------------------------------------- the API


def test_the_package_exports_the_user_api_only():
    public = set(E.__all__)
    for name in ("attach", "detach", "train", "unlearn", "evaluate", "save", "load",
                 "register_method", "available_methods", "KTPConfig", "ERMConfig",
                 "UnlearningError", "EvaluationError"):
        assert name in public, name
    # loss building blocks and internals live in their packages
    for name in ("l1_hinge", "inner_product", "ERMTrainer", "seeded_rng", "reinitialised",
                 "labels_of", "trace_model", "metrics"):
        assert name not in public, name
    assert all(hasattr(E, name) for name in public)


def test_every_method_is_registered_with_its_spec():
    for name in E.available_methods():
        spec = get_method(name)
        assert spec.name == name
        assert dataclasses.is_dataclass(spec.config_cls)
        assert issubclass(spec.info_cls, MethodInfo), name
        assert spec.summary, f"{name} has no one-line summary"
    assert get_method("ktp").needs_attached and not get_method("finetune").needs_attached
    assert not get_method("sisa").reloadable and not get_method("amnesiac").cli
    with pytest.raises(ValueError, match="unknown unlearning method 'nope'.*ktp"):
        get_method("nope")


def test_recipe_configs_share_one_base_and_validation():
    from erm_surgery.methods.baselines import AmnesiacConfig, FinetuneConfig, RetrainConfig
    from erm_surgery.methods.ec import ECConfig

    for cls in (E.KTPConfig, FinetuneConfig, RetrainConfig, AmnesiacConfig, ECConfig):
        assert issubclass(cls, Recipe), cls
        with pytest.raises(ValueError, match="lr must be > 0"):
            cls(lr=0.0)
        with pytest.raises(ValueError, match="finite"):
            cls(lr=float("inf"))
        with pytest.raises(ValueError, match="weight_decay"):
            cls(weight_decay=float("nan"))
        with pytest.raises(ValueError, match="optimizer must be one of"):
            cls(optimizer="lbfgs")
    assert AmnesiacConfig(epochs=0).epochs == 0  # the bare subtraction
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        FinetuneConfig(epochs=0)
    sgd = Recipe(lr=0.1).build_optimizer([nn.Parameter(torch.zeros(3))])
    adam = Recipe(optimizer="adam").build_optimizer([nn.Parameter(torch.zeros(3))])
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    assert isinstance(adam, torch.optim.Adam)


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass
class _ZeroConfig:
    bias: float = -5.0


@dataclasses.dataclass(kw_only=True)
class _ZeroInfo(MethodInfo):
    rows: int


@pytest.fixture
def zero_rows_method():
    """A method registered for the test only (removed afterwards)."""

    @register_method("test_zero_rows", config=_ZeroConfig, info=_ZeroInfo,
                     summary="test method: zero the forget rows of the head")
    def zero_rows(model, classes, data, *, config, accelerator=None, scale: float = 1.0):
        import copy

        request = parse_request(model, classes, data)
        out = copy.deepcopy(model)
        head = find_classifier(out, request.num_classes)[1]
        with torch.no_grad():
            head.weight[request.forget] = 0
            head.bias[request.forget] = config.bias * scale
        mark_forgotten(out, request.forget)
        return out, _ZeroInfo(method="test_zero_rows", forget_classes=request.forget,
                              rows=len(request.forget))

    yield zero_rows
    registry._METHODS.pop("test_zero_rows")


def test_a_registered_method_gets_overrides_timing_and_info(zero_rows_method):
    model, data = tiny_model(), tiny_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = E.unlearn(model, [3], data, method="test_zero_rows", bias=-7.0, scale=2.0)
    info = out.unlearning_info
    assert isinstance(info, _ZeroInfo) and info.rows == 1 and info.forget_classes == [3]
    assert math.isfinite(info.seconds) and info.seconds > 0
    assert float(out.get_classifier().bias[3].detach()) == -14.0  # config override and extra
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the same keyword overrides on a direct call
    out2, info2 = zero_rows_method(model, [4], data, bias=-1.0)
    assert out2.unlearning_info is info2 and float(out2.get_classifier().bias[4].detach()) == -1.0
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['nosuch'\].*'bias'"):
        E.unlearn(model, [3], data, method="test_zero_rows", nosuch=1)
    with pytest.raises(TypeError, match="takes config=_ZeroConfig"):
        E.unlearn(model, [3], data, method="test_zero_rows", config=E.KTPConfig())


def test_registering_a_name_twice_is_refused(zero_rows_method):
    with pytest.raises(ValueError, match="already registered"):
        @register_method("test_zero_rows", config=_ZeroConfig)
        def other(model, classes, data, *, config, accelerator=None):
            raise AssertionError("never called")
    with pytest.raises(TypeError, match="dataclass"):
        register_method("test_not_a_config", config=dict)


# --------------------------------------------------------------------------- one check


@pytest.mark.parametrize("classes,expected", [
    (3, [3]), ([3, 7], [3, 7]), (np.int64(3), [3]), ([np.int64(2)], [2]),
    (torch.tensor([3, 7]), [3, 7]), (torch.tensor(5), [5]),
])
def test_class_ids_accept_integer_values(classes, expected):
    assert check_class_ids(classes, 10) == expected


@pytest.mark.parametrize("classes,match", [
    ([], "no classes given"), ([3.7], "integers"), ([3.0], "integers"), ([True], "integers"),
    (torch.tensor([3.7]), "integers"), (["a"], "integers"), ([10], r"out of range.*0\.\.9"),
    ([-1], "out of range"),
])
def test_class_ids_refuse_what_is_not_a_class(classes, match):
    with pytest.raises(E.UnlearningError, match=match):
        check_class_ids(classes, 10, error=E.UnlearningError)


def test_duplicates_are_refused_only_where_asked():
    assert check_class_ids([3, 3], 10) == [3, 3]
    with pytest.raises(ValueError, match="duplicate class ids"):
        check_class_ids([3, 3], 10, allow_duplicates=False)


# --------------------------------------------------------------------------- lookups


def test_one_classifier_lookup_for_plain_attached_and_conv_heads():
    plain = tiny_model()
    assert find_classifier(plain, 10)[0] == "fc"
    attached = E.attach(plain)
    name, head = find_classifier(attached, 10)
    assert name == "model.fc" and head is attached.model.fc
    squeeze = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 1),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert find_classifier(squeeze, 5)[0] == "2"
    assert find_classifier(squeeze, 7) is None
    with pytest.raises(E.SurgeryError, match="not a submodule"):
        find_classifier(plain, 10, name="head.fc")


def test_one_stage_lookup_with_wrapper_prefix():
    plain = tiny_model()
    assert stage_names(plain)[-1] == "layer4"
    assert stage_names(E.attach(plain))[-1] == "model.layer4"
    assert stage_names(nn.Sequential(nn.Linear(2, 2))) is None


def test_both_tracers_keep_the_same_leaves():
    from timm.layers import DropPath

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = timm.layers.Conv2dSame(1, 4, 3)  # a Conv2d subclass outside torch.nn
            self.drop = DropPath(0.1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.drop(self.conv(x)).mean((2, 3)))

    net = Net()
    assert DropPath in leaf_modules()
    for gm in (trace_model(net, training=False), trace_with_names(net)[0]):
        calls = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        assert calls == {"conv", "drop", "fc"}, calls


# --------------------------------------------------------------------------- warnings


def test_library_warnings_point_at_the_users_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_user("from the library")  # called from this file: attributed here
    assert caught and caught[0].filename == __file__
    model = entangled_but_separated(E.attach(tiny_model()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        E.unlearn(model, [3], tiny_data(), epochs=1, show_progress=False)
    entangled = [w for w in caught if "entanglement" in str(w.message)]
    assert entangled and entangled[0].filename == __file__
