import json
import os

import pytest
import timm
import torch

import erm_surgery as E
from erm_surgery import checkpoint


def trained_like(model):
    """Give every parameter and buffer a non-default value so a round trip is meaningful."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.erm.G.uniform_(0, 1)
        model.erm.forgotten[3] = True
    return model


def test_round_trip_is_exact(tmp_path):
    base = timm.create_model("test_resnet", num_classes=10)
    model = trained_like(E.attach(base)).eval()
    path = E.save(model, tmp_path / "m.safetensors", extra={"epochs": 3})
    meta = E.read_metadata(path)
    assert meta["surgery"]["feature_node"] == model.surgery.feature_node
    assert meta["forgotten_classes"] == [3]
    assert meta["architecture"] == "test_resnet"
    assert meta["extra"] == {"epochs": 3}
    loaded = E.load(path, timm.create_model("test_resnet", num_classes=10)).eval()
    saved, restored = model.state_dict(), loaded.state_dict()
    assert list(saved) == list(restored)
    for k, a in saved.items():
        assert torch.equal(a, restored[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, labels=torch.tensor([1, 2])),
                           loaded(x, labels=torch.tensor([1, 2])))
    assert loaded.erm.forgotten_classes == [3]
    assert not list(tmp_path.glob(".*.tmp")), "no temp file left behind"
    # the temp file's private mode does not leak into the result: like a plain open()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_truncated_file_is_a_clear_error(tmp_path):
    model = E.attach(timm.create_model("test_resnet", num_classes=10))
    path = E.save(model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(E.CheckpointError, match="truncated"):
        E.load(tmp_path / "cut.safetensors", timm.create_model("test_resnet", num_classes=10))
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(E.CheckpointError):
        E.load(tmp_path / "junk.safetensors", timm.create_model("test_resnet", num_classes=10))
    with pytest.raises(E.CheckpointError, match="no checkpoint"):
        E.load(tmp_path / "missing.safetensors", timm.create_model("test_resnet"))


def test_mismatched_base_model(tmp_path):
    model = E.attach(timm.create_model("test_resnet", num_classes=10))
    path = E.save(model, tmp_path / "m.safetensors")
    with pytest.raises(E.CheckpointError, match="C=10"):
        E.load(path, timm.create_model("test_resnet", num_classes=5))
    with pytest.raises(E.CheckpointError, match="does not fit"):
        E.load(path, timm.create_model("test_efficientnet", num_classes=10))


def test_file_without_metadata(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(E.CheckpointError, match="no erm-surgery metadata"):
        E.read_metadata(tmp_path / "plain.safetensors")


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    model = E.attach(timm.create_model("test_resnet", num_classes=10))
    path = E.save(model, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def boom(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(path, boom)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_metadata_is_json(tmp_path):
    model = E.attach(timm.create_model("test_convnext", num_classes=10))
    path = E.save(model, tmp_path / "c.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()["erm_surgery"]
    assert json.loads(raw)["surgery"]["num_channels"] == model.surgery.num_channels
