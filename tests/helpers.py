"""Helpers several test files share (pytest puts this folder on sys.path)."""

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

#: the classes the digits teacher's update recorder watches (conftest.py): Amnesiac can
#: forget only these, so the baselines and the method contract forget them
RECORDED = [4, 9]


@torch.no_grad()
def accuracy(model, data, classes) -> float:
    """Eval-mode top-1 accuracy of ``model`` on the samples of ``data`` in ``classes``,
    computed here independently of the library's evaluation code."""
    model.eval()
    right = total = 0
    for x, y in DataLoader(data, batch_size=500):
        keep = torch.isin(y, torch.tensor(classes))
        right += (model(x).argmax(1)[keep] == y[keep]).sum().item()
        total += keep.sum().item()
    return right / total


def state(model) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state dict, to compare with :func:`unchanged` later."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model, before: dict[str, torch.Tensor]) -> bool:
    """``model``'s state dict is ``before``, bit for bit (same keys, equal tensors)."""
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k])
                                                 for k in before)


def tensors_of(data: Dataset) -> list[torch.Tensor]:
    """The tensors behind a ``TensorDataset`` (or a ``Subset`` of one), to check that a
    method left its data as it was."""
    while isinstance(data, Subset):
        data = data.dataset
    assert isinstance(data, TensorDataset), type(data)
    return list(data.tensors)


@torch.no_grad()
def entangled_but_separated(model, shared: int = 60, own: int = 3):
    """Set an attached model's ``G`` by hand: ``shared`` channels every class uses, then
    ``own`` channels per class. KTP can run on it (no class loses every channel) and its
    entanglement warning fires (each class loses the shared channels)."""
    G = model.erm.G
    G.zero_()
    G[:, :shared] = 1.0
    for c in range(G.shape[0]):
        G[c, shared + own * c:shared + own * (c + 1)] = 1.0
    return model


@torch.no_grad()
def separated(model, own: int = 4):
    """Set an attached model's ``G`` by hand to ``own`` disjoint channels per class (the
    rest unused): what ERM training converges to, for tests of something else that need
    KTP to run (KTP refuses a ``G`` that has not separated the classes)."""
    G = model.erm.G
    G.zero_()
    for c in range(G.shape[0]):
        G[c, own * c:own * (c + 1)] = 1.0
    return model
