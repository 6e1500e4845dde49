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
