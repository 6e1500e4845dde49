"""The code in the docs runs."""

import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"


def python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)


def test_hand_written_accelerate_loop_in_training_docs_trains_g():
    block = next(b for b in python_blocks("training.md") if "Accelerator(" in b)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 16, 16, generator=g)
    y = torch.arange(128) % 10
    namespace = {"train_set": TensorDataset(x, y), "epochs": 3}
    exec(compile(block, "docs/training.md", "exec"), namespace)
    G = namespace["accelerator"].unwrap_model(namespace["model"]).erm.G
    assert G.max() <= 1 and G.min() >= 0
    assert torch.allclose(G.amax(dim=1), torch.ones(10)), "projected: every row has max 1"
    assert not torch.all(G == 0.5), "ERM epochs moved G"


# 6 epochs (3 of them ERM) are the fewest on 1,200 digits after which G leaves KTP
# channels to distil (3 and 4 epochs: refused, G covers every channel); this test checks
# that the printed code runs, the quality is measured in test_unlearning.py
@pytest.mark.filterwarnings("ignore:knowledge entanglement", "ignore:ERM prohibition is weak")
def test_readme_quickstart_runs(tmp_path, monkeypatch):
    """The README's quickstart, as printed, on fewer digits and epochs (about 40 s)."""
    from torch.utils.data import Subset

    from erm_surgery import data as data_module

    readme = (DOCS.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
                 if "erm_surgery.attach(" in b)
    assert "epochs=16" in block
    block = block.replace("epochs=16", "epochs=6")
    full_load = data_module.load_mnist5k

    def small_load(*args, **kwargs):
        train_set, test_set = full_load(*args, **kwargs)
        return Subset(train_set, range(1200)), Subset(test_set, range(400))

    monkeypatch.setattr(data_module, "load_mnist5k", small_load)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    report = namespace["report"]
    assert report.accuracy["model"].forget_test == 0.0
    assert (tmp_path / "report" / "report.json").is_file()
    assert (tmp_path / "student.safetensors").is_file()


def documented_field_tables(name: str) -> dict[str, dict[str, str]]:
    """``{class: {field: default as written}}`` for every field table of a doc page.

    A table belongs to the nearest heading ``### `erm_surgery.path.Name` `` (the class is
    then the full dotted path) or line ``` `Name` fields:``` (the bare name) above it.
    """
    tables: dict[str, dict[str, str]] = {}
    owner = None
    rows = None
    for line in (DOCS / name).read_text().splitlines():
        heading = re.match(r"#+ `(erm_surgery(?:\.\w+)+)`$|`(\w+)` fields:$", line)
        if heading:
            owner = heading.group(1) or heading.group(2)
        elif line.startswith("| field | default |"):
            assert owner not in tables, f"docs/{name}: two field tables for {owner}"
            rows = tables.setdefault(owner, {})
        elif rows is not None and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1]
        elif rows is not None and not line.startswith("| ---"):
            rows = None
    return tables


# where a bare ``Name`` of a field table is looked up (a dotted heading is resolved as is)
_MODULES = ["erm_surgery", "erm_surgery.surgery", "erm_surgery.training",
            "erm_surgery.training.optim", "erm_surgery.unlearning", "erm_surgery.methods.ktp",
            "erm_surgery.methods.esc", "erm_surgery.methods.ec", "erm_surgery.methods.baselines",
            "erm_surgery.methods.baselines.sisa", "erm_surgery.evaluation"]


def _find_class(name: str):
    import importlib

    if "." in name:  # erm_surgery.path.Name: the documented path must exist
        module, _, attr = name.rpartition(".")
        found = getattr(importlib.import_module(module), attr, None)
        assert found is not None, f"docs/api.md documents {name}, which does not exist"
        return found
    for module in _MODULES:
        found = getattr(importlib.import_module(module), name, None)
        if found is not None:
            return found
    raise AssertionError(f"docs/api.md documents {name}, which erm_surgery does not have")


def test_api_field_tables_match_the_dataclasses():
    """Every dataclass field table in docs/api.md lists the real fields and defaults."""
    import dataclasses

    tables = documented_field_tables("api.md")
    owners = {owner.rpartition(".")[2] for owner in tables}
    assert {"KTPConfig", "KTPInfo", "ERMConfig", "EvalConfig", "ESCConfig", "ECConfig",
            "Recipe", "MethodInfo", "MethodSpec", "BaselineInfo"} <= owners
    wrong = []
    for name, documented in tables.items():
        cls = _find_class(name)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert list(documented) == list(fields), f"{name}: fields differ from the docs"
        for field_name, written in documented.items():
            field = fields[field_name]
            if field.default is not dataclasses.MISSING:
                value = field.default
            elif field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            else:
                if written != "required":
                    wrong.append(f"{name}.{field_name}: docs {written}, code required")
                continue
            if dataclasses.is_dataclass(value):  # a nested config: only what differs
                base = type(value)()
                changed = ", ".join(f"{f.name}={getattr(value, f.name)!r}"
                                    for f in dataclasses.fields(value)
                                    if getattr(value, f.name) != getattr(base, f.name))
                actual = f"`{type(value).__name__}({changed})`"
            else:
                actual = f"`{value!r}`"
            if written != actual:
                wrong.append(f"{name}.{field_name}: docs {written}, code {actual}")
    assert not wrong, "\n".join(wrong)


def test_architecture_add_a_method_example_runs():
    """docs/architecture.md's "add a method in one file" block, as printed, on a tiny model;
    the registration is removed again so that no other test sees "zero_head"."""
    import timm

    import erm_surgery
    from erm_surgery.unlearning import MethodInfo, get_method, registry

    block = next(b for b in python_blocks("architecture.md") if "@register_method" in b)
    g = torch.Generator().manual_seed(0)
    train_set = TensorDataset(torch.randn(64, 1, 32, 32, generator=g), torch.arange(64) % 10)
    torch.manual_seed(0)
    model = erm_surgery.attach(timm.create_model("test_resnet", num_classes=10, in_chans=1))
    model.eval()
    namespace = {"__name__": "docs_architecture", "model": model, "train_set": train_set}
    assert "zero_head" not in erm_surgery.available_methods()
    try:
        exec(compile(block, "docs/architecture.md", "exec"), namespace)
        x = train_set.tensors[0][:8]
        with torch.no_grad():
            before = model(x)
            student = namespace["student"]  # the block's call: bias=-50.0 as an override
            assert torch.all(student(x)[:, 3] == -50.0)
            again = erm_surgery.unlearn(model, [3], train_set, method="zero_head")
            after = again(x)
        info = again.unlearning_info
        assert type(info).__name__ == "ZeroHeadInfo" and isinstance(info, MethodInfo)
        assert info.forget_classes == [3] and info.bias == -1e4 and info.seconds > 0
        assert get_method("zero_head").info_cls is type(info)
        assert torch.all(after[:, 3] == -1e4) and not torch.allclose(after[:, 3], before[:, 3])
        keep = [c for c in range(10) if c != 3]
        assert torch.equal(after[:, keep], before[:, keep]), "only the forget logits change"
        assert again.erm.forgotten_classes == [3] and model.erm.forgotten_classes == []
        with pytest.raises(TypeError, match="bias"):
            erm_surgery.unlearn(model, [3], train_set, method="zero_head", lr=0.1)
    finally:
        registry._METHODS.pop("zero_head", None)
    assert "zero_head" not in erm_surgery.available_methods()


@pytest.mark.filterwarnings("ignore:knowledge entanglement", "ignore:ERM prohibition is weak")
def test_the_timm_style_training_script_runs(monkeypatch):
    """docs/examples/timm_style_train.py (own Accelerator, timm optimizer + scheduler,
    Mixup/CutMix with soft targets through erm_loss, EMA, then unlearn from the EMA copy
    with the live model's G) on 400 digits for 6 epochs."""
    monkeypatch.syspath_prepend(str(DOCS / "examples"))
    import timm_style_train

    result = timm_style_train.main(["--n-train", "400", "--n-test", "200", "--epochs", "6",
                                    "--batch-size", "32", "--unlearn-epochs", "1"])
    assert result["std_accuracy"] > 0.5  # mixup + ERM learned the digits
    # a working EMA learned the digits too (a never-updated one stays at chance, 0.1);
    # how close it comes to the live model depends on the last few of 78 steps: 0.81 vs
    # 0.815 with two threads, 0.695 vs 0.805 with one (same seed, other float sums)
    assert result["ema_accuracy"] > 0.5
    assert result["prohibited"] <= 0.05  # G separated the classes under soft targets
    assert result["student_forget"] == 0.0


def _github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation other than '-' and
    '_' dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        base = _github_anchor(line.lstrip("#"))
        n = seen.get(base, 0)  # GitHub numbers repeated headings: name, name-1, ...
        seen[base] = n + 1
        anchors.add(base if n == 0 else f"{base}-{n}")
    return anchors


def test_relative_links_in_the_docs_point_at_files_and_headings_that_exist():
    """A doc edit that drops a section (or renames a file) breaks the links to it
    silently; this lists every relative link whose file or heading is missing."""
    pages = [ROOT / "README.md", ROOT / "benchmarks" / "README.md",
             *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
