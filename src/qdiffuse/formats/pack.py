"""Dense bit packing of low-bit codes for storage.

A 4-bit model kept one code per byte would be twice as large as it needs to be, and 3- or 5-bit codes
would waste even more. :func:`pack_bits` writes codes back to back into a little-endian bit stream: code
``i`` takes stream bits ``[i * bits, (i + 1) * bits)``, stream bit ``k`` is bit ``k % 8`` (least
significant first) of byte ``k // 8``. For 4 bits this is two codes per byte, low nibble first. Signed
integer codes are stored offset so they start at 0 (:func:`codes_to_unsigned`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdiffuse.errors import DataError


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise DataError(f"cannot pack {bits}-bit codes; use a bit-width from 1 to 8")


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (any shape, each ``< 2**bits``) into a 1-D uint8 tensor of ``ceil(numel * bits / 8)``.

    Eight codes make ``bits`` whole bytes, so codes are combined eight at a time into one word of at most
    56 bits and split into bytes: vectorised, no Python loop over values.
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise DataError(
            f"pack_bits needs uint8 codes, got {codes.dtype}; convert signed codes with codes_to_unsigned"
        )
    flat = codes.reshape(-1)
    n = flat.numel()
    if n and int(flat.max()) >= 2**bits:
        raise DataError(f"a code exceeds {2**bits - 1}, the largest {bits}-bit value; check the bit-width")
    if bits == 8:
        return flat.clone()
    nbytes = (n * bits + 7) // 8
    pad = (-n) % 8
    groups = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, 8).to(torch.int64)
    word = torch.zeros(groups.shape[0], dtype=torch.int64, device=codes.device)
    for j in range(8):
        word |= groups[:, j] << (bits * j)
    out = torch.stack([(word >> (8 * k)) & 0xFF for k in range(bits)], dim=1)
    return out.reshape(-1)[:nbytes].to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes (1-D uint8) of a packed stream."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise DataError("unpack_bits needs the 1-D uint8 tensor returned by pack_bits")
    need = (numel * bits + 7) // 8
    if numel < 0 or packed.numel() < need:
        raise DataError(
            f"packed data holds {packed.numel()} bytes but {numel} {bits}-bit codes need {need}; "
            "the file is truncated or the shape is wrong"
        )
    if bits == 8:
        return packed[:numel].clone()
    if bits == 4:  # two per byte, low nibble first: two strided writes instead of the 56-bit words below
        out = torch.empty(2 * need, dtype=torch.uint8, device=packed.device)
        out[0::2] = packed[:need] & 15
        out[1::2] = packed[:need] >> 4
        return out[:numel]
    ngroups = (numel + 7) // 8
    data = torch.nn.functional.pad(packed[:need], (0, ngroups * bits - need))
    data = data.reshape(-1, bits).to(torch.int64)
    word = torch.zeros(ngroups, dtype=torch.int64, device=packed.device)
    for k in range(bits):
        word |= data[:, k] << (8 * k)
    mask = 2**bits - 1
    out = torch.stack([(word >> (bits * j)) & mask for j in range(8)], dim=1)
    return out.reshape(-1)[:numel].to(torch.uint8)


def codes_to_unsigned(q: Tensor, qmin: int) -> Tensor:
    """Integer codes (integer-valued float or int tensor) offset by ``-qmin`` to uint8, ready for packing."""
    u = torch.round(q.detach()) - qmin if q.is_floating_point() else q.detach().to(torch.int64) - qmin
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > 255):
        raise DataError(
            f"codes fall outside [{qmin}, {qmin + 255}]; pass the qmin of the grid they came from"
        )
    return u.to(torch.uint8)


def unsigned_to_codes(u: Tensor, qmin: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`codes_to_unsigned`: codes ``u + qmin`` as integer-valued ``dtype``."""
    return u.to(dtype) + qmin
