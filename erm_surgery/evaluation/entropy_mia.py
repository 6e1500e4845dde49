"""Entropy-based membership inference, as the SSD / Bad-Teacher reference code computes it.

A diagnostic, reported because users ask for it by name; it reads only the output
distribution, so a model that merely blocks the forget classes' logits passes it (see
docs/evaluation.md, "Calibration"). The attack: a logistic regression on the entropy of
the softmax output, fitted with retain-class training samples as members (1) and the
test samples as non-members (0), class-balanced; the score is the fraction of
forget-class training samples it calls members. Lower reads as "forgotten"; the
original model usually scores high, a retrained one low.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["EntropyMIAResult", "output_entropy", "entropy_mia"]


@dataclass
class EntropyMIAResult:
    """Outcome of the entropy attack.

    Attributes:
        member_fraction: fraction of forget-class training samples predicted "member"
            (NaN when a side had no samples).
        n_members: retain-class training samples the attack was fitted on (members).
        n_nonmembers: test samples it was fitted on (non-members).
        n_forget: forget-class training samples it was asked about.
        forget_entropy_mean: mean output entropy (nats) on the forget-class training samples.
    """

    member_fraction: float
    n_members: int
    n_nonmembers: int
    n_forget: int
    forget_entropy_mean: float


def output_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the softmax of each row, ``(N,)`` float64; 0 log 0 counts as 0, so
    a class blocked at ``-inf`` adds nothing."""
    logp = F.log_softmax(logits.detach().double().cpu(), dim=1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=1)


def entropy_mia(retain_train_logits: torch.Tensor, test_logits: torch.Tensor,
                forget_train_logits: torch.Tensor) -> EntropyMIAResult:
    """Fraction of forget-class training samples an entropy-based attack calls members.

    Args:
        retain_train_logits: logits of the retain-class training samples (members).
        test_logits: logits of held-out samples (non-members).
        forget_train_logits: logits of the forget-class training samples (queried).
    """
    from sklearn.linear_model import LogisticRegression

    members = output_entropy(retain_train_logits).numpy()
    nonmembers = output_entropy(test_logits).numpy()
    forget = output_entropy(forget_train_logits).numpy()
    n_m, n_n, n_f = len(members), len(nonmembers), len(forget)
    mean_f = float(forget.mean()) if n_f else math.nan
    if not (n_m and n_n and n_f):
        return EntropyMIAResult(math.nan, n_m, n_n, n_f, mean_f)
    x = np.concatenate([members, nonmembers]).reshape(-1, 1)
    y = np.concatenate([np.ones(n_m, dtype=np.int64), np.zeros(n_n, dtype=np.int64)])
    attack = LogisticRegression(class_weight="balanced", solver="lbfgs")
    attack.fit(x, y)
    called = attack.predict(forget.reshape(-1, 1))
    return EntropyMIAResult(float(called.mean()), n_m, n_n, n_f, mean_f)
