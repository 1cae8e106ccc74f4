"""MSE observer: Q-Diffusion's range search.

Clipping trades rounding error (a wider range, a coarser step) against clipping error (a narrower range,
saturated outliers). Instead of guessing a percentile, try ``num_candidates`` shrink factors ``alpha`` of
the min–max range, quantize the observed values with each, and keep the one with the smallest mean
``|x - q(x)|^p``.
``p = 2.4`` (Q-Diffusion, after BRECQ) weighs large errors a little more than plain MSE.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdiffuse.errors import ConfigError
from qdiffuse.formats import FP8_DTYPES, FP8_MAX, fp8_scale, int_bounds, int_qparams
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.observers.base import Observer, Reservoir, RunningMinMax

_CHUNK = 2**20  # values scored per slab of rows


class MSEObserver(Observer):
    """Search ``alpha`` in ``{1/n, 2/n, ..., 1}`` for the range ``[alpha * xmin, alpha * xmax]`` minimising
    ``mean |x - fake_quant(x)|^p``, independently per tensor, channel or group (vectorised over rows).

    Candidates are scored on the values seen: per tensor, a uniform subsample of at most ``max_samples``
    values across all calls; per channel/group, a uniform subsample of at most ``max_per_channel`` values
    per row (whole rows up to that length: the search makes ``num_candidates`` passes, which must stay cheap
    for the largest weights). ``xmin``/``xmax`` are always the true extremes of everything seen. For ``int``
    the search covers the asymmetric, symmetric and unsigned grids; for FP8 the candidate range is
    ``alpha * amax``. nvfp4/mxfp4 take their block scales from the data, so for them this observer returns
    the min–max range. Ties keep the larger range (less clipping).
    """

    def __init__(
        self,
        spec: FormatSpec,
        p: float = 2.4,
        num_candidates: int = 80,
        max_samples: int = 2**16,
        max_per_channel: int = 2**12,
        seed: int = 0,
    ) -> None:
        super().__init__(spec)
        if p <= 0:
            raise ConfigError(f"error norm p={p} is not positive; use e.g. p=2.4 (Q-Diffusion) or p=2")
        if num_candidates < 1:
            raise ConfigError(f"num_candidates={num_candidates} is not positive; use e.g. 80")
        self.p = float(p)
        self.num_candidates = int(num_candidates)
        cap = max_samples if self.granularity == "tensor" else max_per_channel
        self._sample = Reservoir(cap, seed)
        self._stats = RunningMinMax()

    def _reset(self) -> None:
        self._sample = Reservoir(self._sample.cap, self._sample.seed)
        self._stats = RunningMinMax()

    def _observe(self, rows: Tensor) -> None:
        self._stats.add(rows)
        if self.spec.kind in ("int", "fp8_e4m3", "fp8_e5m2"):
            self._sample.add(rows)

    def _errors(self, values: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Per-row mean ``|x - fake_quant(x)|^p`` of ``values`` [R, n] under ranges ``lo``/``hi`` [R, 1].

        Same arithmetic as :func:`fake_quantize` (so the chosen range scores what inference will do), written
        in place because this runs ``num_candidates`` times over every weight.
        """
        spec = self.spec
        if spec.kind == "int":
            qmin, qmax = int_bounds(spec.bits, spec.symmetric, spec.unsigned)
            scale, zero_point = int_qparams(lo, hi, spec.bits, spec.symmetric, spec.unsigned)
            xq = (values / scale).round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
        else:
            fmax = FP8_MAX[spec.kind]
            scale = fp8_scale(torch.maximum(lo.abs(), hi.abs()), spec.kind)
            xq = (values / scale).clamp_(-fmax, fmax).to(FP8_DTYPES[spec.kind]).to(values.dtype).mul_(scale)
        return xq.sub_(values).abs_().pow_(self.p).mean(dim=1)

    def _search(self, values: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Best shrink factor per row (rows of ``values`` against their ``lo``/``hi``)."""
        best_err = torch.full_like(lo, float("inf"))
        best_alpha = torch.ones_like(lo)
        n = self.num_candidates
        for i in range(n, 0, -1):  # largest range first, so ties keep the larger one
            alpha = i / n
            err = self._errors(values, (alpha * lo).unsqueeze(1), (alpha * hi).unsqueeze(1))
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_alpha = torch.where(better, torch.full_like(best_alpha, alpha), best_alpha)
        return best_alpha

    @torch.no_grad()
    def _row_range(self) -> tuple[Tensor, Tensor]:
        lo, hi = self._stats.lo, self._stats.hi
        assert lo is not None and hi is not None
        values = self._sample.values
        if values is None:  # block formats: nothing to search
            return lo, hi
        # Rows are independent: search a slab of rows at a time so the working set stays in cache.
        step = max(1, _CHUNK // values.shape[1])
        alpha = torch.cat(
            [
                self._search(values[i : i + step], lo[i : i + step], hi[i : i + step])
                for i in range(0, len(lo), step)
            ]
        )
        return alpha * lo, alpha * hi
