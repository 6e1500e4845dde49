"""Loss-based membership-inference attack (MIA) on the forget set.

The attacker sees one number per sample, its cross-entropy loss, and must tell the
forget-class *training* samples (members) from the forget-class *test* samples
(non-members). A model that still remembers its training samples gives them lower loss,
so the attack succeeds (accuracy > 0.5); a model retrained without them cannot tell them
apart (about 0.5). This is the reference protocol of the ESC / SCRUB code: a logistic
regression, classes balanced by subsampling, stratified k-fold cross-validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MIAResult", "per_sample_loss", "membership_inference"]


@dataclass
class MIAResult:
    """Outcome of the attack.

    Attributes:
        accuracy: mean held-out attack accuracy over the folds (0.5 = no signal, 1.0 =
            members perfectly identified); NaN when there were too few samples.
        std: standard deviation of the fold accuracies.
        n_per_side: members = non-members used after balancing.
        folds: folds actually used (fewer than requested on tiny forget sets).
        member_loss_mean: mean loss of the members, before capping (``inf`` when a model
            hard-masks the class; None in JSON).
        nonmember_loss_mean: mean loss of the non-members, before capping.
    """

    accuracy: float
    std: float
    n_per_side: int
    folds: int
    member_loss_mean: float
    nonmember_loss_mean: float


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each sample, ``(N,)`` float64 on CPU.

    A model that hides a class by setting its logit to ``-inf`` gives an infinite loss;
    it is kept as ``inf`` here and capped by :func:`membership_inference` (an attack
    feature must be finite, and every infinite loss is "the same, largest" loss).
    """
    logp = F.log_softmax(logits.detach().double().cpu(), dim=1)
    loss = -logp.gather(1, labels.detach().cpu().long().view(-1, 1)).squeeze(1)
    # NaN (every logit -inf) is as "unlikely" as it gets; nan_to_num would also clip inf
    return torch.where(torch.isnan(loss), math.inf, loss)


def _cap(member: torch.Tensor, nonmember: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    both = torch.cat([member, nonmember])
    finite = both[torch.isfinite(both)]
    cap = float(finite.max()) + 1.0 if finite.numel() else 1.0
    return (torch.nan_to_num(member, nan=cap, posinf=cap, neginf=0.0),
            torch.nan_to_num(nonmember, nan=cap, posinf=cap, neginf=0.0))


def membership_inference(
    member_losses: torch.Tensor,
    nonmember_losses: torch.Tensor,
    *,
    folds: int = 5,
    seed: int = 0,
) -> MIAResult:
    """Attack accuracy of a logistic regression on per-sample losses.

    The larger side is subsampled (seeded) to the size of the smaller so that 0.5 is the
    chance level; then ``folds``-fold stratified cross-validation (shuffled, seeded)
    trains on k-1 folds and reports the mean accuracy on the held-out fold.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    member = torch.as_tensor(member_losses).detach().double().cpu().flatten()
    nonmember = torch.as_tensor(nonmember_losses).detach().double().cpu().flatten()
    means = (_mean(member), _mean(nonmember))
    member, nonmember = _cap(member, nonmember)
    n = min(member.numel(), nonmember.numel())
    n_splits = min(folds, n)
    if n_splits < 2:  # stratified CV needs two samples of each kind at least
        return MIAResult(math.nan, math.nan, n, 0, *means)
    gen = torch.Generator().manual_seed(seed)
    member = member[torch.randperm(member.numel(), generator=gen)[:n]]
    nonmember = nonmember[torch.randperm(nonmember.numel(), generator=gen)[:n]]

    x = torch.cat([member, nonmember]).numpy().reshape(-1, 1)
    y = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    scores = []
    for train_idx, test_idx in cv.split(x, y):
        # scaling keeps lbfgs well conditioned whatever the loss range (capped infinities)
        attack = make_pipeline(StandardScaler(), LogisticRegression())
        attack.fit(x[train_idx], y[train_idx])
        scores.append(float(attack.score(x[test_idx], y[test_idx])))
    return MIAResult(
        accuracy=float(np.mean(scores)),
        std=float(np.std(scores)),
        n_per_side=n,
        folds=n_splits,
        member_loss_mean=means[0],
        nonmember_loss_mean=means[1],
    )


def _mean(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() else math.nan
