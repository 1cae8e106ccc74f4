"""Bit packing: exact round trips for every width and the documented little-endian layout."""

import pytest
import torch

from qdiffuse.errors import DataError
from qdiffuse.formats import codes_to_unsigned, int_bounds, pack_bits, unpack_bits, unsigned_to_codes

U8 = torch.uint8


def test_4bit_layout_low_nibble_first() -> None:
    packed = pack_bits(torch.tensor([1, 2, 3], dtype=U8), 4)
    assert packed.dtype == U8 and packed.tolist() == [0x21, 0x03]


def test_1bit_and_3bit_layouts() -> None:
    bits = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=U8)
    assert pack_bits(bits, 1).tolist() == [0b00001101, 0b1]
    # 1 | 2 << 3 | 3 << 6 = 209, nine bits -> two bytes
    assert pack_bits(torch.tensor([1, 2, 3], dtype=U8), 3).tolist() == [209, 0]
    # 5-bit codes 31, 1: 31 | 1 << 5 = 63
    assert pack_bits(torch.tensor([31, 1], dtype=U8), 5).tolist() == [63, 0]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 17, 1001])
def test_round_trip(bits: int, n: int) -> None:
    codes = torch.randint(0, 2**bits, (n,), dtype=U8)
    packed = pack_bits(codes, bits)
    assert packed.shape == ((n * bits + 7) // 8,)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_multidimensional_codes_flatten_in_order() -> None:
    codes = torch.randint(0, 16, (3, 5, 7), dtype=U8)
    out = unpack_bits(pack_bits(codes, 4), 4, codes.numel())
    assert torch.equal(out.reshape(3, 5, 7), codes)


def test_bad_inputs() -> None:
    with pytest.raises(DataError):
        pack_bits(torch.tensor([16], dtype=U8), 4)
    with pytest.raises(DataError):
        pack_bits(torch.tensor([1, 2]), 4)  # int64, not uint8
    with pytest.raises(DataError):
        pack_bits(torch.tensor([1], dtype=U8), 9)
    with pytest.raises(DataError):
        pack_bits(torch.tensor([1], dtype=U8), 0)
    with pytest.raises(DataError):
        unpack_bits(torch.tensor([1], dtype=U8), 4, 3)  # 3 nibbles need 2 bytes


def test_signed_codes_offset() -> None:
    qmin, qmax = int_bounds(4, True)
    q = torch.arange(qmin, qmax + 1, dtype=torch.float32)
    u = codes_to_unsigned(q, qmin)
    assert u.dtype == U8 and u.tolist() == list(range(15))
    assert torch.equal(unsigned_to_codes(u, qmin), q)
    restored = unsigned_to_codes(unpack_bits(pack_bits(u, 4), 4, u.numel()), qmin)
    assert torch.equal(restored, q)
    assert codes_to_unsigned(torch.tensor([-127, 127]), -127).tolist() == [0, 254]
    with pytest.raises(DataError):
        codes_to_unsigned(torch.tensor([-8.0]), qmin)
