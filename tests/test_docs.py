"""The code in the docs runs."""

import re
from pathlib import Path

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
