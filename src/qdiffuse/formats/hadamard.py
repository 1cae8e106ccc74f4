"""Online Hadamard rotation of a linear layer's reduction dimension (QuaRot; "rotations make outliers incoherent").

For ``y = x Wᵀ + b`` and any orthonormal ``H`` (``H Hᵀ = I``), ``y = (x H)(W H)ᵀ + b`` exactly. A Hadamard ``H``
has entries of equal magnitude ``1/sqrt(n)``, so a single outlier channel of ``x`` is spread evenly over all
``n`` channels: the range a per-token grid has to cover shrinks by about ``sqrt(n)`` while nothing about the
layer's function changes. The weight side is rotated once offline (:func:`rotate_weight`); the activation side
runs at inference with the fast Walsh–Hadamard transform (:func:`hadamard_transform`), ``O(n log b)`` instead of
a dense ``O(n²)`` matmul.

Sylvester Hadamards exist only for powers of two. For other widths (diffusion UNets use 320, 640, 960, 1280...)
the rotation is block-diagonal, ``m`` Sylvester blocks of size ``b`` with ``n = b * m`` and ``b`` the largest
power of two dividing ``n``; it is still orthonormal and still spreads an outlier over ``b`` channels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qdiffuse.errors import ConfigError


def rotation_block(n: int) -> int:
    """Largest power of two dividing ``n``: the Sylvester block size the rotation of width ``n`` uses."""
    if n <= 0:
        raise ConfigError(f"cannot rotate a dimension of size {n}; Hadamard rotation needs a positive even width")
    return n & -n


def _check_block(n: int, block: int) -> None:
    if block < 2 or block & (block - 1) or n % block:
        raise ConfigError(
            f"Hadamard block {block} must be a power of two >= 2 that divides the dimension {n}; "
            f"use rotation_block({n})"
        )


def _sylvester(b: int) -> Tensor:
    """Unnormalised ±1 Sylvester Hadamard of size ``b`` (a power of two), in float64 so the entries are exact."""
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.kron(base, h)
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Orthonormal ``[n, n]`` rotation: a Sylvester Hadamard scaled by ``1/sqrt(b)``, block-diagonal if needed.

    For ``n`` a power of two this is the full Hadamard (``b = n``); otherwise ``n / b`` copies of the size-``b``
    block on the diagonal, ``b = rotation_block(n)``. The matrix is symmetric, so it is its own inverse. An odd
    ``n`` has no Hadamard block larger than 1 and raises :class:`ConfigError`. This is the reference for
    :func:`hadamard_transform`; use the transform on data.
    """
    b = rotation_block(n)
    if b == 1:
        raise ConfigError(
            f"cannot rotate a dimension of odd size {n}: no Hadamard block divides it; leave this layer unrotated"
        )
    h = _sylvester(b) / math.sqrt(b)
    if n != b:
        h = torch.kron(torch.eye(n // b, dtype=torch.float64), h)
    return h.to(dtype=dtype, device=device)


def hadamard_transform(x: Tensor, block: int, dim: int = -1) -> Tensor:
    """``x @ H`` along dimension ``dim`` (the last by default; 1 for the channels of an ``[N, C, H, W]`` input or
    the input channels of a conv weight), with ``H`` block-diagonal of orthonormal Sylvester blocks of size
    ``block``.

    Uses the fast Walsh–Hadamard butterfly: the last dimension is viewed as ``[n / block, block]`` and
    ``log2(block)`` stages of sums and differences are applied, ``O(n log block)`` work and no ``[n, n]`` matrix.
    With ``block = rotation_block(n)`` the result equals ``x @ hadamard_matrix(n)``; any smaller power-of-two
    block dividing ``n`` is also an orthonormal rotation (``kron(I, hadamard_matrix(block))``), if a kernel's tile
    size calls for it. Computes in float32 at least and returns ``x``'s dtype; autograd flows through.
    """
    if dim not in (-1, x.dim() - 1):
        return hadamard_transform(x.movedim(dim, -1), block).movedim(-1, dim)
    n = x.shape[-1]
    _check_block(n, block)
    work = torch.promote_types(x.dtype, torch.float32)
    lead = x.shape[:-1]
    y = x.to(work).reshape(*lead, n // block, block)
    h = 1
    while h < block:
        # Pair element i with i + h inside every run of 2h: (a, c) -> (a + c, a - c), the Sylvester recursion.
        y = y.reshape(*lead, n // block, block // (2 * h), 2, h)
        a, c = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + c, a - c), dim=-2)
        h *= 2
    return (y.reshape(*lead, n) * (1.0 / math.sqrt(block))).to(x.dtype)


def rotate_weight(weight: Tensor, block: int) -> Tensor:
    """``W H`` for a ``[out, in]`` linear weight, rotating the reduction dimension (dim 1) to match the input.

    Done once offline; paired with ``hadamard_transform(x, block)`` on the layer's input it leaves the layer's
    output unchanged. Conv weights are not accepted: their flattened ``in * kh * kw`` dimension is not the
    channel dimension a per-pixel rotation of the input acts on.
    """
    if weight.ndim != 2:
        raise ValueError(f"rotate_weight takes a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    return hadamard_transform(weight, block)
