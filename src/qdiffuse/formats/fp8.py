"""FP8 (OCP e4m3 "fn" and e5m2) with a per-tensor or per-channel scale.

Values are divided by a scale so the range fits the format, cast to torch's float8 dtype and multiplied back.
torch's cast does not saturate for e5m2 (overflow becomes inf), so every path clamps to the format's largest
finite value first: an out-of-range value becomes the largest representable one, as FP8 GEMM hardware does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdiffuse.errors import ConfigError
from qdiffuse.formats.integer import SCALE_MIN, needs_grad

FP8_MAX: dict[str, float] = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
"""Largest finite magnitude of each FP8 kind."""

FP8_DTYPES: dict[str, torch.dtype] = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
"""torch storage dtype of each FP8 kind."""


def _check_kind(kind: str) -> None:
    if kind not in FP8_MAX:
        raise ConfigError(f"unknown FP8 format {kind!r}; use one of {', '.join(FP8_MAX)}")


def fp8_scale(amax: Tensor, kind: str) -> Tensor:
    """Scale that maps ``amax`` onto the format's largest value (never 0, so all-zero tensors stay zero)."""
    _check_kind(kind)
    amax = torch.as_tensor(amax)
    dtype = torch.promote_types(amax.dtype, torch.float32) if amax.is_floating_point() else torch.float32
    return (amax.to(dtype) / FP8_MAX[kind]).clamp_min(SCALE_MIN)


def quantize_fp8(x: Tensor, scale: Tensor, kind: str) -> Tensor:
    """``x / scale`` saturated to ±max and cast (round to nearest even) to the float8 dtype of ``kind``."""
    _check_kind(kind)
    fmax = FP8_MAX[kind]
    return torch.clamp(x / scale, -fmax, fmax).to(FP8_DTYPES[kind])


def dequantize_fp8(q: Tensor, scale: Tensor) -> Tensor:
    """float32 values ``q * scale`` of FP8 codes."""
    return q.to(torch.float32) * scale


def fake_quant_fp8(x: Tensor, scale: Tensor, kind: str) -> Tensor:
    """Quantize to FP8 and back, differentiably.

    The forward value equals ``dequantize_fp8(quantize_fp8(x))``; the cast is straight-through, so
    ``d/dx`` is 1 inside ±max·scale and 0 where the value saturated, and the scale gets the LSQ-style
    gradient from autograd. The result has ``x``'s dtype.
    """
    _check_kind(kind)
    fmax = FP8_MAX[kind]
    if not needs_grad(x, scale):
        y = torch.div(x, scale).clamp_(-fmax, fmax)
        return y.to(FP8_DTYPES[kind]).to(y.dtype).mul_(scale).to(x.dtype)
    y = torch.clamp(x / scale, -fmax, fmax)
    yq = y.detach().to(FP8_DTYPES[kind]).to(y.dtype)
    return ((y + (yq - y.detach())) * scale).to(x.dtype)
