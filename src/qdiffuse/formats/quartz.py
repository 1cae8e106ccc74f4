"""QuaRTZ: 4-bit values from an 8-bit grid by residual truncation and leading-zero suppression.

A coarse 4-bit grid spends its 16 levels on the range its largest value needs, so the many small values of a
group round to 0 or ±1 step. QuaRTZ quantizes in two stages instead:

1. **INT8** with a min–max scale per group of ``stage1_group`` consecutive values along the reduction dimension
   (64 by default): signed codes ``q ∈ [−127, 127]`` (``s = amax / 127``), or for a non-negative tensor the
   unsigned variant ``q ∈ [0, 255]`` (``s = max / 255``).
2. **Leading-zero suppression (LZS)** over groups of ``lzs_group`` consecutive codes (16 or 32): with ``m`` the
   group's largest magnitude, ``FLAG = max(bit_length(m) − M, 0)`` where ``M`` is the magnitude bits a 4-bit
   code keeps (3 beside a sign bit; 4 for the unsigned variant), so ``FLAG ∈ {0, …, 4}``. Each code is stored as
   sign + ``M``-bit magnitude and decodes to ``sign · (mag << FLAG)``:

   * ``truncate`` (the paper): ``mag = |q| >> FLAG``;
   * ``nearest`` (the authors' public code rounds): ``mag = ⌊|q| / 2^FLAG + ½⌋`` (ties away from zero),
     saturated at ``2^M − 1`` so the group maximum never overflows its bits.

A group without an outlier (``m < 8``) keeps its INT8 codes exactly, low bits and all; a group with one keeps
its high bits. Storage per value: a 4-bit code plus a 3-bit flag per LZS group, plus the stage-1 scales
(:func:`effective_bits`). Every function works along the LAST dimension (the one a matmul reduces over;
callers move it there) with zero padding, and computes in float32 on integer-valued tensors, so it runs on
any device; the fake-quantizer's gradient is straight-through.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdiffuse.errors import ConfigError, DataError
from qdiffuse.formats.blocks import from_blocks, to_blocks
from qdiffuse.formats.integer import SCALE_MIN

STAGE1_GROUP = 64
"""Values per stage-1 INT8 scale (the paper's group of input channels)."""
LZS_GROUP = 16
"""Codes per LZS flag."""
LZS_GROUPS = (16, 32)
"""LZS group sizes the schemes offer (any positive divisor of the stage-1 group works in the functions)."""
ROUNDINGS = ("truncate", "nearest")
FLAG_BITS = 3
MAX_FLAG = 4
CODE_BITS = 4


def check_quartz_groups(stage1_group: int, lzs_group: int, rounding: str) -> None:
    """One-line errors for group sizes and roundings the format cannot use."""
    _check_rounding(rounding)
    if not isinstance(lzs_group, int) or lzs_group < 2:
        raise ConfigError(f"QuaRTZ LZS group size {lzs_group} must be an integer >= 2; use 16 or 32")
    if not isinstance(stage1_group, int) or stage1_group < lzs_group or stage1_group % lzs_group:
        raise ConfigError(
            f"QuaRTZ stage-1 group {stage1_group} must be a multiple of the LZS group {lzs_group} "
            "(e.g. 64 with LZS groups of 16 or 32)"
        )


def scale_code(unsigned: bool = False, fit_lzs: bool = True) -> int:
    """The stage-1 code a group's largest |x| maps to.

    ``fit_lzs`` (the default): 112 = 7 << 4 (unsigned 240 = 15 << 4), the largest code leading-zero suppression
    keeps exactly. Plain min–max (``fit_lzs=False``) maps it to 127 (255), which LZS then saturates to 112: the
    largest value of every group shrinks by 12%, always towards zero. On ``fmnist-tiny`` at W4A4 (DDIM 50, N = 200)
    that bias alone turns FID 6.36 / 18.8 dB PSNR to FP into 30.96 / 12.0 dB (BENCHMARKS.md, "QuaRTZ").
    """
    if fit_lzs:
        return (2 ** magnitude_bits(unsigned) - 1) << MAX_FLAG
    return stage1_bounds(unsigned)[1]


def stage1_bounds(unsigned: bool = False) -> tuple[int, int]:
    """Code range of stage 1: ``(−127, 127)`` signed, ``(0, 255)`` unsigned."""
    return (0, 255) if unsigned else (-127, 127)


def magnitude_bits(unsigned: bool = False) -> int:
    """Magnitude bits a 4-bit code keeps: 3 beside the sign, 4 when there is no sign."""
    return CODE_BITS if unsigned else CODE_BITS - 1


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ConfigError(f"QuaRTZ rounding {rounding!r} unknown; use {' or '.join(ROUNDINGS)}")


def _check_group(group_size: int) -> None:
    if not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"LZS group size {group_size} must be a positive integer; use 16 or 32")


def _flags(mag_blocks: Tensor, unsigned: bool, dim: int = -1) -> Tensor:
    """FLAG per LZS group of magnitudes (float, integer-valued; the group's values along ``dim``), keepdim.

    ``frexp`` gives ``m = f · 2^e`` with ``f ∈ [0.5, 1)``, so ``e`` is the bit length of an integer ``m > 0``
    and 0 for ``m = 0``.
    """
    _, e = torch.frexp(mag_blocks.amax(dim=dim, keepdim=True))
    return (e.to(mag_blocks.dtype) - magnitude_bits(unsigned)).clamp_(0, MAX_FLAG)


def _kept_magnitudes(mags: Tensor, step: Tensor, rounding: str, unsigned: bool) -> Tensor:
    """``mag`` of every code (before the shift back), in place on ``mags``; ``step = 2^FLAG`` broadcasts."""
    mags.div_(step)  # a power of two: exact
    if rounding == "nearest":
        mags.add_(0.5)
    return mags.floor_().clamp_(max=2 ** magnitude_bits(unsigned) - 1)


def _lzs_grouped(q: Tensor, dim: int, rounding: str, unsigned: bool) -> Tensor:
    """LZS of integer-valued float codes ``q`` whose dimension ``dim`` holds the values of one LZS group: a new
    tensor of decoded codes (a handful of passes over the data: this runs on every activation, every call)."""
    mags = q.abs()
    step = torch.exp2(_flags(mags, unsigned, dim))
    return _kept_magnitudes(mags, step, rounding, unsigned).mul_(step).copysign_(q)


def _lzs_values(q: Tensor, group_size: int, rounding: str, unsigned: bool) -> Tensor:
    """LZS of integer-valued float codes ``q`` along the last dimension (no checks, no dtype changes)."""
    return from_blocks(_lzs_grouped(to_blocks(q, group_size), -1, rounding, unsigned), q.shape[-1])


def lzs(q: Tensor, group_size: int = LZS_GROUP, rounding: str = "truncate", unsigned: bool = False) -> Tensor:
    """Leading-zero suppression of stage-1 codes: the integer codes that decode from the 4-bit storage.

    ``q``: integer codes of any shape and integer or integer-valued float dtype, in ``[−127, 127]``
    (``[0, 255]`` with ``unsigned``), grouped along the last dimension in groups of ``group_size`` (the last
    group zero-padded). Returns codes of the same shape and dtype. Examples (group of 4):
    ``[100, 7, −9, 1]`` has FLAG 4 → ``[96, 0, 0, 0]`` truncated, ``[96, 0, −16, 0]`` rounded;
    ``[7, −5, 3, 1]`` has FLAG 0 and is unchanged. A code of −128 saturates like 127.
    """
    _check_group(group_size)
    _check_rounding(rounding)
    if q.is_floating_point() and q.numel() and not bool((q == torch.round(q)).all()):
        raise DataError("lzs takes integer codes; round the stage-1 values first (quartz_codes does)")
    if unsigned and q.numel() and int(q.min()) < 0:
        raise DataError("the unsigned LZS variant takes codes >= 0; use unsigned=False for signed codes")
    out = _lzs_values(q.to(torch.float32), group_size, rounding, unsigned)
    return out.to(q.dtype)


def lzs_ste(q: Tensor, group_size: int = LZS_GROUP, rounding: str = "nearest", unsigned: bool = False) -> Tensor:
    """:func:`lzs` of integer-valued float codes along the last dimension, with an identity gradient: learned
    stage-1 rounding (reconstruction's AdaRound) trains through the suppression it will get."""
    return q + (_lzs_values(q.detach(), group_size, rounding, unsigned) - q).detach()


def lzs_encode(
    q: Tensor, group_size: int = LZS_GROUP, rounding: str = "truncate", unsigned: bool = False
) -> tuple[Tensor, Tensor]:
    """The 4-bit storage of stage-1 codes: ``(codes, flags)``.

    ``codes`` (uint8, shape of ``q``, values 0..15): bit 3 the sign and bits 0-2 the magnitude (unsigned: four
    magnitude bits); ``flags`` (uint8 ``[..., ceil(n / group_size)]``, values 0..4). :func:`lzs_decode` of them
    equals :func:`lzs` of ``q``.
    """
    _check_group(group_size)
    _check_rounding(rounding)
    n = q.shape[-1]
    blocks = to_blocks(torch.round(q.detach().to(torch.float32)), group_size)
    mags = blocks.abs()
    flags = _flags(mags, unsigned)
    mag = _kept_magnitudes(mags, torch.exp2(flags), rounding, unsigned)
    codes = mag if unsigned else mag + 8.0 * ((blocks < 0) & (mag > 0))
    return from_blocks(codes, n).to(torch.uint8), flags.squeeze(-1).to(torch.uint8)


def lzs_decode(
    codes: Tensor,
    flags: Tensor,
    group_size: int = LZS_GROUP,
    unsigned: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Integer codes (as ``dtype``) of :func:`lzs_encode`'s storage."""
    _check_group(group_size)
    n = codes.shape[-1] if codes.dim() else 0
    if codes.dim() == 0 or flags.shape != (*codes.shape[:-1], -(-n // group_size)):
        raise DataError(
            f"lzs_decode: codes of shape {tuple(codes.shape)} do not match flags of shape {tuple(flags.shape)} "
            f"for groups of {group_size}; pass the codes and flags of the same lzs_encode call"
        )
    blocks = to_blocks(codes.to(torch.int16), group_size)
    if unsigned:
        mag, negative = blocks.to(torch.float32), torch.zeros_like(blocks, dtype=torch.bool)
    else:
        mag, negative = (blocks & 7).to(torch.float32), (blocks & 8) > 0
    kept = mag * torch.exp2(flags.to(torch.float32)).unsqueeze(-1)
    return from_blocks(torch.where(negative, -kept, kept), n).to(dtype)


def quartz_scale(
    x: Tensor, stage1_group: int = STAGE1_GROUP, unsigned: bool = False, fit_lzs: bool = True
) -> Tensor:
    """Min–max stage-1 scale per group of ``stage1_group`` values along the last dimension: ``[..., ng, 1]``."""
    blocks = to_blocks(x.detach().to(torch.promote_types(x.dtype, torch.float32)), stage1_group)
    return _block_scale(blocks, -1, unsigned, fit_lzs)


def _block_scale(blocks: Tensor, dim: int, unsigned: bool, fit_lzs: bool) -> Tensor:
    """Min–max scale of each block (its values along ``dim``, keepdim): the block's largest |x| (largest x,
    unsigned) to :func:`scale_code`. max(amax, −amin) takes two reductions and no |x| copy: this runs on every
    activation, every call."""
    amax = blocks.amax(dim, keepdim=True)
    amax = amax.clamp_min(0) if unsigned else torch.maximum(amax, blocks.amin(dim, keepdim=True).neg_())
    return amax.div_(scale_code(unsigned, fit_lzs)).clamp_min_(SCALE_MIN)


def quartz_codes(x: Tensor, scale: Tensor, stage1_group: int = STAGE1_GROUP, unsigned: bool = False) -> Tensor:
    """Stage-1 INT8 codes of ``x`` along its last dimension (``[..., ng, stage1_group]``, integer-valued float,
    before LZS)."""
    qmin, qmax = stage1_bounds(unsigned)
    blocks = to_blocks(x.detach().to(torch.float32), stage1_group)
    return torch.round(blocks / scale.to(blocks.dtype)).clamp_(qmin, qmax)


def fake_quant_quartz(
    x: Tensor,
    scale: Tensor | None = None,
    stage1_group: int = STAGE1_GROUP,
    lzs_group: int = LZS_GROUP,
    rounding: str = "nearest",
    unsigned: bool = False,
    dim: int = -1,
    fit_lzs: bool = True,
) -> Tensor:
    """QuaRTZ quantize-dequantize along dimension ``dim`` (the matmul's reduction dimension), with a
    straight-through gradient.

    ``scale``: stage-1 scales broadcastable against ``x`` with ``dim`` split into ``(n_groups, stage1_group)``
    (e.g. ``[C, n_groups, 1]`` for weight rows, ``[n_groups, 1, 1, 1]`` for a static scale per channel group of
    an ``[N, C, H, W]`` input); None takes them from ``x``, per group and position (dynamic), mapping each group's
    largest |x| to :func:`scale_code`. The forward value is
    ``lzs(clamp(round(x / s))) · s``; the gradient is 1 where ``x`` was not clipped (both roundings are passed
    straight through) and the scale receives LSQ's step gradient.
    """
    check_quartz_groups(stage1_group, lzs_group, rounding)
    dim = dim % x.dim()
    work = torch.promote_types(x.dtype, torch.float32)
    n = x.shape[dim]
    qmin, qmax = stage1_bounds(unsigned)
    blocks = to_blocks(x.to(work), stage1_group, dim)
    if scale is None:
        scale = _block_scale(blocks.detach(), dim + 1, unsigned, fit_lzs)
    scale = scale.to(work)
    lzs_shape = (*blocks.shape[: dim + 1], stage1_group // lzs_group, lzs_group, *blocks.shape[dim + 2 :])
    if blocks.requires_grad or scale.requires_grad:
        scaled = torch.clamp(blocks / scale, qmin, qmax)
        codes = _lzs_grouped(torch.round(scaled.detach()).reshape(lzs_shape), dim + 2, rounding, unsigned)
        out = (scaled + (codes.reshape(blocks.shape) - scaled).detach()) * scale
    else:
        q = torch.div(blocks, scale).round_().clamp_(qmin, qmax).reshape(lzs_shape)
        out = _lzs_grouped(q, dim + 2, rounding, unsigned).reshape(blocks.shape).mul_(scale)
    out = out.flatten(dim, dim + 1)
    return out.narrow(dim, 0, n).to(x.dtype)


def search_quartz_scale(
    x: Tensor,
    stage1_group: int = STAGE1_GROUP,
    lzs_group: int = LZS_GROUP,
    rounding: str = "nearest",
    unsigned: bool = False,
    fit_lzs: bool = True,
    ratios: tuple[float, ...] = tuple(1.0 - 0.05 * i for i in range(11)),
) -> Tensor:
    """Stage-1 scales ``[..., ng, 1]`` that minimise each group's squared error after LZS (the ``mse`` observer
    for QuaRTZ weights): the min–max scale times the best of ``ratios``, chosen per group.

    Clipping the largest value of a group lowers its FLAG where that value alone set it, so the other values of
    its LZS groups keep more bits; the search weighs that against the clipped value's own error.
    """
    base = quartz_scale(x, stage1_group, unsigned, fit_lzs)
    blocks = to_blocks(x.detach().to(torch.float32), stage1_group)
    best_err = best = None
    for r in ratios:
        s = (base * r).clamp_min(SCALE_MIN)
        err = (fake_quant_quartz(blocks.flatten(-2), s, stage1_group, lzs_group, rounding, unsigned)
               .reshape(blocks.shape) - blocks).pow(2).sum(dim=-1, keepdim=True)
        if best_err is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s, best)
    assert best is not None
    return best


def quartz_encode(
    x: Tensor,
    scale: Tensor,
    stage1_group: int = STAGE1_GROUP,
    lzs_group: int = LZS_GROUP,
    rounding: str = "nearest",
    unsigned: bool = False,
) -> tuple[Tensor, Tensor]:
    """Storage of ``x`` under ``scale``: 4-bit codes (uint8 ``[..., ng · stage1_group]``, padding included) and
    flags (uint8 ``[..., ng · stage1_group / lzs_group]``); see :func:`lzs_encode`."""
    check_quartz_groups(stage1_group, lzs_group, rounding)
    q = quartz_codes(x, scale, stage1_group, unsigned).flatten(-2)
    return lzs_encode(q, lzs_group, rounding, unsigned)


def quartz_decode(
    codes: Tensor,
    flags: Tensor,
    scale: Tensor,
    n: int,
    stage1_group: int = STAGE1_GROUP,
    lzs_group: int = LZS_GROUP,
    unsigned: bool = False,
) -> Tensor:
    """float32 values ``[..., n]`` of :func:`quartz_encode`'s storage (equal to :func:`fake_quant_quartz`)."""
    q = lzs_decode(codes, flags, lzs_group, unsigned)
    blocks = q.reshape(*q.shape[:-1], -1, stage1_group)
    return from_blocks(blocks * scale.to(torch.float32), n)


def effective_bits(stage1_group: int = STAGE1_GROUP, lzs_group: int = LZS_GROUP, scale_bits: int = 32) -> float:
    """Bits stored per value: the 4-bit code, a 3-bit flag per LZS group and a ``scale_bits`` scale per stage-1
    group (4 + 3/16 + 32/64 = 4.69 with the float32 scales this package stores)."""
    return CODE_BITS + FLAG_BITS / lzs_group + scale_bits / stage1_group


__all__ = [
    "STAGE1_GROUP",
    "LZS_GROUP",
    "LZS_GROUPS",
    "ROUNDINGS",
    "FLAG_BITS",
    "check_quartz_groups",
    "stage1_bounds",
    "scale_code",
    "magnitude_bits",
    "lzs",
    "lzs_encode",
    "lzs_ste",
    "lzs_decode",
    "quartz_scale",
    "quartz_codes",
    "fake_quant_quartz",
    "search_quartz_scale",
    "quartz_encode",
    "quartz_decode",
    "effective_bits",
]
