"""Few-shot probe: how few samples of a forget class do the frozen features need?

The full-data linear probe (:mod:`.probe`) barely separates a model that forgot from one
that did not: with hundreds of samples per class, a linear head finds a class even in
features that were never trained on it. Features that *were* trained on the class need
far fewer: a fresh multinomial logistic regression trained on every retain sample plus
only ``k`` samples of each forget class recognises the forget classes' test samples
much better on the original's features than on a retrained model's.

Each ``k`` is measured over several seeded draws of the ``k`` samples (the same draws for
every model: the labels decide them), reported as a mean with a t-based confidence
interval. Features are extracted once by the caller; one fit is a few hundred L-BFGS
steps on ``N x D`` tensors, so the metric costs well under a second per model on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .accuracy import class_set_accuracy
from .config import EvaluationError

__all__ = ["FewShotResult", "fewshot_probe", "fewshot_draws"]


@dataclass
class FewShotResult:
    """Forget-class test accuracy of the few-shot probe, per number of shots.

    Attributes:
        shots: the ``k`` values (samples per forget class), ascending.
        mean: per ``k``, the mean over draws of the forget-class test accuracy.
        ci_low: per ``k``, the lower end of the confidence interval of the mean.
        ci_high: per ``k``, the upper end.
        draws: per ``k``, the accuracy of each draw.
        retain_acc: per ``k``, the mean retain-class test accuracy (sanity check: the
            probe must still fit the retain classes).
        confidence: level of the interval (0.95, the only level computed).
    """

    shots: list[int]
    mean: list[float]
    ci_low: list[float]
    ci_high: list[float]
    draws: list[list[float]]
    retain_acc: list[float]
    confidence: float = 0.95

    def at(self, k: int) -> float:
        """The mean accuracy at ``k`` shots (NaN when ``k`` was not measured)."""
        return self.mean[self.shots.index(k)] if k in self.shots else math.nan

    def half_width(self, k: int) -> float:
        """Half the width of the confidence interval at ``k`` shots (NaN if unmeasured)."""
        if k not in self.shots:
            return math.nan
        i = self.shots.index(k)
        return (self.ci_high[i] - self.ci_low[i]) / 2


def fewshot_draws(labels: torch.Tensor, forget_classes: Sequence[int], k: int, draws: int,
                  seed: int) -> list[torch.Tensor]:
    """Indices of ``k`` training samples of each forget class, for each of ``draws`` draws.

    Seeded by ``(seed, k, draw)`` only, so every model gets the same samples.
    """
    labels = labels.detach().cpu().long()
    out = []
    for d in range(draws):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + k * 1_009 + d)
        picked = []
        for c in forget_classes:
            pool = torch.nonzero(labels == c).flatten()
            if pool.numel() < k:
                raise EvaluationError(
                    f"the few-shot probe needs {k} training samples of forget class {c}, the "
                    f"training data has {pool.numel()}; lower EvalConfig.fewshot_shots")
            picked.append(pool[torch.randperm(pool.numel(), generator=gen)[:k]])
        out.append(torch.cat(picked))
    return out


def _fit(xtr: torch.Tensor, ytr: torch.Tensor, num_classes: int, weight_decay: float,
         max_iter: int, start: tuple[torch.Tensor, torch.Tensor] | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of an L2-regularised multinomial logistic regression (L-BFGS). The
    problem is strictly convex, so the start (zero, or a warm start that saves most of the
    iterations) changes the answer only within the solver's tolerance."""
    if start is None:
        weight = torch.zeros(num_classes, xtr.shape[1], dtype=xtr.dtype)
        bias = torch.zeros(num_classes, dtype=xtr.dtype)
    else:
        weight, bias = (t.detach().clone() for t in start)
    # LBFGS only reads .grad, filled by the closure below; requires_grad is not needed
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6,
                            tolerance_change=1e-9, history_size=20)

    n = xtr.shape[0]
    rows = torch.arange(n)

    @torch.no_grad()
    def closure() -> torch.Tensor:
        # the gradient by hand: autograd's bookkeeping costs more than this small problem
        logp = F.log_softmax(F.linear(xtr, weight, bias), dim=1)
        # the penalty keeps the weights finite on separable retain classes
        loss = -logp[rows, ytr].mean() + 0.5 * weight_decay * weight.pow(2).sum()
        err = logp.exp_()
        err[rows, ytr] -= 1.0
        err /= n
        weight.grad = err.T @ xtr + weight_decay * weight
        bias.grad = err.sum(0)
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


#: Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (scipy.stats is not
#: imported for this: its import alone costs seconds on a busy CPU).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _t_quantile(dof: int) -> float:
    """The 95% two-sided t quantile for ``dof`` degrees of freedom (normal beyond 30)."""
    if dof <= len(_T95):
        return _T95[dof - 1]
    return 2.042 if dof <= 30 else 1.960  # 30 dof: 2.042; the normal quantile after that


def fewshot_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    forget_classes: Sequence[int],
    num_classes: int,
    *,
    shots: Sequence[int] = (1, 5, 10),
    draws: int = 5,
    weight_decay: float = 1e-3,
    max_iter: int = 50,
    seed: int = 0,
) -> FewShotResult:
    """Few-shot probe of the frozen features: a fresh head on all retain samples + ``k``
    samples per forget class, scored on the forget classes' test samples.

    Args:
        train_features, train_labels: pooled features ``(N, D)`` and labels of the
            training set (forget classes included: ``k`` of their samples are drawn).
        test_features, test_labels: the same for the test set.
        forget_classes: the classes the probe sees only ``k`` samples of.
        num_classes: C.
        shots: the ``k`` values.
        draws: seeded draws of the ``k`` samples per ``k`` (the interval needs 2 or more).
        weight_decay: L2 penalty of the head, per sample-mean loss.
        max_iter: L-BFGS iterations per fit.
        seed: seeds the draws.

    The interval is the t-based 95% interval of the mean over draws (NaN with one draw).

    Raises:
        EvaluationError: no shots, ``draws < 1``, or fewer than ``k`` training samples of a
            forget class.
    """
    shots = sorted({int(k) for k in shots})
    if not shots or shots[0] < 1:
        raise EvaluationError(f"few-shot probe: shots must be ints >= 1, got {list(shots)}")
    if draws < 1:
        raise EvaluationError(f"few-shot probe: draws must be >= 1, got {draws}")
    forget = sorted(int(c) for c in forget_classes)
    xtr_all = train_features.detach().float().cpu()
    ytr_all = train_labels.detach().long().cpu()
    is_forget = torch.isin(ytr_all, torch.tensor(forget, dtype=torch.long))
    retain_idx = torch.nonzero(~is_forget).flatten()
    if retain_idx.numel() == 0:
        raise EvaluationError("the few-shot probe needs retain-class training samples; the "
                              "training data has none")
    # standardised with the retain statistics, the same for every draw
    mean = xtr_all[retain_idx].mean(dim=0, keepdim=True)
    std = xtr_all[retain_idx].std(dim=0, keepdim=True).nan_to_num(1.0).clamp_min(1e-6)
    xtr_all = (xtr_all - mean) / std
    xte = (test_features.detach().float().cpu() - mean) / std
    yte = test_labels.detach().long().cpu()
    retain = [c for c in range(num_classes) if c not in set(forget)]
    # every draw starts from the retain-only fit: the few added samples move it a little
    warm = _fit(xtr_all[retain_idx], ytr_all[retain_idx], num_classes, weight_decay, max_iter)

    means, lows, highs, per_draw, retain_accs = [], [], [], [], []
    for k in shots:
        accs, raccs = [], []
        for picked in fewshot_draws(ytr_all, forget, k, draws, seed):
            idx = torch.cat([retain_idx, picked])
            weight, bias = _fit(xtr_all[idx], ytr_all[idx], num_classes, weight_decay,
                                max_iter, warm)
            pred = F.linear(xte, weight, bias).argmax(1)
            accs.append(class_set_accuracy(pred, yte, forget))
            raccs.append(class_set_accuracy(pred, yte, retain))
        acc = torch.tensor(accs, dtype=torch.float64)
        mean = float(acc.mean())
        half = (_t_quantile(len(accs) - 1) * float(acc.std()) / math.sqrt(len(accs))
                if len(accs) > 1 else math.nan)
        means.append(mean)
        lows.append(mean - half)
        highs.append(mean + half)
        per_draw.append(accs)
        retain_accs.append(float(torch.tensor(raccs, dtype=torch.float64).mean()))
    return FewShotResult(shots=shots, mean=means, ci_low=lows, ci_high=highs, draws=per_draw,
                         retain_acc=retain_accs)
