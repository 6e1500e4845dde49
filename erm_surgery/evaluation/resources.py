"""Wall time and peak memory of the evaluation itself."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

__all__ = ["ResourceUsage", "ResourceMonitor"]


@dataclass
class ResourceUsage:
    """Cost of one evaluation.

    Attributes:
        wall_time_s: seconds from start to stop.
        peak_memory_bytes: on CUDA, ``torch.cuda.max_memory_allocated`` during the
            evaluation; on CPU, the process's peak resident set size (``getrusage``), which
            also counts whatever the process held before the evaluation began.
        peak_memory_increase_bytes: CPU only: how much the process peak grew during the
            evaluation (0 if an earlier peak was higher); None on CUDA.
        memory_source: ``"cuda_max_memory_allocated"`` or ``"process_max_rss"``.
        metric_seconds: wall time of each metric (feature extraction is charged to the
            first metric that needed it).
    """

    wall_time_s: float
    peak_memory_bytes: int | None
    peak_memory_increase_bytes: int | None
    memory_source: str
    metric_seconds: dict[str, float]


def _max_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


class ResourceMonitor:
    """Measures one evaluation: ``start()``, ``lap(name)`` per metric, ``stop()``."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.metric_seconds: dict[str, float] = {}
        self._start = self._lap = 0.0
        self._rss_before: int | None = None

    def start(self) -> ResourceMonitor:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._rss_before = _max_rss_bytes()
        self._start = self._lap = time.perf_counter()
        return self

    def _now(self) -> float:
        if self.cuda:  # queued kernels belong to the metric that launched them
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        """Charge the time since the previous lap to ``name``."""
        now = self._now()
        self.metric_seconds[name] = self.metric_seconds.get(name, 0.0) + now - self._lap
        self._lap = now

    def stop(self) -> ResourceUsage:
        wall = self._now() - self._start
        if self.cuda:
            peak: int | None = int(torch.cuda.max_memory_allocated(self.device))
            return ResourceUsage(wall, peak, None, "cuda_max_memory_allocated",
                                 dict(self.metric_seconds))
        peak = _max_rss_bytes()
        increase = (None if peak is None or self._rss_before is None
                    else max(0, peak - self._rss_before))
        return ResourceUsage(wall, peak, increase, "process_max_rss", dict(self.metric_seconds))
