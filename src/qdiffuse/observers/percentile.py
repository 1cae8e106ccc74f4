"""Percentile observer: clip the rarest values so the grid serves the bulk of the distribution.

Diffusion activations are heavy-tailed (a few huge values in attention and the up-path concatenations); with
min–max a 4-bit grid spends almost all its codes on those few values. Clipping at e.g. the 99.99th percentile
saturates a handful of values and halves the step for everyone else.
"""

from __future__ import annotations

from torch import Tensor

from qdiffuse.errors import ConfigError
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.observers.base import Observer, Reservoir


def row_quantiles(values: Tensor, qs: tuple[float, ...]) -> list[Tensor]:
    """Per-row quantiles ``qs`` (each in 0..1) with linear interpolation, as ``torch.quantile`` computes them
    but with one sort for all ``qs`` and no limit on the input size."""
    sorted_vals = values.sort(dim=1).values
    n = values.shape[1]
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = min(int(pos), n - 1)
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        out.append(sorted_vals[:, lo] * (1.0 - frac) + sorted_vals[:, hi] * frac)
    return out


class PercentileObserver(Observer):
    """Range ``[P_{100-p}, P_p]`` of the values seen, per tensor, channel or group.

    Per-tensor ranges use a uniform random subsample of at most ``max_samples`` values across all calls
    (deterministic given ``seed``), so calibrating on many batches costs bounded memory. Per-channel and
    per-group ranges keep up to ``max_per_channel`` values per row, so a weight (seen once) is used whole.
    """

    def __init__(
        self,
        spec: FormatSpec,
        percentile: float = 99.99,
        max_samples: int = 2**20,
        max_per_channel: int = 2**16,
        seed: int = 0,
    ) -> None:
        super().__init__(spec)
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile {percentile} is out of range; use a value in (50, 100], e.g. 99.9")
        self.percentile = float(percentile)
        cap = max_samples if self.granularity == "tensor" else max_per_channel
        self._sample = Reservoir(cap, seed)

    def _reset(self) -> None:
        self._sample = Reservoir(self._sample.cap, self._sample.seed)

    def _observe(self, rows: Tensor) -> None:
        self._sample.add(rows)

    def _row_range(self) -> tuple[Tensor, Tensor]:
        values = self._sample.values
        assert values is not None
        q = self.percentile / 100.0
        lo, hi = row_quantiles(values, (1.0 - q, q))
        return lo, hi
