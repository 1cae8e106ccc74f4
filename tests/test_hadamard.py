"""Hadamard rotation: orthonormal matrices, the fast transform against matmul, exactness and outlier spreading."""

import pytest
import torch
import torch.nn.functional as F

from qdiffuse.errors import ConfigError
from qdiffuse.formats.hadamard import hadamard_matrix, hadamard_transform, rotate_weight, rotation_block


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(("n", "block"), [(8, 8), (64, 64), (96, 32), (384, 128), (320, 64), (2, 2)])
def test_matrix_is_orthonormal_and_symmetric(n: int, block: int) -> None:
    assert rotation_block(n) == block
    h = hadamard_matrix(n, dtype=torch.float64)
    assert h.shape == (n, n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(h, h.T)
    # Inside a block every entry is ±1/sqrt(b); outside the diagonal blocks everything is zero.
    blocks = h.reshape(n // block, block, n // block, block)
    for i in range(n // block):
        torch.testing.assert_close(
            blocks[i, :, i].abs(), torch.full((block, block), block**-0.5, dtype=torch.float64), rtol=0, atol=1e-15
        )
    assert int((h != 0).sum()) == n * block


def test_matrix_dtype_and_device() -> None:
    h = hadamard_matrix(16, dtype=torch.bfloat16, device="cpu")
    assert h.dtype == torch.bfloat16 and h.device.type == "cpu"


@pytest.mark.parametrize(("shape", "n"), [((5, 64), 64), ((2, 3, 96), 96), ((7, 384), 384), ((4, 320), 320)])
def test_fast_transform_equals_matmul(shape: tuple[int, ...], n: int) -> None:
    x = torch.randn(shape)
    torch.testing.assert_close(hadamard_transform(x, rotation_block(n)), x @ hadamard_matrix(n), rtol=1e-5, atol=1e-5)


def test_smaller_block_is_block_diagonal_rotation() -> None:
    x = torch.randn(3, 64)
    ref = x @ torch.kron(torch.eye(4), hadamard_matrix(16))
    torch.testing.assert_close(hadamard_transform(x, 16), ref, rtol=1e-5, atol=1e-5)


def test_transform_is_its_own_inverse_and_keeps_dtype() -> None:
    x = torch.randn(4, 96)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x, 32), 32), x, rtol=1e-5, atol=1e-5)
    assert hadamard_transform(x.half(), 32).dtype == torch.float16


def test_transform_passes_gradients() -> None:
    x = torch.randn(2, 32, requires_grad=True)
    hadamard_transform(x, 32).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(2, 32) @ hadamard_matrix(32))


@pytest.mark.parametrize("n", [64, 96, 384])
def test_rotated_linear_is_exact(n: int) -> None:
    w, b = torch.randn(48, n), torch.randn(48)
    x = torch.randn(10, n)
    block = rotation_block(n)
    out = F.linear(hadamard_transform(x, block), rotate_weight(w, block), b)
    assert _rel(out, F.linear(x, w, b)) < 1e-5


def test_rotation_spreads_outlier_channel() -> None:
    x = torch.randn(64, 256)
    x[:, 17] *= 1000
    before = float(x.abs().max() / x.abs().median())
    after_x = hadamard_transform(x, 256)
    after = float(after_x.abs().max() / after_x.abs().median())
    assert before >= 10 * after
    # Per token the outlier's energy is now spread evenly: every channel's magnitude is close to |x17| / 16.
    row_ratio = after_x.abs().amax(dim=1) / after_x.abs().median(dim=1).values
    assert float(row_ratio.max()) < 2


def test_odd_dimension_raises_one_line_error() -> None:
    assert rotation_block(77) == 1
    with pytest.raises(ConfigError, match="cannot rotate a dimension of odd size 77") as info:
        hadamard_matrix(77)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="power of two") as info:
        hadamard_transform(torch.randn(2, 77), 1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("block", [0, 3, 12, 128])
def test_bad_block_raises(block: int) -> None:
    with pytest.raises(ConfigError, match="rotation_block"):
        hadamard_transform(torch.randn(2, 96), block)


def test_rotate_weight_needs_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        rotate_weight(torch.randn(8, 4, 3, 3), 4)


def test_transform_along_another_dimension_is_the_last_dimension_moved() -> None:
    x = torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(1))
    along_channels = hadamard_transform(x, 8, dim=1)
    assert torch.equal(along_channels, hadamard_transform(x.movedim(1, -1), 8).movedim(-1, 1))
