"""ZRF (zero retrain forgetting) score, Chundawat et al. 2023 ("Bad Teacher").

A diagnostic, reported because users ask for it by name; like every score that reads only
the outputs, a model that blocks the forget classes' logits passes it (docs/evaluation.md,
"Calibration"). ZRF = 1 - mean over the forget-class training samples of the
Jensen-Shannon divergence (natural log, per sample) between the model's softmax output
and that of a randomly initialised model of the same architecture. 1 = the model answers
like a random model on the forget set; lower = it still answers with knowledge.

The Bad-Teacher reference code averages ``F.kl_div`` over every element (divides by C
as well); this module takes the per-sample divergence, so the values are not comparable
to numbers computed that way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ZRFResult", "js_divergence", "zrf_score"]


@dataclass
class ZRFResult:
    """ZRF on the forget-class training samples.

    Attributes:
        score: 1 - mean JS divergence (in ``[1 - ln 2, 1]``; NaN without samples).
        n_samples: samples it was measured on.
    """

    score: float
    n_samples: int


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen-Shannon divergence (nats) between the softmaxes of two logit tensors."""
    logp = F.log_softmax(logits_p.detach().double().cpu(), dim=1)
    logq = F.log_softmax(logits_q.detach().double().cpu(), dim=1)
    p, q = logp.exp(), logq.exp()
    logm = torch.log((p + q) / 2)

    def kl(prob: torch.Tensor, logprob: torch.Tensor) -> torch.Tensor:
        # 0 log 0 = 0: a class blocked at -inf contributes nothing
        return torch.where(prob > 0, prob * (logprob - logm), torch.zeros_like(prob)).sum(1)

    return 0.5 * kl(p, logp) + 0.5 * kl(q, logq)


def zrf_score(model_logits: torch.Tensor, random_logits: torch.Tensor) -> ZRFResult:
    """ZRF from the model's and a random model's logits on the same forget samples."""
    if model_logits.shape != random_logits.shape:
        raise ValueError(f"ZRF needs logits of the same samples: {tuple(model_logits.shape)} "
                         f"vs {tuple(random_logits.shape)}")
    n = int(model_logits.shape[0])
    if n == 0:
        return ZRFResult(math.nan, 0)
    return ZRFResult(float(1.0 - js_divergence(model_logits, random_logits).mean()), n)
