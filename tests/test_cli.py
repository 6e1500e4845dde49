"""The ``erm-surgery`` command line, end to end: real subprocesses on tiny configurations.

Every subprocess pays the imports (torch, timm) once, so the runs are few and small:
``demo --quick``, one ``train`` shared by the ``unlearn`` -> ``evaluate`` chain and the error
cases, and one ImageFolder run on a dozen generated PNGs. The rest runs in-process
(``main(argv)`` returns the exit code): the method options of ``unlearn`` (built from each
method's config class) and the error paths.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from erm_surgery import read_metadata
from erm_surgery.cli import main
from erm_surgery.cli.common import UsageError, format_table, parse_classes

REPORT_KEYS = {"forget_classes", "num_classes", "models", "metrics", "accuracy", "mia", "probe",
               "cka", "knn", "relearn", "erm", "resources", "notes"}
TINY = ["--max-samples", "400", "--no-progress"]


def cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m erm_surgery.cli ARGS`` in ``cwd``."""
    return subprocess.run([sys.executable, "-m", "erm_surgery.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def one_line_error(result: subprocess.CompletedProcess[str], code: int, command: str,
                   *texts: str) -> None:
    """Exit ``code``; stderr is one line, ``erm-surgery COMMAND: error: ...`` with ``texts``."""
    assert result.returncode == code, f"exit {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"erm-surgery {command}: error: "), lines[0]
    for text in texts:
        assert text in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ERM checkpoint written by ``erm-surgery train`` (3 ERM epochs on 400 digits:
    fewer leave a G that covers every channel, which KTP refuses)."""
    work = tmp_path_factory.mktemp("cli")
    ok(cli("train", "--model", "test_resnet", "--dataset", "mnist5k", "--epochs", "3",
           "--warmup-epochs", "0", "--erm-every", "1", "--batch-size", "64", "--out",
           "runs/m.safetensors", *TINY, cwd=work))
    return work / "runs" / "m.safetensors"


# --------------------------------------------------------------------------- demo


def test_demo_quick_through_the_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("erm-surgery")
    assert script.exists(), "the console script is missing: pip install -e . registers it"
    result = ok(subprocess.run([str(script), "demo", "--quick", "--out", "demo", "--no-progress"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=300))
    out = tmp_path / "demo"
    for name in ("original", "unlearned", "retrained"):
        assert (out / f"{name}.safetensors").is_file()
    for name in ("report.json", "report.md", "report.html", "erm_mask.png",
                 "per_class_accuracy.png"):
        assert (out / "report" / name).is_file(), name
    report = json.loads((out / "report" / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["forget_classes"] == [3, 7]
    assert report["models"] == ["model", "original", "retrained"]
    assert report["accuracy"]["model"]["forget_test"] == 0.0  # KTP blocks the forget rows
    assert report["erm"]["forget_rows_zero"] is True
    assert any(n.startswith("demo wall times") for n in report["notes"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unlearn_over_retrain"] > 0
    assert read_metadata(out / "unlearned.safetensors")["forgotten_classes"] == [3, 7]
    for row in ("forget acc (test)", "retain acc (test)", "probe acc, forget classes",
                "MIA attack acc", "CKA to original", "relearn epochs", "wall time",
                "unlearn / retrain wall time"):
        assert row in result.stdout, row


# ------------------------------------------------------------ train / unlearn / evaluate


def test_train_unlearn_evaluate(trained: Path) -> None:
    work = trained.parent.parent
    meta = read_metadata(trained)
    assert meta["extra"]["model_spec"] == {"model": "test_resnet", "num_classes": 10,
                                           "in_chans": 1, "image_size": 32}
    assert meta["extra"]["data"]["dataset"] == "mnist5k"
    assert len(meta["extra"]["training"]["history"]) == 3
    assert (work / "runs" / "m-run" / "history.json").is_file()

    result = ok(cli("unlearn", trained, "--classes", "3,7", "--recipe", "paper", "--epochs",
                    "1", *TINY, cwd=work))
    student = work / "runs" / "m-forget-3-7.safetensors"  # the default name
    assert f"saved {student}" in result.stdout
    assert "test accuracy: forget classes 0.0%" in result.stdout
    meta = read_metadata(student)
    assert meta["forgotten_classes"] == [3, 7]
    assert meta["extra"]["model_spec"]["model"] == "test_resnet"  # kept: evaluate needs it
    assert meta["extra"]["unlearning"]["method"] == "ktp"
    recipe = meta["extra"]["unlearning"]["config"]  # the paper's, with --epochs on top
    assert (recipe["optimizer"], recipe["label_weight"], recipe["epochs"]) == ("sgd", 0.0, 1)
    assert read_metadata(trained)["forgotten_classes"] == []  # the original is untouched

    # forget classes default to the recorded ones; no retrained reference: CKA to original
    # only. (Relearn and k-NN run in the demo test.)
    result = ok(cli("evaluate", student, "--original", trained, "--metrics", "accuracy", "mia",
                    "probe", "cka", "erm", "--probe-epochs", "2", "--no-plots", *TINY,
                    cwd=work))
    report_dir = work / "runs" / "m-forget-3-7-report"
    report = json.loads((report_dir / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["forget_classes"] == [3, 7]
    assert report["models"] == ["model", "original"]
    assert report["accuracy"]["model"]["forget_test"] == 0.0
    assert (report_dir / "report.md").is_file() and (report_dir / "report.html").is_file()
    assert not list(report_dir.glob("*.png"))  # --no-plots
    assert "Forget acc (test)" in result.stdout
    assert set(report["metrics"]) == {"accuracy", "mia", "probe", "cka", "erm"}
    assert "model~original" in report["cka"]


@pytest.mark.filterwarnings("ignore:knowledge entanglement")
def test_image_folder_train_and_unlearn_by_class_name(tmp_path: Path, monkeypatch,
                                                     capsys) -> None:
    from PIL import Image

    rng = random.Random(0)
    for split, n in (("train", 4), ("val", 2)):
        for c, name in enumerate(("cat", "dog", "owl")):
            folder = tmp_path / "pets" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                colour = tuple(min(255, 60 * c + rng.randrange(60)) for _ in range(3))
                Image.new("RGB", (20, 16), colour).save(folder / f"{i}.png")
    ok(cli("train", "--model", "test_resnet", "--dataset", "folder", "--data-root", "pets",
           "--image-size", "32", "--epochs", "6", "--erm-every", "1", "--warmup-epochs", "0",
           "--batch-size", "4", "--out", "f.safetensors", "--no-progress", cwd=tmp_path))
    meta = read_metadata(tmp_path / "f.safetensors")
    assert meta["extra"]["model_spec"] == {"model": "test_resnet", "num_classes": 3,
                                           "in_chans": 3, "image_size": 32}
    assert meta["extra"]["data"]["class_names"] == ["cat", "dog", "owl"]
    # the data root is recorded, so unlearn needs only the checkpoint; classes by name
    # (in-process: main() returns the exit code the console script exits with)
    monkeypatch.chdir(tmp_path)
    code = main(["unlearn", "f.safetensors", "--classes", "owl", "--epochs", "1", "--out",
                 "g.safetensors", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert "forgetting classes 2 (owl)" in capsys.readouterr().out
    assert read_metadata(tmp_path / "g.safetensors")["forgotten_classes"] == [2]


def test_cifar_layout_trains(tmp_path: Path, monkeypatch, capsys) -> None:
    """A CIFAR-10 folder in torchvision's layout (tiny fake batches; the MD5 check that real
    files pass is patched out) trains in-process with the augmenting transform."""
    import pickle

    import numpy as np
    import torchvision.datasets.cifar as tv_cifar

    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, 4)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    out = tmp_path / "c.safetensors"
    code = main(["train", "--model", "test_resnet", "--dataset", "cifar10", "--data-root",
                 str(folder), "--epochs", "1", "--batch-size", "8", "--workers", "0",
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert "cifar10 at" in capsys.readouterr().out
    extra = read_metadata(out)["extra"]
    assert extra["model_spec"] == {"model": "test_resnet", "num_classes": 10, "in_chans": 3,
                                   "image_size": 32}
    assert extra["data"]["class_names"] == names
    assert extra["data"]["data_root"] == str(folder.parent)  # the folder above the batches


# --------------------------------------------------------------------------- errors


def test_error_exit_codes_and_one_line_messages(trained: Path, tmp_path: Path) -> None:
    """Missing dataset root (1), unknown model (2), bad class id (2), missing checkpoint (1):
    four subprocesses at once (each mostly pays its imports)."""
    cases = {
        "missing dataset root": (["train", "--model", "test_resnet", "--dataset", "cifar10",
                                  "--data-root", tmp_path / "nowhere"],
                                 1, "train", "does not exist"),
        "unknown model": (["train", "--model", "resnet18x"],
                          2, "train", "unknown model 'resnet18x'", "did you mean"),
        "bad class id": (["unlearn", trained, "--classes", "12"],
                         2, "unlearn", "out of range, the model has 10 classes"),
        "missing checkpoint": (["evaluate", "missing.safetensors"],
                               1, "evaluate", "no checkpoint at missing.safetensors"),
    }
    running = {name: subprocess.Popen([sys.executable, "-m", "erm_surgery.cli",
                                       *map(str, argv)], cwd=tmp_path, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for name, (argv, *_) in cases.items()}
    for name, proc in running.items():
        stdout, stderr = proc.communicate(timeout=300)
        _, code, command, *texts = cases[name]
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        one_line_error(result, code, command, *texts)


# the remaining error paths run in-process: main() returns the exit code the console
# script passes to sys.exit


def run_main(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_cifar_root_without_the_unpacked_archive(tmp_path: Path, capsys) -> None:
    code, err = run_main(capsys, "train", "--model", "test_resnet", "--dataset", "cifar10",
                         "--data-root", tmp_path)
    assert code == 1 and "cifar-10-batches-py" in err and "never downloads" in err


def test_folder_without_val(tmp_path: Path, capsys) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    code, err = run_main(capsys, "train", "--model", "test_resnet", "--dataset", "folder",
                         "--data-root", tmp_path)
    assert code == 1 and "missing val/" in err


def test_dataset_needs_a_root(capsys) -> None:
    code, err = run_main(capsys, "train", "--model", "test_resnet", "--dataset", "cifar100")
    assert code == 2 and "--data-root" in err


def test_checkpoint_errors(trained: Path, tmp_path: Path, capsys) -> None:
    code, err = run_main(capsys, "evaluate", trained)  # nothing forgotten, no --classes
    assert code == 2 and "has forgotten no class" in err
    code, err = run_main(capsys, "unlearn", trained, "--classes", "3", "--threshold", "0.1",
                         "--method", "finetune")  # finetune's config has no threshold
    assert code == 2 and "--threshold is not an option of method 'finetune'" in err
    code, err = run_main(capsys, "unlearn", trained, "--classes", "3", "--out", "x",
                         "--in-place")
    assert code == 2 and "not both" in err
    # KTP needs a trained mask: a checkpoint whose training ran no ERM epoch is refused
    import timm

    from erm_surgery import attach
    from erm_surgery.cli.models import ModelSpec, save_checkpoint

    plain = tmp_path / "plain.safetensors"
    save_checkpoint(attach(timm.create_model("test_resnet", num_classes=10, in_chans=1)), plain,
                    ModelSpec("test_resnet", 10, 1, 32), {"dataset": "mnist5k"},
                    training={"history": [{"path": "std"}]})
    code, err = run_main(capsys, "unlearn", plain, "--classes", "3")
    assert code == 2 and "without an ERM epoch" in err
    code, err = run_main(capsys, "unlearn", plain, "--classes", "3", "--method", "ktp_ec")
    assert code == 2 and "method 'ktp_ec' reads G" in err  # any method with needs_attached
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    code, err = run_main(capsys, "unlearn", garbage, "--classes", "3")
    assert code == 1 and "not a readable safetensors file" in err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------- unlearn: options of any method


def test_unlearn_any_method_with_its_config_fields(trained: Path, tmp_path: Path,
                                                   capsys) -> None:
    """--epochs / --set reach a baseline's config; the checkpoint records each request."""
    first, second = tmp_path / "ft.safetensors", tmp_path / "ft-rl.safetensors"
    code, err = run_main(capsys, "unlearn", trained, "--classes", "3", "--method", "finetune",
                         "--epochs", "1", "--set", "lr=0.05", "--set", "momentum=0",
                         "--out", first, *TINY)
    assert code == 0, err
    extra = read_metadata(first)["extra"]
    info = extra["unlearning"]
    assert (info["method"], info["epochs"], info["lr"]) == ("finetune", 1, 0.05)
    assert info["forget_classes"] == [3]
    assert extra["unlearning_history"] == [{**info, "source": str(trained)}]
    assert extra["model_spec"]["model"] == "test_resnet"  # kept for the next command
    # a second request on the result: the history grows (record_unlearning)
    code, err = run_main(capsys, "unlearn", first, "--classes", "5", "--method",
                         "random_labels", "--set", "batch_size=128", "--out", second, *TINY)
    assert code == 0, err
    meta = read_metadata(second)
    assert meta["forgotten_classes"] == [3, 5]
    history = meta["extra"]["unlearning_history"]
    assert [(h["method"], h["source"]) for h in history] == [("finetune", str(trained)),
                                                             ("random_labels", str(first))]
    assert meta["extra"]["unlearning"]["method"] == "random_labels"


def test_unlearn_method_option_errors(trained: Path, tmp_path: Path, capsys) -> None:
    """Every option mistake is one line, exit 2, before any data or model is loaded."""
    out = tmp_path / "never.safetensors"
    code, err = run_main(capsys, "unlearn", trained, "--classes", "3", "--method", "finetune",
                         "--set", "nosuch=1", "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown field 'nosuch'" in err
    assert "method 'finetune' (FinetuneConfig) has the fields epochs, lr, batch_size" in err
    code, err = run_main(capsys, "unlearn", trained, "--classes", "3", "--method", "finetune",
                         "--set", "epochs=two", "--out", out)
    assert code == 2 and "epochs of method 'finetune' takes an int, got 'two'" in err
    code, err = run_main(capsys, "unlearn", trained, "--classes", "3", "--epochs", "1",
                         "--set", "epochs=2", "--out", out)
    assert code == 2 and "both set epochs" in err
    code, err = run_main(capsys, "unlearn", trained, "--classes", "3", "--method", "esc",
                         "--recipe", "paper", "--out", out)
    assert code == 2 and "--recipe is a KTP option" in err
    code, err = run_main(capsys, "unlearn", trained, "--classes", "3", "--set", "threshold=2",
                         "--out", out)  # the config's own check
    assert code == 2 and "threshold must be in [0, 1)" in err
    assert not out.exists()
    for argv, text in ((["--method", "amnesiac"], "invalid choice: 'amnesiac'"),
                       (["--method", "sisa"], "invalid choice: 'sisa'"),
                       (["--set", "lr"], "expected FIELD=VALUE")):
        with pytest.raises(SystemExit) as exc:
            main(["unlearn", str(trained), "--classes", "3", *argv])
        assert exc.value.code == 2
        assert text in capsys.readouterr().err


def test_unlearn_refuses_a_method_whose_result_cannot_be_reloaded(trained: Path, tmp_path: Path,
                                                                   monkeypatch, capsys) -> None:
    import dataclasses

    import erm_surgery.unlearning as unlearning

    real = unlearning.get_method
    monkeypatch.setattr(unlearning, "get_method",
                        lambda name: dataclasses.replace(real(name), reloadable=False))
    code, err = run_main(capsys, "unlearn", trained, "--classes", "3", "--in-place")
    assert code == 2 and "cannot save it in place" in err
    assert read_metadata(trained)["forgotten_classes"] == []


def test_method_config_from_the_config_class() -> None:
    """--set's values are parsed by the field's type, nested configs included."""
    from erm_surgery.cli.method_options import method_config
    from erm_surgery.unlearning import get_method

    run = {"seed": 4, "show_progress": False, "num_workers": 2}
    cfg = method_config(get_method("ktp"), flags={"epochs": 1, "lr": None}, recipe="paper",
                        sets=[("cache_teacher", "none"), ("train_head", "true")], run=run)
    assert (cfg.epochs, cfg.optimizer, cfg.label_weight) == (1, "sgd", 0.0)  # paper + flag
    assert (cfg.cache_teacher, cfg.train_head) == (None, True)
    assert (cfg.seed, cfg.show_progress, cfg.num_workers) == (4, False, 2)
    esc = method_config(get_method("esc"), sets=[("k", "4")], run=run)  # no seed field
    assert esc.k == 4
    ec = method_config(get_method("ec"), sets=[("layers", "a,b"), ("layer_weights", "1,0.5")])
    assert (ec.layers, ec.layer_weights) == (["a", "b"], [1.0, 0.5])
    both = method_config(get_method("ktp_ec"), sets=[("ktp.epochs", "1"), ("ec.lr", "0.5")],
                         run=run)
    assert (both.ktp.epochs, both.ec.lr, both.ktp.seed, both.ec.show_progress) == \
        (1, 0.5, 4, False)
    with pytest.raises(UsageError, match=r"ktp \(KTPConfig\) has the fields epochs"):
        method_config(get_method("ktp_ec"), sets=[("ktp.nosuch", "1")])
    with pytest.raises(UsageError, match="only None can be set"):
        method_config(get_method("retrain"), sets=[("erm_config", "x")])


def test_usage_errors_from_argparse(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train"])
    assert exc.value.code == 2
    assert "the following arguments are required: --model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "test_resnet", "--epochs", "0"])
    assert exc.value.code == 2


def test_traceback_flag_reraises(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no checkpoint at"):
        main(["unlearn", str(tmp_path / "none.safetensors"), "--classes", "1", "--traceback"])


def test_help_shows_examples(capsys) -> None:
    for argv in ([], ["demo"], ["train"], ["unlearn"], ["evaluate"]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text, argv
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "accelerate launch" in text and "--data-root" in text and "tv:resnet18" in text


def test_unlearn_help_lists_the_methods_from_the_registry(capsys) -> None:
    from erm_surgery.unlearning import available_methods, get_method

    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--set FIELD=VALUE" in text
    for name in available_methods():
        spec = get_method(name)
        if spec.cli:
            assert f" {name} {' '.join(spec.summary.split())}" in text, name
        else:
            assert f" {name} {' '.join(spec.summary.split())}" not in text, name
    assert "epochs=2 lr=0.1 batch_size=64" in text  # finetune's fields and defaults


# --------------------------------------------------------------------------- helpers


def test_parse_classes() -> None:
    assert parse_classes(["3,7", "1"], 10) == [1, 3, 7]
    assert parse_classes(["cat", "2"], 3, ["cat", "dog", "owl"]) == [0, 2]
    with pytest.raises(UsageError, match="out of range"):
        parse_classes(["10"], 10)
    with pytest.raises(UsageError, match="unknown class 'cow'"):
        parse_classes(["cow"], 3, ["cat", "dog", "owl"])
    with pytest.raises(UsageError, match="no class"):
        parse_classes([""], 3)


def test_format_table() -> None:
    text = format_table(["", "a", "bb"], [["row", "1", "22"], ["longer row", "333", "4"]])
    assert text.splitlines() == [
        "              a  bb",
        "----------  ---  --",
        "row           1  22",
        "longer row  333   4",
    ]


def test_esc_checkpoint_reads_back(trained: Path) -> None:
    import torch

    from erm_surgery.cli.models import load_checkpoint

    work = trained.parent.parent
    out = work / "runs" / "m-esc.safetensors"
    ok(cli("unlearn", trained, "--classes", "2", "--method", "esc", "--out", out, *TINY,
           cwd=work))
    model, meta, _ = load_checkpoint(out)  # evaluate and a second unlearn read it this way
    assert any(k.startswith("model.esc_projection") for k in model.state_dict())
    original, _, _ = load_checkpoint(trained)
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model(x), original(x)), "the projection is in the graph"
    assert torch.equal(model.erm.G, original.erm.G)


def test_unlearn_refuses_a_g_that_has_not_separated_the_classes(tmp_path: Path) -> None:
    """One ERM epoch (7 steps of G) leaves every entry of G above 0: KTP would prohibit
    every channel. One line with the reason and the fix, exit 1, nothing written."""
    ok(cli("train", "--model", "test_resnet", "--dataset", "mnist5k", "--epochs", "1",
           "--warmup-epochs", "0", "--erm-every", "1", "--batch-size", "64", "--out",
           "short.safetensors", *TINY,
           cwd=tmp_path))
    result = cli("unlearn", "short.safetensors", "--classes", "3", "--epochs", "1", *TINY,
                 cwd=tmp_path)
    one_line_error(result, 1, "unlearn", "G has not separated the classes",
                   "cover all 96 channels", "Train with ERM until the classes separate")
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["short.safetensors"]
    assert read_metadata(tmp_path / "short.safetensors")["forgotten_classes"] == []
