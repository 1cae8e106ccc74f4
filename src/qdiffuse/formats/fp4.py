"""FP4 e2m1 values and the two block-scaled 4-bit formats built on them, NVFP4 and MXFP4.

e2m1 (OCP) has one sign bit, two exponent bits and one mantissa bit; its magnitudes are
0, 0.5, 1, 1.5, 2, 3, 4, 6. Four bits alone cannot cover a tensor's range, so values share a scale per
block of consecutive values along the LAST dimension (the dimension a matmul reduces over; callers
flatten conv weights to ``[out, in * kh * kw]`` first):

* NVFP4: blocks of 16, each with an e4m3 scale, under one fp32 per-tensor ``global_scale``.
* MXFP4 (OCP MX v1.0): blocks of 32, each with a power-of-two (e8m0) scale.

If the last dimension is not a multiple of the block size it is padded with zeros internally and the
padding is stripped from every result; zeros never change a block's maximum, so the padding changes no
value. A block that is entirely zero (or whose scale underflows to zero) decodes to zeros, never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdiffuse.errors import DataError
from qdiffuse.formats.blocks import from_blocks, to_blocks
from qdiffuse.formats.integer import SCALE_MIN

E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Non-negative e2m1 magnitudes; a magnitude's index is its 3-bit OCP code (exponent bits, mantissa bit)."""

E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
E8M0_BIAS = 127
_E2M1_EMAX = 2  # exponent of the largest e2m1 value (6 = 1.5 * 2**2)


def _work_dtype(x: Tensor) -> torch.dtype:
    """Compute in float32 at least: a half-precision division before a 4-bit rounding can move ties."""
    return torch.promote_types(x.dtype, torch.float32)


def _round_e2m1_values(x: Tensor) -> Tensor:
    """Nearest e2m1 value, ties to even mantissa, saturating; no gradient bookkeeping.

    Within each binade the grid is uniform (step 0.5 below 2, 1 in [2, 4), 2 from 4 up), so dividing by the
    step and rounding half-to-even picks the neighbour with the even code, as the OCP spec requires.
    """
    a = x.abs()
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0)).to(a.dtype)
    q = torch.clamp(torch.round(a / step) * step, max=E2M1_MAX)
    return torch.where(x < 0, -q, q)


def round_e2m1(x: Tensor) -> Tensor:
    """Round to the nearest e2m1 value (ties to even mantissa, saturating at ±6).

    Examples: 0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4, 7→6. The gradient is straight-through: 1 for
    |x| ≤ 6 and 0 where the value saturated, like the integer formats' clipping.
    """
    xc = torch.clamp(x, -E2M1_MAX, E2M1_MAX)
    return xc + (_round_e2m1_values(x.detach()) - xc.detach())


def _e2m1_decode_table(device: torch.device) -> Tensor:
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def e2m1_encode(x_on_grid: Tensor) -> Tensor:
    """4-bit OCP codes (uint8, 0..15) of values already on the e2m1 grid.

    Bit 3 is the sign, bits 0-2 the index of the magnitude in :data:`E2M1_VALUES`, which is exactly the OCP
    exponent/mantissa bit pattern. Values off the grid raise :class:`DataError` (round them with
    :func:`round_e2m1` first) rather than being silently rounded twice.
    """
    x = x_on_grid.detach().to(_work_dtype(x_on_grid))
    a = x.abs()
    idx = torch.where(a < 2.0, a * 2.0, torch.where(a < 4.0, a + 2.0, a * 0.5 + 4.0))
    idx = idx.clamp(0, 7).round().to(torch.uint8)
    codes = idx | (x < 0).to(torch.uint8) << 3
    if x.numel() and not bool((e2m1_decode(codes).to(x.dtype) == x).all()):
        raise DataError(
            "e2m1_encode got values that are not on the e2m1 grid; round them with round_e2m1 first"
        )
    return codes


def e2m1_decode(codes: Tensor) -> Tensor:
    """float32 values of 4-bit e2m1 codes (uint8 0..15)."""
    return _e2m1_decode_table(codes.device)[codes.long()]


def _code_blocks(codes: Tensor, scales: Tensor, block: int, what: str) -> Tensor:
    """Codes as blocks, after checking they agree with the number of per-block scales."""
    nblocks = scales.shape[-1] if scales.dim() else 1
    if codes.dim() == 0 or -(-codes.shape[-1] // block) != nblocks:
        raise DataError(
            f"{what}: codes of shape {tuple(codes.shape)} do not match {nblocks} block scales of {block}; "
            "pass the codes and scales returned by the same quantize call"
        )
    return to_blocks(codes, block)


# --------------------------------------------------------------------------------------------------- NVFP4


def nvfp4_global_scale(amax: Tensor) -> Tensor:
    """Per-tensor fp32 scale ``amax / (448 * 6)``: it puts the largest block scale at e4m3's maximum.

    Never 0, so an all-zero tensor still has a valid (tiny) scale.
    """
    amax = torch.as_tensor(amax)
    dtype = torch.promote_types(amax.dtype, torch.float32) if amax.is_floating_point() else torch.float32
    return (amax.to(dtype) / (E4M3_MAX * E2M1_MAX)).clamp_min(SCALE_MIN)


def _nvfp4_steps(blocks: Tensor, global_scale: Tensor) -> tuple[Tensor, Tensor]:
    """e4m3 block scales ``[..., nblocks]`` and the effective step per block ``[..., nblocks, 1]``."""
    g = torch.as_tensor(global_scale, device=blocks.device).to(blocks.dtype)
    amax = blocks.detach().abs().amax(dim=-1)
    block_scales = torch.clamp(amax / E2M1_MAX / g.detach(), max=E4M3_MAX).to(torch.float8_e4m3fn)
    step = block_scales.to(blocks.dtype).unsqueeze(-1) * g
    return block_scales, step


def _scaled_round(blocks: Tensor, step: Tensor) -> Tensor:
    """``round_e2m1(blocks / step)``; zero steps (all-zero or underflowed blocks) give 0 instead of NaN."""
    nonzero = step > 0
    safe = torch.where(nonzero, step, torch.ones_like(step))
    return torch.where(nonzero, round_e2m1(blocks / safe), torch.zeros_like(blocks))


def nvfp4_quantize(x: Tensor, global_scale: Tensor) -> tuple[Tensor, Tensor]:
    """NVFP4 codes of ``x``.

    Per block of 16 along the last dimension: ``s_b = e4m3(block_amax / 6 / global_scale)`` (saturating at
    448) and values ``round_e2m1(x / (s_b * global_scale))``. Returns the e2m1 codes (uint8, same shape as
    ``x``) and the block scales (``float8_e4m3fn``, shape ``[..., ceil(n / 16)]``).
    """
    blocks = to_blocks(x.detach().to(_work_dtype(x)), NVFP4_BLOCK)
    block_scales, step = _nvfp4_steps(blocks, global_scale)
    codes = e2m1_encode(_scaled_round(blocks, step))
    return from_blocks(codes, x.shape[-1]), block_scales


def nvfp4_dequantize(
    codes: Tensor, block_scales: Tensor, global_scale: Tensor, orig_last_dim: int | None = None
) -> Tensor:
    """float32 values of NVFP4 codes; ``orig_last_dim`` (default: the codes' last dim) strips padding."""
    blocks = _code_blocks(codes, block_scales, NVFP4_BLOCK, "nvfp4_dequantize")
    g = torch.as_tensor(global_scale, device=codes.device).to(torch.float32)
    step = block_scales.to(torch.float32).unsqueeze(-1) * g
    values = e2m1_decode(blocks) * step
    return from_blocks(values, codes.shape[-1] if orig_last_dim is None else orig_last_dim)


def fake_quant_nvfp4(x: Tensor, global_scale: Tensor | None = None) -> Tensor:
    """NVFP4 quantize-dequantize with a straight-through gradient (dtype of ``x``).

    Without ``global_scale`` it is computed from ``x``'s absolute maximum (dynamic per-tensor scaling).
    Block scales are taken from the detached data; the gradient w.r.t. ``x`` is 1 except where a value
    saturated, and a ``global_scale`` that requires grad receives the LSQ-style gradient.
    """
    if global_scale is None:
        global_scale = nvfp4_global_scale(x.detach().abs().amax())
    blocks = to_blocks(x.to(_work_dtype(x)), NVFP4_BLOCK)
    _, step = _nvfp4_steps(blocks, global_scale)
    out = _scaled_round(blocks, step) * step
    return from_blocks(out, x.shape[-1]).to(x.dtype)


# --------------------------------------------------------------------------------------------------- MXFP4


def _mx_exponents(blocks: Tensor) -> Tensor:
    """Unbiased shared exponents ``floor(log2(block_amax)) - 2`` clamped to e8m0's [-127, 127].

    ``frexp`` gives the exact binary exponent (``log2`` can round up just below a power of two). All-zero
    blocks get -127; any exponent decodes them to zeros.
    """
    amax = blocks.detach().abs().amax(dim=-1).to(torch.float32)
    _, exp = torch.frexp(amax)
    e = exp.to(torch.int32) - 1 - _E2M1_EMAX
    e = torch.where(amax > 0, e, torch.full_like(e, -E8M0_BIAS))
    return e.clamp(-E8M0_BIAS, E8M0_BIAS)


def _pow2(e: Tensor, dtype: torch.dtype) -> Tensor:
    """Exact ``2**e`` (computed in float64, where every e8m0 value is a normal number)."""
    return torch.exp2(e.to(torch.float64)).to(dtype)


def mxfp4_quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """MXFP4 codes of ``x``.

    Per block of 32 along the last dimension: shared exponent ``e = floor(log2(block_amax)) - 2`` and values
    ``round_e2m1(x / 2**e)`` (saturating at ±6). Returns the e2m1 codes (uint8, same shape as ``x``) and the
    e8m0 exponents (uint8, ``e + 127``, shape ``[..., ceil(n / 32)]``).
    """
    blocks = to_blocks(x.detach().to(_work_dtype(x)), MXFP4_BLOCK)
    e = _mx_exponents(blocks)
    values = _round_e2m1_values(blocks / _pow2(e, blocks.dtype).unsqueeze(-1))
    codes = e2m1_encode(values)
    return from_blocks(codes, x.shape[-1]), (e + E8M0_BIAS).to(torch.uint8)


def mxfp4_dequantize(codes: Tensor, exponents: Tensor, orig_last_dim: int | None = None) -> Tensor:
    """float32 values of MXFP4 codes; ``orig_last_dim`` (default: the codes' last dim) strips padding."""
    blocks = _code_blocks(codes, exponents, MXFP4_BLOCK, "mxfp4_dequantize")
    scale = _pow2(exponents.to(torch.int32) - E8M0_BIAS, torch.float32).unsqueeze(-1)
    values = e2m1_decode(blocks) * scale
    return from_blocks(values, codes.shape[-1] if orig_last_dim is None else orig_last_dim)


def fake_quant_mxfp4(x: Tensor) -> Tensor:
    """MXFP4 quantize-dequantize with a straight-through gradient (1 except where a value saturated)."""
    blocks = to_blocks(x.to(_work_dtype(x)), MXFP4_BLOCK)
    scale = _pow2(_mx_exponents(blocks), blocks.dtype).unsqueeze(-1)
    out = round_e2m1(blocks / scale) * scale
    return from_blocks(out, x.shape[-1]).to(x.dtype)
