"""Execution layouts of integer weight codes: what a real layer keeps in memory between calls.

Storage (``formats/pack.py``) is one device-neutral bit stream per weight; execution wants codes the kernel can
read directly. 4-bit codes stay two per byte in memory and are unpacked to int8 right before the GEMM: the
unpack reads each weight once, the GEMM reads it once per output row, so the cost vanishes as the batch grows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdiffuse.errors import DataError

NIBBLE_OFFSET = 8
"""Signed 4-bit codes [-8, 7] are held as unsigned nibbles [0, 15]."""


def pack_int4(codes: Tensor) -> Tensor:
    """Signed int8 codes in [-8, 7] (even element count) -> uint8, two per byte, low nibble first."""
    if codes.dtype != torch.int8:
        raise DataError(f"pack_int4 needs int8 codes, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        raise DataError("pack_int4 needs an even number of codes; pad the weight first")
    if flat.numel() and (int(flat.min()) < -8 or int(flat.max()) > 7):
        raise DataError("a code lies outside [-8, 7]; only 4-bit codes pack two per byte")
    u = flat.view(torch.uint8) + NIBBLE_OFFSET  # wraps modulo 256: exactly code + 8 for codes in [-8, 7]
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_int4`: int8 codes of ``shape``."""
    out = torch.empty(packed.numel() * 2, dtype=torch.uint8, device=packed.device)
    out[0::2] = packed & 15
    out[1::2] = packed >> 4
    return out.view(torch.int8).sub_(NIBBLE_OFFSET).view(shape)


__all__ = ["pack_int4", "unpack_int4", "NIBBLE_OFFSET"]
