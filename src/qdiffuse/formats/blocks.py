"""Blocks of consecutive values along the last dimension: the layout every blockwise format shares.

NVFP4, MXFP4 and QuaRTZ give each run of consecutive values along the dimension a matmul reduces over its own
scale (or flag). The last dimension is zero-padded to a whole number of blocks; zeros never raise a block's
maximum, so the padding changes no value, and :func:`from_blocks` strips it again.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdiffuse.errors import DataError


def to_blocks(x: Tensor, block: int, dim: int = -1) -> Tensor:
    """Dimension ``dim`` of ``x`` (zero-padded to a multiple of ``block``) split into ``(ceil(n / block), block)``:
    ``[..., n]`` → ``[..., ceil(n / block), block]`` for the last dimension."""
    if x.dim() == 0:
        raise DataError("block formats need a tensor with at least one dimension; reshape scalars to [1]")
    dim = dim % x.dim()
    n = x.shape[dim]
    pad = (-n) % block
    if pad:
        x = torch.nn.functional.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, pad])
    return x.reshape(*x.shape[:dim], (n + pad) // block, block, *x.shape[dim + 1 :])


def from_blocks(blocks: Tensor, n: int) -> Tensor:
    """Inverse of :func:`to_blocks`: merge the block dimension and strip padding back to length ``n``."""
    flat = blocks.reshape(*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1])
    return flat[..., :n]


__all__ = ["to_blocks", "from_blocks"]
