"""Min–max observer: the range is exactly what was seen.

Nothing is clipped, so no value ever saturates; the price is that one outlier stretches the grid for all the
others. Right for weights at 8 bits and for a first calibration; percentile or MSE do better at 4 bits.
"""

from __future__ import annotations

from torch import Tensor

from qdiffuse.formats.spec import FormatSpec
from qdiffuse.observers.base import Observer, RunningMinMax


class MinMaxObserver(Observer):
    """Running minimum and maximum over every :meth:`update` call (per tensor, channel or group)."""

    def __init__(self, spec: FormatSpec) -> None:
        super().__init__(spec)
        self._stats = RunningMinMax()

    def _reset(self) -> None:
        self._stats = RunningMinMax()

    def _observe(self, rows: Tensor) -> None:
        self._stats.add(rows)

    def _row_range(self) -> tuple[Tensor, Tensor]:
        assert self._stats.lo is not None and self._stats.hi is not None
        return self._stats.lo, self._stats.hi
