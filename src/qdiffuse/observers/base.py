"""The observer interface: see tensors, estimate a range, turn it into quantization parameters.

Shape conventions by the spec's granularity (``x`` is any tensor the observer was updated with):

* ``tensor``: ranges and parameters are 0-dim tensors.
* ``channel``: axis 0 is the channel; ranges are ``[C, 1, 1, ...]``, broadcastable against ``x``.
* ``group``: ranges are ``[C, n_groups, 1]``, broadcastable against ``group_view(x, group_size)``.

nvfp4 and mxfp4 take their block scales from the data at quantization time, so their observers estimate one
per-tensor range (the NVFP4 global scale) whatever the granularity field says.

Internally every observer works on "rows": one row for a tensor range, one per channel, or one per group; a
subclass only has to reduce rows to a low and a high value each.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdiffuse.errors import ConfigError, DataError
from qdiffuse.formats import check_finite, fp8_scale, group_view, int_qparams, nvfp4_global_scale
from qdiffuse.formats.spec import FormatSpec


def _float(x: Tensor) -> Tensor:
    """Statistics in float32 at least (half-precision min/max are fine, half-precision means are not)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Observer:
    """Base class: accumulates statistics over :meth:`update` calls (several calibration batches).

    Subclasses implement :meth:`_observe` (add one call's rows) and :meth:`_row_range` (the low/high per row).
    """

    def __init__(self, spec: FormatSpec) -> None:
        if spec.granularity == "group" and spec.kind not in ("nvfp4", "mxfp4") and spec.group_size < 1:
            raise ConfigError("granularity 'group' needs a positive group_size, e.g. group_size=64")
        self.spec = spec
        self._shape: tuple[int, ...] | None = None
        self._calls = 0
        self._cached: tuple[Tensor, Tensor] | None = None

    @property
    def granularity(self) -> str:
        """The granularity ranges are estimated at (``tensor`` for the block formats)."""
        return "tensor" if self.spec.kind in ("nvfp4", "mxfp4") else self.spec.granularity

    @property
    def calls(self) -> int:
        """How many tensors the observer has seen."""
        return self._calls

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._shape = None
        self._calls = 0
        self._cached = None
        self._reset()

    def update(self, x: Tensor) -> None:
        """Add one tensor (a weight, or one calibration batch of activations) to the statistics."""
        if x.numel() == 0:
            raise DataError("an observer got an empty tensor; calibrate with at least one non-empty batch")
        check_finite(x, "calibration data")
        rows = self._rows(_float(x.detach()))
        self._observe(rows)
        self._calls += 1
        self._cached = None

    def compute_range(self) -> tuple[Tensor, Tensor]:
        """``(xmin, xmax)`` shaped by granularity (see the module docstring)."""
        if self._calls == 0:
            raise DataError("observer has seen no data; call update() with calibration tensors first")
        if self._cached is None:
            lo, hi = self._row_range()
            self._cached = (self._shaped(lo), self._shaped(hi))
        return self._cached

    def compute_qparams(self) -> tuple[Tensor, Tensor | None]:
        """Quantization parameters for ``spec`` from :meth:`compute_range`.

        int: ``(scale, zero_point)``; fp8: ``(scale, None)``; nvfp4: ``(global_scale, None)``; mxfp4 needs no
        parameter and returns ``(torch.ones(()), None)``.
        """
        xmin, xmax = self.compute_range()
        spec = self.spec
        if spec.kind == "int":
            return int_qparams(xmin, xmax, spec.bits, spec.symmetric, spec.unsigned)
        if spec.kind == "mxfp4":
            return torch.ones((), device=xmin.device), None
        amax = torch.maximum(xmin.abs(), xmax.abs())
        if spec.kind == "nvfp4":
            return nvfp4_global_scale(amax), None
        return fp8_scale(amax, spec.kind), None

    # ------------------------------------------------------------------------------------------- internals

    def _rows(self, x: Tensor) -> Tensor:
        """``x`` as ``[rows, values]``: the values each range is computed from."""
        gran = self.granularity
        if gran == "tensor":
            shape: tuple[int, ...] = ()
            rows = x.reshape(1, -1)
        else:
            if x.dim() == 0:
                raise DataError(f"per-{gran} ranges need a tensor with a channel axis (axis 0); got a scalar")
            if gran == "channel":
                shape = (x.shape[0],) + (1,) * (x.dim() - 1)
                rows = x.reshape(x.shape[0], -1)
            else:
                grouped = group_view(x, self.spec.group_size)
                shape = (grouped.shape[0], grouped.shape[1], 1)
                rows = grouped.reshape(-1, self.spec.group_size)
        if self._shape is not None and self._shape[:2] != shape[:2]:
            raise DataError(
                f"observer saw ranges of shape {self._shape} and now {shape}; use one observer per tensor"
            )
        self._shape = shape
        return rows

    def _shaped(self, row_values: Tensor) -> Tensor:
        assert self._shape is not None
        return row_values.reshape(self._shape)

    def _reset(self) -> None:
        raise NotImplementedError

    def _observe(self, rows: Tensor) -> None:
        raise NotImplementedError

    def _row_range(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class RunningMinMax:
    """Per-row running minimum and maximum, shared by the observers that need the true extremes."""

    def __init__(self) -> None:
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None

    def add(self, rows: Tensor) -> None:
        """Fold one call's rows ``[R, n]`` into the running extremes."""
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)


class Reservoir:
    """A bounded, uniform random subsample of each row's values across calls (deterministic given the seed).

    Every value gets a random key and each row keeps the ``cap`` values with the largest keys seen so far:
    a uniform sample without replacement of everything observed, whatever the batch sizes, in bounded memory.
    """

    def __init__(self, cap: int, seed: int = 0) -> None:
        if cap < 1:
            raise ConfigError(f"sample size {cap} is not positive; use e.g. max_samples=2**20")
        self.cap = cap
        self.seed = seed
        self.values: Tensor | None = None
        self._keys: Tensor | None = None
        self._gen: torch.Generator | None = None

    def add(self, rows: Tensor) -> None:
        """Offer one call's rows ``[R, n]`` to the sample (same R on every call)."""
        if self._gen is None or self._gen.device != rows.device:
            self._gen = torch.Generator(device=rows.device).manual_seed(self.seed)
        keys = torch.rand(rows.shape, generator=self._gen, device=rows.device)
        if self.values is not None and self._keys is not None:
            if rows.shape[0] == 1 and self._keys.shape[1] >= self.cap:
                # Only values beating the current smallest kept key can enter: skip the rest cheaply.
                keep = keys[0] > self._keys.min()
                rows, keys = rows[:, keep], keys[:, keep]
            rows = torch.cat([self.values, rows], dim=1)
            keys = torch.cat([self._keys, keys], dim=1)
        if rows.shape[1] > self.cap:
            keys, idx = torch.topk(keys, self.cap, dim=1, sorted=False)
            rows = torch.gather(rows, 1, idx)
        self.values, self._keys = rows, keys
