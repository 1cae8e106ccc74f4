"""Range structure of every quantized input, measured on the FP model over the calibration set.

What one static per-tensor grid can hold depends on two things the calibration data shows directly: how unequal
the channels are (a channel whose maximum is 10³× the median channel's leaves the others a few codes), and how much
the range moves with the timestep (a range that grows 6× between the noisiest and the last step wastes most of the
grid at one end). :class:`RangeStats` keeps, per layer input, the per-channel minimum and maximum and the largest
magnitude seen at each timestep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class RangeStats:
    """One quantized input: per-channel min/max over the calibration set and max |x| per timestep."""

    channel_dim: int
    ch_min: Tensor | None = None
    ch_max: Tensor | None = None
    per_t: dict[int, float] = field(default_factory=dict)
    rotation: int = 0
    """Hadamard block over the channels whose rotated range is also kept (0: none)."""
    rot_min: float = float("inf")
    rot_max: float = float("-inf")

    def update(self, x: Tensor, t: Tensor | None) -> None:
        x = x.detach().float()
        if self.rotation:
            from qdiffuse.formats.hadamard import hadamard_transform

            rotated = hadamard_transform(x, self.rotation, self.channel_dim)
            self.rot_min = min(self.rot_min, float(rotated.amin()))
            self.rot_max = max(self.rot_max, float(rotated.amax()))
        moved = x.movedim(self.channel_dim, -1).reshape(-1, x.shape[self.channel_dim])
        lo, hi = moved.amin(0), moved.amax(0)
        self.ch_min = lo if self.ch_min is None else torch.minimum(self.ch_min, lo)
        self.ch_max = hi if self.ch_max is None else torch.maximum(self.ch_max, hi)
        if t is not None and t.numel() == x.shape[0]:
            per_sample = x.abs().reshape(x.shape[0], -1).amax(1)
            for tv in torch.unique(t).tolist():
                m = float(per_sample[t == tv].max())
                key = int(round(tv))
                self.per_t[key] = max(self.per_t.get(key, 0.0), m)

    @property
    def channel_absmax(self) -> Tensor:
        assert self.ch_min is not None and self.ch_max is not None
        return torch.maximum(self.ch_min.abs(), self.ch_max.abs())

    @property
    def channel_ratio(self) -> float:
        """Largest channel's max |x| over the median channel's (1: balanced)."""
        a = self.channel_absmax
        return float(a.max() / a.median().clamp_min(1e-12))

    @property
    def drift_ratio(self) -> float:
        """Largest over smallest per-timestep max |x| (1: the range does not move with t)."""
        values = [v for v in self.per_t.values() if v > 0]
        return max(values) / min(values) if len(values) > 1 else 1.0

    def outlier_channels(self, threshold: float = 16.0, limit: int | None = None) -> Tensor:
        """Channels whose max |x| exceeds ``threshold`` × the median channel's, largest first."""
        a = self.channel_absmax
        idx = torch.nonzero(a > threshold * a.median().clamp_min(1e-12)).flatten()
        idx = idx[torch.argsort(a[idx], descending=True)]
        return idx[:limit] if limit is not None else idx

    def summary(self) -> dict[str, Any]:
        a = self.channel_absmax
        return {
            "absmax": float(a.max()),
            "channel_ratio": round(self.channel_ratio, 3),
            "drift_ratio": round(self.drift_ratio, 3),
            "outlier_channels": int(self.outlier_channels().numel()),
        }


__all__ = ["RangeStats"]
