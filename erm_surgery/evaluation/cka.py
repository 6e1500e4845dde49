"""Linear centered kernel alignment (CKA, Kornblith et al. 2019).

For representations ``X`` (n x p) and ``Y`` (n x q) of the same n inputs, with columns
centred:

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)
              = <K, L>_F / (||K||_F * ||L||_F),   K = X X^T, L = Y Y^T (centred Grams).

It is 1 for identical representations, invariant to orthogonal transforms and isotropic
scaling (but not to arbitrary invertible linear maps), and near 0 for unrelated ones.
The Gram form lets a model's Grams be computed once and compared with any other model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["CKAResult", "centered_gram", "cka_from_grams", "linear_cka"]


@dataclass
class CKAResult:
    """Layer-wise CKA between the evaluated model and one reference model.

    Attributes:
        reference: ``"original"`` or ``"retrained"`` (or the pair's second name).
        layers: node names in the evaluated model; the last is ``"pooled"`` (the
            classifier input).
        reference_layers: the matching node names in the reference model.
        values: CKA per layer, in [0, 1] (NaN for a constant representation).
        n_samples: forget-class test samples the Grams were computed on.
    """

    reference: str
    layers: list[str]
    reference_layers: list[str]
    values: list[float]
    n_samples: int


def _flat(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().reshape(x.shape[0], -1).double()
    return x - x.mean(dim=0, keepdim=True)


def centered_gram(x: torch.Tensor) -> torch.Tensor:
    """``H X X^T H`` for ``x`` of shape ``(n, ...)``: the centred linear-kernel Gram (float64).

    Centring the features (columns) of ``X`` first is the same as ``H K H`` with the
    centring matrix ``H = I - 11^T / n``, and cheaper.
    """
    xc = _flat(x)
    return xc @ xc.T


def cka_from_grams(gram_x: torch.Tensor, gram_y: torch.Tensor) -> float:
    """CKA of two centred Grams (``K``, ``L``) of the same samples; NaN if one is all zeros."""
    if gram_x.shape != gram_y.shape:
        raise ValueError(f"Grams of different sample counts: {tuple(gram_x.shape)} vs "
                         f"{tuple(gram_y.shape)}; CKA compares representations of the same "
                         "inputs")
    k, l_ = gram_x.double(), gram_y.double()
    denom = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l_)
    if float(denom) == 0.0:
        return math.nan
    return float((k * l_).sum() / denom)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two representations of the same n inputs, ``(n, ...)`` each.

    Uses the feature-space form when the features are narrower than the sample count and
    the Gram form otherwise; both give the same number.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples and y has {y.shape[0]}; CKA compares "
                         "representations of the same inputs")
    xc, yc = _flat(x), _flat(y)
    n = xc.shape[0]
    if max(xc.shape[1], yc.shape[1]) < n:
        cross = torch.linalg.matrix_norm(yc.T @ xc) ** 2
        denom = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
        return math.nan if float(denom) == 0.0 else float(cross / denom)
    return cka_from_grams(xc @ xc.T, yc @ yc.T)
