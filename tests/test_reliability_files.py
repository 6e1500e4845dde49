"""The erasure promise on disk and under bad input (issue 15, part A).

Links, permissions, concurrent requests, stale temp files, integrity (digest and
cross-checks), malformed metadata and head names, and the command line's output checks.
Tiny models only: timm ``test_resnet`` (10 classes, 1 channel, 32 x 32) on a few dozen
random images; unlearning is one epoch of ``finetune``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

import erm_surgery as E
from erm_surgery import checkpoint
from erm_surgery.cli import main
from erm_surgery.unlearning import unlearn_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

FT = {"method": "finetune", "epochs": 1, "show_progress": False}
CLI_FT = ["--method", "finetune", "--epochs", "1", "--no-progress"]


def base():
    return timm.create_model("test_resnet", num_classes=10, in_chans=1)


def tiny_data(n: int = 20) -> TensorDataset:
    return TensorDataset(torch.randn(n, 1, 32, 32), torch.arange(n) % 10)


def forgotten(path) -> list[int]:
    return E.read_metadata(path)["forgotten_classes"]


@pytest.fixture(scope="module")
def model():
    """An untrained attached model, shared: tests only save it (attach costs ~0.5 s)."""
    return E.attach(base())


@pytest.fixture(scope="module")
def blobs(model, tmp_path_factory) -> dict[str, bytes]:
    """The bytes of ``model``'s checkpoint: ``plain`` (``E.save``) and ``cli`` (with the
    model spec and data the command line needs)."""
    from erm_surgery.cli.models import ModelSpec, save_checkpoint

    folder = tmp_path_factory.mktemp("blobs")
    plain = E.save(model, folder / "plain.safetensors")
    cli = save_checkpoint(model, folder / "cli.safetensors", ModelSpec("test_resnet", 10, 1, 32),
                          {"dataset": "mnist5k"})
    return {"plain": plain.read_bytes(), "cli": cli.read_bytes()}


def put(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


@pytest.fixture
def tiny_cli_data(monkeypatch):
    """``erm-surgery unlearn`` on a few random images instead of MNIST-5k."""
    from erm_surgery.cli.data import DataBundle

    data = tiny_data()
    bundle = DataBundle("mnist5k", None, data, data, data, 10, 1, 32,
                        [str(i) for i in range(10)])
    monkeypatch.setattr("erm_surgery.cli.commands.unlearn.load_matching_data",
                        lambda *args, **kwargs: bundle)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------ 1. links


def test_unlearn_checkpoint_through_a_symlink_replaces_the_target(tmp_path, blobs):
    real = put(tmp_path / "real.safetensors", blobs["plain"])
    link = tmp_path / "link.safetensors"
    link.symlink_to(real.name)
    unlearn_checkpoint(link, [3], tiny_data(), base(), **FT)
    assert link.is_symlink(), "the link is kept"
    assert forgotten(real) == [3], "the teacher at the link's target is replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.safetensors", "real.safetensors"]


def test_save_onto_a_symlink_writes_the_target(tmp_path, blobs, model):
    real = put(tmp_path / "real.safetensors", blobs["plain"])
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    assert E.save(model, link, extra={"new": True}) == link
    assert link.is_symlink() and E.read_metadata(real)["extra"] == {"new": True}


def test_hard_linked_checkpoint_warns_that_the_other_name_keeps_the_teacher(tmp_path, blobs):
    path = put(tmp_path / "m.safetensors", blobs["plain"])
    other = tmp_path / "backup.safetensors"
    os.link(path, other)
    with pytest.warns(UserWarning, match="other hard link"):
        unlearn_checkpoint(path, [3], tiny_data(), base(), **FT)
    assert forgotten(path) == [3] and forgotten(other) == []


def test_cli_in_place_on_a_symlink_and_on_a_hard_link(tmp_path, blobs, tiny_cli_data, capsys):
    real = put(tmp_path / "real.safetensors", blobs["cli"])
    real.chmod(0o600)
    link = tmp_path / "link.safetensors"
    link.symlink_to(real.name)
    code, out, err = run_cli(capsys, "unlearn", link, "--classes", "3", "--in-place", *CLI_FT)
    assert code == 0, err
    assert link.is_symlink() and forgotten(real) == [3]
    assert real.stat().st_mode & 0o777 == 0o600, "--in-place keeps the file's mode"
    assert "no copy of the original is left" in out
    # a hard link still holds the original: no promise that it is gone
    other = tmp_path / "copy.safetensors"
    os.link(real, other)
    with pytest.warns(UserWarning, match="other hard link"):
        code, out, err = run_cli(capsys, "unlearn", real, "--classes", "5", "--in-place",
                                 *CLI_FT)
    assert code == 0, err
    assert "no copy of the original is left" not in out
    assert "1 other hard link(s) to it still hold the original" in out
    assert forgotten(real) == [3, 5] and forgotten(other) == [3]


# ------------------------------------------------------------------ 2. permissions


def test_replacing_a_file_keeps_its_mode_and_owner(tmp_path, blobs, model):
    path = put(tmp_path / "m.safetensors", blobs["plain"])
    path.chmod(0o600)
    E.save(model, path)
    assert path.stat().st_mode & 0o777 == 0o600
    unlearn_checkpoint(path, [3], tiny_data(), base(), **FT)
    assert path.stat().st_mode & 0o777 == 0o600
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # only root may give files away
        os.chown(path, 4321, 4321)
        E.save(model, path)
        assert (path.stat().st_uid, path.stat().st_gid) == (4321, 4321)


# ------------------------------------------------------------------ 3. concurrent requests

#: a library request that, once it has read the teacher, waits (up to 2 s) until the
#: other request has read the file too: without a lock both unlearn the same teacher
_LIBRARY_REQUEST = """
import sys, time
from pathlib import Path
import timm, torch
from torch.utils.data import TensorDataset
import erm_surgery.unlearning.checkpoint as U
path, b_loaded, a_loaded = map(Path, sys.argv[1:4])
real_load = U.load
def load(*args, **kwargs):
    model = real_load(*args, **kwargs)
    b_loaded.touch()
    end = time.time() + 2
    while not a_loaded.exists() and time.time() < end:
        time.sleep(0.05)
    return model
U.load = load
torch.manual_seed(0)
data = TensorDataset(torch.randn(20, 1, 32, 32), torch.arange(20) % 10)
base = timm.create_model("test_resnet", num_classes=10, in_chans=1)
U.unlearn_checkpoint(path, [3], data, base, method="finetune", epochs=1, show_progress=False)
"""


def _wait_for(flag: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.time() + timeout
    while not flag.exists():
        if proc.poll() is not None:
            pytest.fail(f"the other request died: {proc.communicate()[1]}")
        assert time.time() < end, "the other request never read the checkpoint"
        time.sleep(0.05)


@pytest.mark.parametrize("second", ["library", "cli"])
def test_two_processes_unlearning_one_file_both_apply(tmp_path, blobs, tiny_cli_data, capsys,
                                                      monkeypatch, second):
    """A library request in another process holds the file; a second request here (the
    library, or the CLI with --in-place) waits for it and unlearns its result."""
    path = put(tmp_path / "m.safetensors", blobs["cli"])
    b_loaded, a_loaded = tmp_path / "b_loaded", tmp_path / "a_loaded"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    other = subprocess.Popen([sys.executable, "-c", _LIBRARY_REQUEST, str(path), str(b_loaded),
                              str(a_loaded)], env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        _wait_for(b_loaded, other)
        if second == "cli":
            import erm_surgery.cli.commands.unlearn as module

            name = "load_checkpoint"
        else:
            import erm_surgery.unlearning.checkpoint as module

            name = "load"
        real_load = getattr(module, name)

        def signalling_load(*args, **kwargs):
            loaded = real_load(*args, **kwargs)
            a_loaded.touch()  # the other process may go on
            return loaded

        monkeypatch.setattr(module, name, signalling_load)
        if second == "cli":
            code, _, err = run_cli(capsys, "unlearn", path, "--classes", "5", "--in-place",
                                   *CLI_FT)
            assert code == 0, err
        else:
            unlearn_checkpoint(path, [5], tiny_data(), base(), **FT)
        _, other_err = other.communicate(timeout=180)
        assert other.returncode == 0, other_err
    finally:
        if other.poll() is None:
            other.kill()
    meta = E.read_metadata(path)
    assert meta["forgotten_classes"] == [3, 5], "one request was lost"
    history = meta["extra"]["unlearning_history"]
    assert [h["forget_classes"] for h in history] == [[3], [5]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_loaded", "b_loaded",
                                                           "m.safetensors"]


# ------------------------------------------------------------------ 4. temp files


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_temp_file_of_a_killed_save_is_removed_by_the_next_write(tmp_path, blobs, model):
    path = put(tmp_path / "m.safetensors", blobs["plain"])
    student = blobs["plain"]

    def killed(tmp):
        Path(tmp).write_bytes(student[: len(student) // 2])
        os._exit(9)  # killed inside save: no clean-up runs

    pid = os.fork()
    if pid == 0:  # the child only writes bytes: no torch after the fork
        try:
            checkpoint.atomic_write(path, killed)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    stale = [p.name for p in tmp_path.glob(".m.safetensors.*.tmp")]
    assert len(stale) == 1, "the kill left the student's temp copy"
    unrelated = [tmp_path / ".m.safetensors.x.abcdefgh.tmp", tmp_path / ".n.abcdefgh.tmp"]
    for p in unrelated:
        p.write_bytes(b"someone else's")
    E.save(model, path)
    assert not (tmp_path / stale[0]).exists()
    assert all(p.exists() for p in unrelated), "only our own temp files are removed"
    assert path.read_bytes() == blobs["plain"]


# ------------------------------------------------------------------ 5. integrity


def _offsets(path: Path, key: str) -> tuple[int, int]:
    """Where tensor ``key``'s bytes lie in a safetensors file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + n])[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


def _poke(path: Path, key: str, index: int, value: int | None = None) -> None:
    """Flip (or set) byte ``index`` of tensor ``key`` in place."""
    start, _ = _offsets(path, key)
    data = bytearray(path.read_bytes())
    data[start + index] = data[start + index] ^ 0x01 if value is None else value
    path.write_bytes(bytes(data))


def _rewrite(path: Path, out: Path, change) -> Path:
    """``path`` with its metadata dict changed by ``change`` (tensors as they are)."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["erm_surgery"])
    change(meta)
    save_file(tensors, str(out), metadata={"erm_surgery": json.dumps(meta)})
    return out


def test_flipped_tensor_bytes_are_detected_by_the_digest(tmp_path, blobs):
    path = put(tmp_path / "m.safetensors", blobs["plain"])
    assert E.read_metadata(path)["tensor_digest"].startswith("sha256:")
    _poke(path, "model.fc.weight", 5)
    with pytest.raises(E.CheckpointError, match="corrupted or was modified") as err:
        E.load(path, base())
    assert str(path) in str(err.value)
    flag = put(tmp_path / "f.safetensors", blobs["plain"])
    _poke(flag, "erm.forgotten", 3, value=1)  # class 3 now looks forgotten
    with pytest.raises(E.CheckpointError, match="corrupted or was modified"):
        E.load(flag, base())


def test_files_without_a_digest_load_and_are_cross_checked(tmp_path, blobs):
    path = put(tmp_path / "m.safetensors", blobs["plain"])
    old = _rewrite(path, tmp_path / "old.safetensors", lambda m: m.pop("tensor_digest", None))
    E.load(old, base())  # an older save: no digest, no check
    _poke(old, "erm.forgotten", 3, value=1)
    with pytest.raises(E.CheckpointError, match=r"lists forgotten classes \[\] but its "
                       r"erm.forgotten tensor marks \[3\]"):
        E.load(old, base())
    # metadata and flags agree on class 3, but its row of G is not zero
    both = _rewrite(old, tmp_path / "both.safetensors",
                    lambda m: m.update(forgotten_classes=[3]))
    with pytest.raises(E.CheckpointError, match=r"forgotten classes \[3\] have non-zero rows"):
        E.load(both, base())


# ------------------------------------------------------------------ 6. malformed metadata


@pytest.mark.parametrize("case", ["not json", "a list", "no surgery", "surgery without head"])
def test_malformed_metadata_is_a_checkpoint_error(tmp_path, blobs, case):
    path = put(tmp_path / "m.safetensors", blobs["plain"])
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["erm_surgery"])
    if case == "no surgery":
        del meta["surgery"]
    elif case == "surgery without head":
        del meta["surgery"]["head"]
    raw = {"not json": '{"format": "erm-surgery/1", ', "a list": "[1, 2]"}.get(
        case, json.dumps(meta))
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"erm_surgery": raw})
    for read in (E.read_metadata, lambda p: E.load(p, base())):
        with pytest.raises(E.CheckpointError, match="metadata") as err:
            read(bad)
        assert str(bad) in str(err.value)


def test_a_head_that_is_not_a_classifier_is_refused(tmp_path, blobs, model):
    with pytest.raises(E.SurgeryError, match=r"not a classifier.*\['fc'\]"):
        E.attach(base(), head="layer1")
    # a container of head modules (timm's ClassifierHead) is still a head
    assert E.attach(timm.create_model("test_convnext", num_classes=10), head="head")
    path = put(tmp_path / "m.safetensors", blobs["plain"])
    bad = _rewrite(path, tmp_path / "bad.safetensors",
                   lambda m: m["surgery"].update(head="conv1.0"))
    with pytest.raises(E.CheckpointError, match=r"does not fit.*not a classifier.*\['fc'\]"):
        E.load(bad, base())
    # a method that adds modules before the head (ESC) still reloads
    esc = E.unlearn(model, [3], tiny_data(), method="esc")
    E.load(E.save(esc, tmp_path / "esc.safetensors"), base())


# ------------------------------------------------------------------ 7. CLI outputs


def test_cli_checks_its_output_before_any_work(tmp_path, blobs, capsys, monkeypatch):
    def no_data(*args, **kwargs):
        pytest.fail("the data was loaded before the output was checked")

    monkeypatch.setattr("erm_surgery.cli.commands.unlearn.load_matching_data", no_data)
    path = put(tmp_path / "m.safetensors", blobs["cli"])
    before = path.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    folder = tmp_path / "folder"
    folder.mkdir()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("a file, not a folder")
    cases = {path: "--in-place", link: "--in-place", folder: "is a folder",
             a_file / "out.safetensors": "is a file, not a folder"}
    for out, text in cases.items():
        code, _, err = run_cli(capsys, "unlearn", path, "--classes", "3", "--out", out, *CLI_FT)
        assert code == 2 and text in err, (out, err)
        assert len(err.strip().splitlines()) == 1
    assert path.read_bytes() == before
