"""Peak memory of one step of work (calibration, reconstruction), for benchmark tables.

On a GPU the CUDA allocator keeps an exact peak that can be reset per step. The process-wide peak RSS on a CPU
cannot be reset, so a background thread samples the resident set size instead; a spike shorter than the
sampling interval can be missed, which is why the table says "sampled".
"""

from __future__ import annotations

import os
import threading
from types import TracebackType

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """Resident set size of this process (None where /proc is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes`` (None when it cannot be measured).

    CUDA: peak allocated tensor memory during the block. CPU: peak resident set size of the whole process,
    sampled every ``interval`` seconds.
    """

    def __init__(self, device: str = "cpu", interval: float = 0.05) -> None:
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.interval = interval
        self.bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        rss = resident_bytes()
        if rss is not None:
            self.bytes = max(self.bytes or 0, rss)

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._sample()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = int(torch.cuda.max_memory_allocated())
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    @property
    def mib(self) -> float | None:
        return None if self.bytes is None else self.bytes / 2**20


__all__ = ["PeakMemory", "resident_bytes"]
