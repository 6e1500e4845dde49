"""Peak memory of a block of code: the process's resident set and, on a GPU, CUDA's
allocator peak (what :class:`KTPInfo` reports as ``peak_rss_mib`` / ``cuda_peak_mib``)."""

from __future__ import annotations

import sys
import threading

import torch

try:
    import resource
except ImportError:  # Windows: no getrusage, the sampler alone measures the peak
    resource = None

__all__ = ["PeakMemory"]

MIB = 1 << 20
#: seconds between two resident-set samples: fine enough for steps that last
#: milliseconds, rare enough not to cost the measured code measurable CPU time
SAMPLE_EVERY = 0.01


def _max_rss() -> int:
    """The process's lifetime peak resident set, bytes (``ru_maxrss``: KiB on Linux,
    bytes on macOS)."""
    if resource is None:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakMemory:
    """Peak resident set of this process while the block runs, and the CUDA peak.

    The resident set comes from two sources, since neither alone is exact: the kernel's
    lifetime peak (``getrusage``'s ``ru_maxrss``) is exact when the block sets a new
    lifetime peak, but says nothing when an earlier part of the process peaked higher; a
    thread sampling the current resident set (psutil, every :data:`SAMPLE_EVERY` s) sees
    the block's own peak then, up to what falls between two samples. The larger of the
    two is reported. On CUDA, ``torch.cuda.reset_peak_memory_stats(device)`` at the start
    and ``max_memory_allocated(device)`` at the end (tensors only; the caching
    allocator's reserve and the CUDA context are not counted). This resets the device's
    peak statistics for the caller too.

    Attributes (after the block):
        rss_before_mib: resident set when the block started.
        peak_rss_mib: the block's peak resident set (None where neither source exists).
        cuda_peak_mib: the block's CUDA peak, None on other devices.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.rss_before_mib: float | None = None
        self.peak_rss_mib: float | None = None
        self.cuda_peak_mib: float | None = None

    def __enter__(self) -> PeakMemory:
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:  # no sampler: ru_maxrss only
            self._proc = None
        self._lifetime = _max_rss()
        self._sampled = self._rss()
        self.rss_before_mib = None if self._sampled is None else self._sampled / MIB
        self._stop = threading.Event()
        self._thread = None
        if self._proc is not None:
            self._thread = threading.Thread(target=self._watch, daemon=True,
                                            name="ktp-peak-rss")
            self._thread.start()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def _rss(self) -> int | None:
        return None if self._proc is None else int(self._proc.memory_info().rss)

    def _watch(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self._sampled = max(self._sampled, self._rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        sampled = self._rss()
        if sampled is not None:
            self._sampled = max(self._sampled, sampled)
        lifetime = _max_rss()
        # a new lifetime peak during the block is the block's exact peak
        candidates = [v for v in (self._sampled,
                                  lifetime if lifetime > self._lifetime else None)
                      if v is not None]
        self.peak_rss_mib = max(candidates) / MIB if candidates else None
        if self.device.type == "cuda":
            self.cuda_peak_mib = torch.cuda.max_memory_allocated(self.device) / MIB
