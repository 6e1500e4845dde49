"""Fisher forgetting: noise the weights where the retain data does not pin them down.

Golatkar, Achille and Soatto, "Eternal Sunshine of the Spotless Net: Selective Forgetting
in Deep Networks", CVPR 2020, section 4 (the "Fisher" scrubbing). The diagonal of the
Fisher information of the *retain* data says how much each weight matters to it; each
weight gets Gaussian noise with variance ``alpha / F_ii`` (clamped), so weights the
retain data needs stay put and the rest are scrambled. This follows the authors' public
code (``get_mean_var`` / ``hessian``): the exact Fisher ``sum_y p(y|x) (d log p(y|x))^2``
from per-sample gradients, variance clamped at 1e3 (1e2 for the classifier), averaged
over each weight tensor's second axis, times 10 for the classifier and for 1-D tensors
(BatchNorm, biases); the forget classes' classifier rows are set to 0 with tiny noise. The
authors' code applies no Newton step for this method (the ERM-KTP paper's summary
mentions one); neither does this one.

Cost: the exact Fisher needs one per-sample gradient for every (sample, class) pair:
``C * max_samples`` backward passes (vectorised with ``torch.func.vmap``), plus memory for
``batch_size`` per-sample gradients (``batch_size * 4 * n_params`` bytes). That is why the
ERM-KTP paper measured 5162 s against 668 s to retrain (Table 6) and gave up on
Tiny-ImageNet; ``labels="sampled"`` or ``"true"`` divide the cost by C.

Where it breaks: in deep networks with BatchNorm most conv weights have a tiny Fisher
diagonal (the next BatchNorm rescales them away), so they hit the variance clamp and get
the largest noise; a diagonal approximation also ignores that weights act together. The
ERM-KTP paper reports 54% / 1% accuracy on CIFAR-10 / CIFAR-100 ResNets (Table 5).
``alpha`` trades forgetting for retain accuracy; the forget accuracy of 0% comes mostly
from the zeroed classifier rows (output level).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ...errors import warn_user
from ...surgery import unwrap
from ...unlearning.registry import register_method
from ...unlearning.request import classifier_of, device_name, mark_forgotten, parse_request
from .common import BaselineInfo

__all__ = ["FisherConfig", "FisherInfo", "fisher", "diagonal_fisher"]

_LABELS = ("expected", "sampled", "true")


@dataclass
class FisherConfig:
    """Settings of Fisher forgetting (defaults: the authors' code).

    Attributes:
        alpha: noise scale: each weight's variance is ``alpha / F_ii`` before the clamps.
        labels: how the Fisher is estimated: ``"expected"`` (exact, every class weighted by
            the model's probability, the authors' code; C backward passes per sample),
            ``"sampled"`` (one label drawn from the model's prediction: unbiased, C times
            cheaper), ``"true"`` (the empirical Fisher with the data's labels).
        max_samples: retain samples the Fisher is estimated on (a seeded subset; None =
            all). The cost is linear in it.
        batch_size: samples per vectorised per-sample-gradient pass.
        var_clamp: upper bound of ``1 / F_ii`` (weights the retain data ignores).
        head_var_clamp: the same bound for the classifier.
        head_scale: variance multiplier of the classifier.
        norm_scale: variance multiplier of 1-D tensors (BatchNorm, biases).
        zero_forget_rows: set the forget classes' classifier rows (weight and bias) to 0
            with variance 1e-4, as the authors' code does for whole-class forgetting.
        seed: the subset and the noise.
        show_progress: tqdm bar.
    """

    alpha: float = 1e-6
    labels: str = "expected"
    max_samples: int | None = 1000
    batch_size: int = 32
    var_clamp: float = 1e3
    head_var_clamp: float = 1e2
    head_scale: float = 10.0
    norm_scale: float = 10.0
    zero_forget_rows: bool = True
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.labels not in _LABELS:
            raise ValueError(f"labels must be one of {_LABELS}, got {self.labels!r}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {self.max_samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.var_clamp > 0 and self.head_var_clamp > 0):
            raise ValueError("var_clamp and head_var_clamp must be > 0")


@dataclass(kw_only=True)
class FisherInfo(BaselineInfo):
    """What :func:`fisher` did.

    Attributes:
        labels: the Fisher estimate used.
        gradient_passes: per-sample gradients computed (``samples * C`` for "expected").
        clamped_fraction: fraction of weights whose ``1 / F_ii`` hit ``var_clamp``: the
            retain data does not constrain them, and they got the largest noise.
        noise_std_mean: mean standard deviation of the noise added per weight.
        vectorised: per-sample gradients came from ``torch.func.vmap`` (False: a loop).
    """

    labels: str = "expected"
    gradient_passes: int = 0
    clamped_fraction: float = math.nan
    noise_std_mean: float = math.nan
    vectorised: bool = True


def _per_sample_grads(net: nn.Module, params: dict[str, torch.Tensor],
                      buffers: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                      vectorised: bool) -> dict[str, torch.Tensor]:
    """Gradients of ``log p(y_i | x_i)`` for every sample ``i``: ``{name: (B, *shape)}``."""
    if vectorised:
        from torch.func import functional_call, grad, vmap

        def log_p(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor
                  ) -> torch.Tensor:
            out = functional_call(net, (p, buffers), (xi.unsqueeze(0),))
            # gather, not [0, yi]: indexing by a batched tensor is data-dependent for vmap
            return F.log_softmax(out.float(), dim=-1)[0].gather(0, yi.reshape(1))[0]

        return vmap(grad(log_p), in_dims=(None, 0, 0))(params, x, y)
    live = dict(net.named_parameters())  # the real parameters: they carry requires_grad
    out: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for xi, yi in zip(x, y, strict=True):
        lp = F.log_softmax(net(xi.unsqueeze(0)).float(), dim=-1)[0, yi]
        grads = torch.autograd.grad(lp, [live[n] for n in params], allow_unused=True)
        for (n, p), g in zip(params.items(), grads, strict=True):
            out[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}


def diagonal_fisher(net: nn.Module, data: Dataset, *, labels: str = "expected",
                    batch_size: int = 32, seed: int = 0, show_progress: bool = False,
                    ) -> tuple[dict[str, torch.Tensor], int, bool]:
    """Diagonal Fisher information of ``net`` (in eval mode) on ``data``.

    Returns ``({param name: F}, gradient passes, vectorised)``; ``F`` is the mean over
    samples of the squared per-sample gradient of ``log p(y | x)``, with ``y`` per
    ``labels`` (see :class:`FisherConfig`).
    """
    from tqdm.auto import tqdm

    if labels not in _LABELS:
        raise ValueError(f"labels must be one of {_LABELS}, got {labels!r}")
    was_training = net.training
    net.eval()  # BatchNorm on running statistics: per-sample gradients are independent
    device = next(net.parameters()).device
    params = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in net.named_buffers()}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    vectorised = True
    passes = n_seen = 0
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    for x, y in tqdm(loader, desc="Fisher", disable=not show_progress, leave=False):
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            prob = F.softmax(net(x).float(), dim=-1)
        if labels == "expected":
            targets = [(torch.full_like(y, c), prob[:, c]) for c in range(prob.shape[1])]
        elif labels == "sampled":
            draw = torch.multinomial(prob.cpu(), 1, generator=gen).flatten().to(device)
            targets = [(draw, torch.ones_like(prob[:, 0]))]
        else:
            targets = [(y, torch.ones_like(prob[:, 0]))]
        for target, weight in targets:
            try:
                grads = _per_sample_grads(net, params, buffers, x, target, vectorised)
            except (RuntimeError, NotImplementedError) as err:
                if not vectorised:
                    raise
                warn_user(f"torch.func.vmap failed on this model ({err}); computing "
                              "per-sample gradients one by one (slower)")
                vectorised = False
                grads = _per_sample_grads(net, params, buffers, x, target, vectorised)
            for n, g in grads.items():
                w = weight.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)
                fisher[n] += (w * g.pow(2)).sum(0)
            passes += x.shape[0]
        n_seen += x.shape[0]
    for f in fisher.values():
        f /= max(n_seen, 1)
    net.train(was_training)
    return fisher, passes, vectorised


@register_method("fisher", config=FisherConfig, info=FisherInfo,
                 summary="Fisher-scaled noise on the weights (Golatkar et al. 2020)")
def fisher(
    model: nn.Module,
    classes: Iterable[int],
    data: Dataset | DataLoader,
    *,
    config: FisherConfig,
    accelerator: Any = None,
) -> tuple[nn.Module, FisherInfo]:
    """Fisher forgetting (Golatkar et al., CVPR 2020): Gaussian noise on every weight with
    variance ``alpha / F_ii`` from the diagonal Fisher of the retain data.

    Runs on ``accelerator.device`` when given (one process: the Fisher is a sum over
    samples, not split), else where the model is. ``model`` is not modified. See the
    module docstring for the cost and where it breaks.
    """
    cfg = config
    req = parse_request(model, classes, data)
    out = copy.deepcopy(model)
    if accelerator is not None:
        out.to(accelerator.device)
    net = unwrap(out)
    retain = req.retain_idx
    if cfg.max_samples is not None and len(retain) > cfg.max_samples:
        gen = torch.Generator().manual_seed(cfg.seed)
        pick = torch.randperm(len(retain), generator=gen)[: cfg.max_samples]
        retain = [retain[i] for i in sorted(pick.tolist())]
    fim, passes, vectorised = diagonal_fisher(
        net, Subset(req.dataset, retain), labels=cfg.labels, batch_size=cfg.batch_size,
        seed=cfg.seed, show_progress=cfg.show_progress)

    head_name, head = classifier_of(out)
    head_params = {f"{head_name}.{n}" for n, _ in head.named_parameters()}
    forget = torch.as_tensor(req.forget, dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    clamped = total = 0
    std_sum = 0.0
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n not in fim:
                continue
            inv = 1.0 / (fim[n] + 1e-8)
            clamped += int((inv >= cfg.var_clamp).sum())
            total += inv.numel()
            var = inv.clamp(max=cfg.var_clamp)
            is_head = n in head_params
            if is_head:
                var = var.clamp(max=cfg.head_var_clamp)
            var = cfg.alpha * var
            if p.dim() > 1:  # one variance per output unit and kernel position
                var = var.mean(dim=1, keepdim=True).expand_as(p).clone()
            mu = p.detach().clone()
            if is_head and cfg.zero_forget_rows:
                mu[forget.to(p.device)] = 0
                var[forget.to(p.device)] = 1e-4
            if is_head:
                var = var * cfg.head_scale
            elif p.dim() == 1:
                var = var * cfg.norm_scale
            noise = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
            p.copy_(mu + var.sqrt() * noise)
            std_sum += float(var.sqrt().sum())
    out.eval()
    mark_forgotten(out, req.forget)
    info = FisherInfo(
        method="fisher", forget_classes=req.forget,
        device=device_name(next(net.parameters()).device), samples=len(retain), epochs=0,
        labels=cfg.labels, gradient_passes=passes,
        clamped_fraction=clamped / max(total, 1), noise_std_mean=std_sum / max(total, 1),
        vectorised=vectorised)
    return out, info
