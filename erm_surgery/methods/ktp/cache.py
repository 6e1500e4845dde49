"""KTP's teacher-map cache, bounded by a memory budget.

The masked teacher map of a sample is the same at every epoch when the data has no
random transform, so KTP computes it once. A map is ``K x h x w`` floats per sample (on
``resnet50`` at 224 px, 2048 x 7 x 7 x 4 bytes = 400 KB: 20 GB for 50,000 images), so
the cache holds only what fits a budget: first on the model's device, then (on a GPU)
in pinned host memory, and the samples beyond that are streamed: their maps are
recomputed under ``no_grad`` in the batch that needs them. Where a sample's map comes
from does not change it beyond float noise (the teacher runs in eval mode, so a sample's
map does not depend on its batch).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .layout import to_channels_last

__all__ = ["CACHE_DTYPES", "TeacherCache", "default_budget", "rank_shard", "split_budget"]

#: the ``KTPConfig.cache_dtype`` names and their dtypes (``"auto"``: the maps' own dtype)
CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
    "float16": torch.float16}

#: share of the free memory a default budget takes: the student's activations, its
#: optimiser state and the caller's own tensors need the rest
FREE_SHARE = 0.25


def _host_available() -> int:
    """Bytes of host memory available now (psutil), else half the physical memory, else
    4 GiB."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def default_budget(device: torch.device) -> tuple[int, int]:
    """``(device bytes, host bytes)`` a cache may take when ``cache_bytes`` is None: a
    quarter of the free memory of each (on a CPU device, the host is the device)."""
    host = int(_host_available() * FREE_SHARE)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * FREE_SHARE), host
    return host, 0


def split_budget(cache_bytes: int | None, device: torch.device) -> tuple[int, int]:
    """``(device bytes, host bytes)`` for ``KTPConfig.cache_bytes``: ``None`` = the
    default budget; a number is the total, on the device as far as a quarter of its free
    memory goes and the rest on the host (on a CPU device, all of it)."""
    if cache_bytes is None:
        return default_budget(device)
    if device.type != "cuda":
        return cache_bytes, 0
    on_device = min(cache_bytes, default_budget(device)[0])
    return on_device, cache_bytes - on_device


def rank_shard(n: int, num_processes: int, rank: int, seed: int) -> list[int]:
    """The positions (of ``n``) that process ``rank`` distils on, every epoch.

    A seeded permutation cut into ``num_processes`` equal parts (the last ``n %
    num_processes`` samples of the permutation are left out, so every rank runs the same
    number of steps and none waits in DDP's all-reduce). A rank keeps its part for the
    whole run, so it can cache the teacher's maps of exactly that part.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    per = n // num_processes
    return sorted(perm[rank * per:(rank + 1) * per].tolist())


class TeacherCache:
    """The masked teacher maps of the samples that fit the budget; the others streamed.

    Args:
        teacher: the teacher (eval mode, on ``device``).
        keep_map: the keep mask, shaped to broadcast over a map.
        distill_set: the samples, ``(x, ...)`` per item.
        positions: the positions of ``distill_set`` this process distils on, in the order
            their maps are cached (the first that fit are).
        device: where the student trains.
        budget: ``(device bytes, host bytes)``; host bytes are used on a GPU only.
        dtype: storage dtype of the cached maps (targets are cast back to the map's
            dtype when read); ``None`` = the maps' own dtype (lossless: bfloat16 when the
            teacher pass runs under bfloat16 autocast).
        batch_size: batch of the teacher pass.
        num_workers: its DataLoader workers.
        progress: a tqdm bar updated per teacher-pass batch, or None.
        channels_last: feed the teacher NHWC batches (its weights are NHWC:
            :func:`.layout.teacher_in_channels_last`).
        autocast: run the teacher under autocast to this dtype (``None`` = its own
            precision); the maps keep the dtype the teacher produced.

    Attributes:
        cached: samples cached; ``on_device`` of them on the device, the rest on the host.
        nbytes: bytes the cache holds.
        streamed_batches: batches whose maps were (partly) recomputed by :meth:`targets`.
    """

    def __init__(self, teacher: nn.Module, keep_map: torch.Tensor, distill_set: Dataset,
                 positions: Sequence[int], device: torch.device, budget: tuple[int, int],
                 dtype: torch.dtype | None = torch.float32, batch_size: int = 64,
                 num_workers: int = 0, progress=None, channels_last: bool = False,
                 autocast: torch.dtype | None = None) -> None:
        self.teacher, self.keep_map, self.device = teacher, keep_map, device
        self.channels_last, self.autocast = channels_last, autocast
        self.streamed_batches = 0
        n_total = len(distill_set)  # type: ignore[arg-type]
        dev_budget, host_budget = budget
        if max(dev_budget, 0) + max(host_budget, 0) <= 0 or not positions:
            dev_budget = host_budget = 0  # no cache: nothing to measure
            self.shape, self.out_dtype = torch.Size(), torch.float32
        else:
            with torch.no_grad():  # one sample: the map's shape and dtype
                x0 = distill_set[positions[0]][0].unsqueeze(0).to(device)
                probe = self._maps(x0)
            self.shape, self.out_dtype = probe.shape[1:], probe.dtype
        dtype = dtype or self.out_dtype
        per = max(1, math.prod(self.shape) * torch.empty((), dtype=dtype).element_size())
        self.on_device = min(len(positions), max(0, dev_budget) // per)
        on_host = 0
        if device.type == "cuda":  # device short: the next maps in pinned host memory
            on_host = min(len(positions) - self.on_device, max(0, host_budget) // per)
        self.cached = self.on_device + on_host
        self._all_on_device = self.on_device == len(positions)  # no per-batch lookup
        self.nbytes = self.cached * per
        # slot[p] = where sample p's map is (-1: streamed); indexed on the loader's device
        slot = torch.full((n_total,), -1, dtype=torch.long)
        slot[torch.as_tensor(list(positions[:self.cached]), dtype=torch.long)] = torch.arange(
            self.cached)
        self.slot = slot.to(device)
        self.dev = torch.empty((self.on_device, *self.shape), dtype=dtype, device=device)
        try:  # pinned: copies to the GPU run without a staging copy
            self.host = torch.empty((on_host, *self.shape), dtype=dtype,
                                    pin_memory=on_host > 0 and torch.cuda.is_available())
        except RuntimeError:  # pinning refused (locked-memory limit): pageable memory
            self.host = torch.empty((on_host, *self.shape), dtype=dtype)
        if self.cached:
            self._fill(distill_set, positions[:self.cached], batch_size, num_workers,
                       progress)

    def _fill(self, distill_set: Dataset, positions: Sequence[int], batch_size: int,
              num_workers: int, progress) -> None:
        """The teacher pass: preallocated storage, written in place (no concatenation,
        whose peak would be twice the cache)."""
        start = 0
        with torch.no_grad():
            for x, *_ in DataLoader(Subset(distill_set, list(positions)),
                                    batch_size=batch_size, num_workers=num_workers):
                maps = self._maps(x.to(self.device))
                end = start + maps.shape[0]
                d_end = min(end, self.on_device)
                if d_end > start:
                    self.dev[start:d_end] = maps[:d_end - start]
                if end > self.on_device:
                    h0 = max(start, self.on_device)
                    self.host[h0 - self.on_device:end - self.on_device] = (
                        maps[h0 - start:].to(self.host.dtype).cpu())
                start = end
                if progress is not None:
                    progress.update(1)

    def _maps(self, x: torch.Tensor) -> torch.Tensor:
        """The masked teacher maps of a batch (call under ``no_grad``), in the storage
        layout of the default one, so cached and streamed targets look alike."""
        if self.channels_last:
            x = to_channels_last(x)
        if self.autocast is None:
            maps = self.teacher.forward_features(x)
        else:
            with torch.autocast(self.device.type, dtype=self.autocast):
                maps = self.teacher.forward_features(x)
        # in the dtype the teacher produced (bfloat16 under its autocast): a cache in
        # that dtype holds the targets exactly, in half the bytes of float32
        return (maps * self.keep_map.to(maps.dtype)).contiguous()

    def targets(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The masked teacher maps of the batch ``x`` (its dataset positions
        ``positions``): cached ones read, the others computed now under ``no_grad``."""
        if self.cached == 0:  # nothing cached: the whole batch through the teacher
            self.streamed_batches += 1
            with torch.no_grad():
                return self._maps(x)
        slot = self.slot[positions.to(self.slot.device)]
        if self._all_on_device:  # the common case, without a host sync
            return self.dev[slot].to(self.out_dtype)
        out = torch.empty((x.shape[0], *self.shape), dtype=self.out_dtype, device=x.device)
        on_dev = (slot >= 0) & (slot < self.on_device)
        on_host = slot >= self.on_device
        streamed = slot < 0
        if bool(on_dev.any()):
            out[on_dev] = self.dev[slot[on_dev]].to(self.out_dtype)
        if bool(on_host.any()):
            rows = self.host[(slot[on_host] - self.on_device).cpu()]
            out[on_host] = rows.to(x.device, non_blocking=True).to(self.out_dtype)
        if bool(streamed.any()):
            self.streamed_batches += 1
            with torch.no_grad():
                out[streamed] = self._maps(x[streamed]).to(self.out_dtype)
        return out
