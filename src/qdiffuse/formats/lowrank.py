"""SVDQuant's low-rank branch: absorb a weight's outliers into a small 16-bit factorisation, quantize the rest.

Li et al. 2024 ("SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion Models") split a
weight as ``W = L1 @ L2 + R``: the top-``r`` singular components ``L1 [out, r]``, ``L2 [r, K]`` stay in 16 bits
and only the residual ``R`` is quantized. A few outlier input channels make ``W`` nearly low-rank in exactly the
directions that hurt a per-channel 4-bit grid, so removing those directions shrinks ``R``'s range (and with it
the quantization step) far more than its energy. The branch costs ``r * (out + K)`` extra values and
multiply-accumulates per output position, small for ``r`` in the tens.

Conv weights are handled as ``weight.reshape(out, -1)`` (``K = in * kh * kw``), the same flattening the
block-scaled formats use, so ``R`` keeps the conv's shape and the branch runs as two convolutions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from qdiffuse.errors import ConfigError


def _check_rank(rank: int) -> None:
    if rank < 0:
        raise ConfigError(f"low-rank branch rank must be >= 0, got {rank}; use 0 to disable the branch")


def lowrank_split(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``weight`` into ``(L1, L2, R)`` with ``L1 @ L2 + R.reshape(out, -1) == weight.reshape(out, -1)``.

    The singular values are shared symmetrically (``L1 = U sqrt(S)``, ``L2 = sqrt(S) Vᵀ``) so both factors have
    the same range and survive a 16-bit cast equally well. The SVD runs in float64 because the tail singular
    values (what ``R`` keeps) are small next to the outlier ones and a float32 SVD would leak the outliers' round
    off into ``R``. ``R`` is computed against the factors as returned, so the split is exact up to the rounding
    of ``R`` itself. Results have ``weight``'s dtype (float32 for a non-float weight); ``R`` has its shape.

    ``rank`` is clipped to ``min(out, K)``; rank 0 gives empty ``[out, 0]`` / ``[0, K]`` factors and ``R = W``.
    """
    _check_rank(rank)
    if weight.ndim < 2:
        raise ConfigError(
            f"low-rank split needs a weight of at least 2 dimensions [out, ...], got shape {tuple(weight.shape)}; "
            "apply it to linear or conv weights only"
        )
    if not bool(torch.isfinite(weight).all()):
        raise ConfigError(
            "low-rank split got a weight with NaN or inf values; load the model in float32 and check its checkpoint"
        )
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    out = weight.shape[0]
    w = weight.detach().reshape(out, -1).to(torch.float64)
    r = min(rank, out, w.shape[1])
    if r == 0:
        l1 = w.new_zeros(out, 0).to(dtype)
        l2 = w.new_zeros(0, w.shape[1]).to(dtype)
        return l1, l2, weight.detach().to(dtype).clone()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:r].sqrt()
    l1 = (u[:, :r] * root).to(dtype)
    l2 = (root[:, None] * vh[:r]).to(dtype)
    residual = w - l1.to(torch.float64) @ l2.to(torch.float64)
    return l1, l2, residual.to(dtype).reshape(weight.shape)


def lowrank_bytes(out_features: int, reduction: int, rank: int, bits: int = 16) -> int:
    """Bytes that the two factors add to a layer (``rank * (out + K)`` values of ``bits`` bits, rounded up).

    This is the memory a quantization plan must charge against the saving from quantizing ``R``; at 4-bit
    weights a rank-32 branch on a 1280×1280 layer already costs an eighth of the quantized weight.
    """
    _check_rank(rank)
    if bits <= 0:
        raise ConfigError(f"low-rank branch bits must be positive, got {bits}; use 16 for the usual fp16/bf16")
    if out_features < 0 or reduction < 0:
        raise ConfigError(f"layer sizes must be >= 0, got out={out_features}, reduction={reduction}")
    return math.ceil(rank * (out_features + reduction) * bits / 8)


def lowrank_macs(out_features: int, reduction: int, rank: int, positions: int) -> int:
    """Multiply-accumulates of the branch for ``positions`` output positions: ``positions * rank * (out + K)``.

    ``positions`` is the number of output vectors (tokens for a linear, ``N * H_out * W_out`` for a conv); the
    down projection costs ``rank * K`` per position and the up projection ``rank * out``.
    """
    _check_rank(rank)
    if out_features < 0 or reduction < 0 or positions < 0:
        raise ConfigError(
            f"layer sizes must be >= 0, got out={out_features}, reduction={reduction}, positions={positions}"
        )
    return positions * rank * (out_features + reduction)


def lowrank_apply_linear(x: Tensor, l1: Tensor, l2: Tensor) -> Tensor:
    """Branch output ``(x @ l2ᵀ) @ l1ᵀ`` for ``x [..., K]``, giving ``[..., out]``.

    The product is taken in this order so the cost is ``rank * (out + K)`` per row; forming ``l1 @ l2`` first
    would cost a full ``out * K`` matmul and defeat the branch.
    """
    return F.linear(F.linear(x, l2), l1)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def lowrank_apply_conv2d(
    x: Tensor,
    l1: Tensor,
    l2: Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Tensor:
    """Branch output of a conv layer: a ``rank``-channel conv with ``l2`` then a 1×1 conv with ``l1``.

    Row ``j`` of ``l2`` is a full ``[C, kh, kw]`` filter (the flattening of :func:`lowrank_split`), so the first
    conv takes the layer's stride, padding and dilation and the second only mixes the ``rank`` channels; the sum
    with ``F.conv2d(x, R, ...)`` equals the original conv. Padding is zero padding; pad ``x`` yourself for other
    padding modes. Grouped convs are not supported: their weight is block-diagonal in the flattened view, which
    a single low-rank pair does not preserve.
    """
    if groups != 1:
        raise ValueError(f"the low-rank branch supports groups=1 convs only, got groups={groups}")
    kh, kw = _pair(kernel_size)
    rank, k = l2.shape
    if k % (kh * kw) != 0:
        raise ValueError(f"l2 has {k} columns, not a multiple of the kernel size {kh}x{kw}")
    pad = padding if isinstance(padding, str) else _pair(padding)
    if rank == 0:
        # torch rejects a conv with no filters; an empty branch contributes zeros of the layer's output shape,
        # taken from a one-filter conv so string padding and dilation are handled exactly as torch does.
        probe = F.conv2d(
            x, x.new_zeros(1, k // (kh * kw), kh, kw), stride=_pair(stride), padding=pad, dilation=_pair(dilation)
        )
        return x.new_zeros(probe.shape[0], l1.shape[0], *probe.shape[2:])
    down = l2.reshape(rank, k // (kh * kw), kh, kw)
    h = F.conv2d(x, down, stride=_pair(stride), padding=pad, dilation=_pair(dilation))
    return F.conv2d(h, l1.reshape(l1.shape[0], rank, 1, 1))
