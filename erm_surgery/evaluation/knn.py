"""k-NN retrieval agreement between two models (EC paper's representation check).

For each forget-class test sample, each model retrieves its ``k`` nearest training
samples by cosine similarity of its own pooled features. If the unlearned model's
neighbourhoods are those of a model retrained without the forget classes, the forget
samples "look like" the same training samples to both: agreement near 1. A model that
still clusters them with their own class agrees less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["KNNResult", "knn_indices", "knn_agreement"]


@dataclass
class KNNResult:
    """Mean fraction of shared top-k neighbours (1 = identical retrieval, ~k/N = random).

    Attributes:
        reference: the model compared with (``"retrained"``).
        agreement: mean over queries of ``|top-k(A) & top-k(B)| / k``.
        k: neighbours per query.
        n_queries: forget-class test samples used as queries.
    """

    reference: str
    agreement: float
    k: int
    n_queries: int


def knn_indices(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 1024
                ) -> torch.Tensor:
    """``(n_queries, k)`` indices of the ``k`` keys most cosine-similar to each query.

    Processed in chunks of queries so that the similarity matrix never needs more than
    ``chunk x n_keys`` floats.
    """
    k = min(k, keys.shape[0])
    q = F.normalize(queries.detach().float().flatten(1), dim=1)
    kn = F.normalize(keys.detach().float().flatten(1).to(q.device), dim=1)
    out = [torch.topk(q[s:s + chunk] @ kn.T, k, dim=1).indices for s in range(0, len(q), chunk)]
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long)


def knn_agreement(
    query_a: torch.Tensor,
    keys_a: torch.Tensor,
    query_b: torch.Tensor,
    keys_b: torch.Tensor,
    k: int = 10,
    *,
    reference: str = "retrained",
) -> KNNResult:
    """Agreement of model A's and model B's k-NN retrieval for the same queries and keys.

    ``query_*`` are the two models' features of the same query samples (same order),
    ``keys_*`` their features of the same training samples (same order).
    """
    if query_a.shape[0] != query_b.shape[0] or keys_a.shape[0] != keys_b.shape[0]:
        raise ValueError("both models must embed the same queries and the same keys")
    n = int(query_a.shape[0])
    if n == 0 or keys_a.shape[0] == 0:
        return KNNResult(reference, math.nan, k, n)
    a = knn_indices(query_a, keys_a, k)
    b = knn_indices(query_b, keys_b, k)
    k_eff = a.shape[1]
    shared = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).sum(dim=1).double()
    return KNNResult(reference, float((shared / k_eff).mean()), k_eff, n)
