"""Paper Table 2 as a function: does prohibiting a class's channels remove that class only?"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import make_loader
from ..surgery import ERMModel, apply_channel_mask

__all__ = ["ProhibitionResult", "prohibition_accuracy"]


@dataclass
class ProhibitionResult:
    """Per class ``c``: accuracy with c's channels prohibited, on c's samples and on the rest.

    ``prohibited[c]``: accuracy on class-c samples when every channel class c uses is set to
    0 (should fall to ~0). ``permitted[c]``: accuracy on the other classes' samples under the
    same mask (should stay at the STD accuracy). ``channels[c]``: how many channels that is.
    """

    prohibited: list[float]
    permitted: list[float]
    channels: list[int]
    std_accuracy: float
    threshold: float

    @property
    def mean_prohibited(self) -> float:
        return sum(self.prohibited) / len(self.prohibited)

    @property
    def mean_permitted(self) -> float:
        return sum(self.permitted) / len(self.permitted)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(mean_prohibited=self.mean_prohibited, mean_permitted=self.mean_permitted)
        return d


@torch.no_grad()
def prohibition_accuracy(
    model: ERMModel,
    data: Dataset | DataLoader,
    *,
    threshold: float = 0.0,
    batch_size: int = 256,
) -> ProhibitionResult:
    """Run every class's prohibition mask over ``data`` (one feature pass per batch).

    A channel is prohibited for class ``c`` when ``G[c, k] > threshold``. The feature map is
    computed once per batch and each of the C masks only re-runs the head.
    """
    if not isinstance(model, ERMModel):
        raise TypeError("prohibition_accuracy() takes a model returned by attach()")
    was_training = model.training
    model.eval()
    C = model.num_classes
    device = model.erm.G.device
    keep = torch.stack([model.erm.keep_mask([c], threshold) for c in range(C)]).float()
    # correct[c, 0]: class-c samples right under mask c; correct[c, 1]: others right under c
    correct = torch.zeros(C, 2, device=device)
    counts = torch.zeros(C, device=device)
    std_correct = torch.zeros((), device=device)
    for x, y in make_loader(data, batch_size):
        x, y = x.to(device), y.to(device)
        feats = model.forward_features(x)
        std_correct += (model.forward_head(feats).argmax(1) == y).sum()
        counts += torch.bincount(y, minlength=C).float()
        own = torch.nn.functional.one_hot(y, C).bool()  # (N, C)
        for c in range(C):
            masked = apply_channel_mask(feats, keep[c], model.surgery.channel_dim)
            right = model.forward_head(masked).argmax(1) == y
            correct[c, 0] += (right & own[:, c]).sum()
            correct[c, 1] += (right & ~own[:, c]).sum()
    model.train(was_training)
    total = counts.sum()
    prohibited = (correct[:, 0] / counts.clamp_min(1)).tolist()
    permitted = (correct[:, 1] / (total - counts).clamp_min(1)).tolist()
    channels = (keep == 0).sum(dim=1).tolist()
    return ProhibitionResult(prohibited=prohibited, permitted=permitted, channels=channels,
                             std_accuracy=float(std_correct / total.clamp_min(1)),
                             threshold=threshold)
