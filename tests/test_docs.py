"""The code in the docs runs."""

import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

DOCS = Path(__file__).parent.parent / "docs"


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


# two epochs hold no ERM epoch, so G is untrained and KTP prohibits every channel: this
# test checks that the printed code runs, the quality is measured in test_unlearning.py
@pytest.mark.filterwarnings("ignore:knowledge entanglement")
def test_readme_quickstart_runs(tmp_path, monkeypatch):
    """The README's quickstart, as printed, on fewer digits and epochs (about 20 s)."""
    from torch.utils.data import Subset

    from erm_surgery import data as data_module

    readme = (DOCS.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
                 if "erm_surgery.attach(" in b)
    assert "epochs=16" in block
    block = block.replace("epochs=16", "epochs=2")
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
    """``{class name: {field: default as written}}`` for every field table of a doc page.

    A table belongs to the nearest heading ``### `erm_surgery.Name` `` or line
    ``` `Name` fields:``` above it.
    """
    tables: dict[str, dict[str, str]] = {}
    owner = None
    rows = None
    for line in (DOCS / name).read_text().splitlines():
        heading = re.match(r"#+ `erm_surgery\.(\w+)`$|`(\w+)` fields:$", line)
        if heading:
            owner = heading.group(1) or heading.group(2)
        elif line.startswith("| field | default |"):
            rows = tables.setdefault(owner, {})
        elif rows is not None and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1]
        elif rows is not None and not line.startswith("| ---"):
            rows = None
    return tables


def _find_class(name: str):
    import importlib

    modules = ["erm_surgery", "erm_surgery.methods.esc", "erm_surgery.methods.ec",
               "erm_surgery.methods.baselines", "erm_surgery.methods.sisa",
               "erm_surgery.evaluation"]
    for module in modules:
        found = getattr(importlib.import_module(module), name, None)
        if found is not None:
            return found
    raise AssertionError(f"docs/api.md documents {name}, which erm_surgery does not have")


def test_api_field_tables_match_the_dataclasses():
    """Every dataclass field table in docs/api.md lists the real fields and defaults."""
    import dataclasses

    tables = documented_field_tables("api.md")
    assert {"KTPConfig", "ERMConfig", "EvalConfig", "ESCConfig", "ECConfig"} <= set(tables)
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
