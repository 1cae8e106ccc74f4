"""Uniform integer quantization: bounds, scale/zero-point from a range, quantize, dequantize, fake-quantize.

Codes are carried as integer-valued float tensors, so the same code path runs on every device and dtype and
stays differentiable; packing to real integers happens only when a model is saved (see :mod:`.pack`).
All functions broadcast: ``scale``/``zero_point`` may be scalars, per-channel ``[C, 1, ...]`` or per-group
``[C, n_groups, 1]`` tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdiffuse.errors import ConfigError
from qdiffuse.formats.ste import round_ste

SCALE_MIN = 1e-8
"""Smallest scale ever produced: a constant-zero range still gets a positive step (0/scale is 0, not NaN)."""


def int_bounds(bits: int, symmetric: bool, unsigned: bool = False) -> tuple[int, int]:
    """Integer code range ``(qmin, qmax)``.

    Symmetric signed grids drop the most negative code (int8 → [-127, 127]) so the grid is centred on zero
    and ``-x`` quantizes to ``-q(x)``; asymmetric and unsigned grids use all ``2**bits`` codes
    ``[0, 2**bits - 1]``.
    """
    if not 1 <= bits <= 16:
        raise ConfigError(f"integer bit-width {bits} is out of range; use 1 to 16 bits (2 to 8 for models)")
    if unsigned or not symmetric:
        return 0, 2**bits - 1
    if bits < 2:
        raise ConfigError("a symmetric signed grid needs at least 2 bits; use bits >= 2 or asymmetric")
    qmax = 2 ** (bits - 1) - 1
    return -qmax, qmax


def _work_dtype(t: Tensor) -> torch.dtype:
    """float32 at least: scales computed in half precision lose the small-range cases."""
    return torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32


def int_qparams(
    xmin: Tensor, xmax: Tensor, bits: int, symmetric: bool, unsigned: bool = False
) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map the range ``[xmin, xmax]`` onto the integer grid.

    The range is first widened to contain 0, so zero (padding, ReLU outputs) is always exactly representable.
    Symmetric: ``scale = max(|xmin|, |xmax|) / qmax`` and zero point 0. Asymmetric:
    ``scale = (xmax - xmin) / (qmax - qmin)`` and ``zero_point = round(qmin - xmin / scale)`` clamped to the
    grid. Unsigned: ``scale = xmax / qmax`` and zero point 0 (negative values clip to 0). The scale is at
    least :data:`SCALE_MIN`. Results are float32 (float64 for float64 input) and broadcast like ``xmin``;
    the zero point is rounded with the STE so a learned range keeps its gradient.
    """
    xmin = torch.as_tensor(xmin)
    dtype = _work_dtype(xmin)
    xmin = xmin.to(dtype)
    xmax = torch.as_tensor(xmax).to(dtype=dtype, device=xmin.device)
    qmin, qmax = int_bounds(bits, symmetric, unsigned)
    zero = torch.zeros((), dtype=dtype, device=xmin.device)
    lo = torch.minimum(xmin, zero)
    hi = torch.maximum(xmax, zero)
    if unsigned:
        scale = (hi / qmax).clamp_min(SCALE_MIN)
        return scale, torch.zeros_like(scale)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp_min(SCALE_MIN)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(SCALE_MIN)
    zero_point = torch.clamp(round_ste(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


def dequantize_int(q: Tensor, scale: Tensor, zero_point: Tensor | float) -> Tensor:
    """Real values ``(q - zero_point) * scale`` of integer codes."""
    return (q - zero_point) * scale


def quantize_int(x: Tensor, scale: Tensor | float, zero_point: Tensor | float, qmin: int, qmax: int) -> Tensor:
    """Integer codes ``clamp(round(x / scale) + zero_point, qmin, qmax)`` as floats, float32 at least.

    The one rounding rule of every integer path: the simulated quantizers and the integer kernels quantize an
    activation with these same operations, so both see the same codes. A bf16/fp16 input is divided in float32:
    in bf16 ``x / scale`` itself is rounded to 8 significant bits, which moves codes near a rounding boundary by
    one step, differently from one kernel to the next.
    """
    return torch.div(x.to(_work_dtype(x)), scale).round_().add_(zero_point).clamp_(qmin, qmax)


def fake_quant_int(x: Tensor, scale: Tensor, zero_point: Tensor | float, qmin: int, qmax: int) -> Tensor:
    """Quantize then dequantize, differentiably.

    The rounding uses the STE, the clamp its own gradient, so ``d/dx`` is 1 inside the clip range and 0
    outside, and ``d/dscale`` is the LSQ step-size gradient (``round(x/s) - x/s`` inside, the clip level
    outside) without any hand-written backward. The arithmetic runs in float32 at least; the result has ``x``'s
    dtype.
    """
    if not needs_grad(x, scale, zero_point):
        # Same values in place: sampling calls this on every activation, and the STE's extra temporaries
        # cost more than the convolutions of a small model.
        return quantize_int(x, scale, zero_point, qmin, qmax).sub_(zero_point).mul_(scale).to(x.dtype)
    q = torch.clamp(round_ste(x.to(_work_dtype(x)) / scale) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).to(x.dtype)


def needs_grad(*tensors: Tensor | float) -> bool:
    """Whether autograd will differentiate through an op on ``tensors`` (else the STE's temporaries are waste)."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)
