"""SVDQuant's low-rank branch: exact split, outlier absorption, the conv/linear branches, and its cost."""

import pytest
import torch
import torch.nn.functional as F

from qdiffuse.errors import ConfigError
from qdiffuse.formats.lowrank import (
    lowrank_apply_conv2d,
    lowrank_apply_linear,
    lowrank_bytes,
    lowrank_macs,
    lowrank_split,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _rtn4_per_channel(w: torch.Tensor) -> torch.Tensor:
    """Symmetric 4-bit round-to-nearest, one scale per output row (scale = max|row| / 7)."""
    flat = w.reshape(w.shape[0], -1)
    scale = flat.abs().amax(dim=1, keepdim=True) / 7
    return (torch.clamp(torch.round(flat / scale), -7, 7) * scale).reshape(w.shape)


def _outlier_weight() -> torch.Tensor:
    w = torch.randn(64, 256)
    w[:, [3, 70, 141, 200]] *= 50
    return w


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (16, 8, 3, 3), (32, 4, 1, 1), (8, 16, 5, 5)])
def test_split_reconstructs_exactly(shape: tuple[int, ...]) -> None:
    w = torch.randn(shape)
    rank = min(6, shape[0], w[0].numel())
    l1, l2, r = lowrank_split(w, 6)
    assert l1.shape == (shape[0], rank) and l2.shape == (rank, w[0].numel()) and r.shape == w.shape
    assert l1.dtype == l2.dtype == r.dtype == torch.float32
    assert _rel(l1 @ l2 + r.reshape(shape[0], -1), w.reshape(shape[0], -1)) < 1e-5


def test_residual_norm_is_tail_singular_values() -> None:
    w = torch.randn(40, 72)
    s = torch.linalg.svdvals(w.double())
    for rank in (1, 5, 20):
        _, _, r = lowrank_split(w, rank)
        assert float(r.double().norm()) == pytest.approx(float(s[rank:].norm()), rel=1e-5)


def test_factors_share_singular_values_symmetrically() -> None:
    w = torch.randn(30, 50)
    l1, l2, _ = lowrank_split(w, 4)
    torch.testing.assert_close(l1.norm(dim=0), l2.norm(dim=1), rtol=1e-5, atol=0)


def test_rank_absorbs_outlier_columns() -> None:
    w = _outlier_weight()
    _, _, r = lowrank_split(w, 8)
    range_ratio = float(r.abs().max() / w.abs().max())
    err_w = float((_rtn4_per_channel(w) - w).norm())
    err_r = float((_rtn4_per_channel(r) - r).norm())
    assert range_ratio < 0.1
    assert err_r < 0.25 * err_w


def test_conv_branch_plus_residual_equals_conv() -> None:
    w = torch.randn(16, 8, 3, 3)
    x = torch.randn(2, 8, 13, 11)
    l1, l2, r = lowrank_split(w, 5)
    for stride, padding, dilation in [(1, 1, 1), (2, 1, 1), ((2, 1), (0, 2), (2, 1))]:
        ref = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
        out = lowrank_apply_conv2d(x, l1, l2, 3, stride, padding, dilation) + F.conv2d(
            x, r, stride=stride, padding=padding, dilation=dilation
        )
        assert out.shape == ref.shape
        assert _rel(out, ref) < 1e-5


def test_conv_branch_rejects_groups() -> None:
    l1, l2, _ = lowrank_split(torch.randn(8, 4, 3, 3), 2)
    with pytest.raises(ValueError, match="groups"):
        lowrank_apply_conv2d(torch.randn(1, 8, 5, 5), l1, l2, 3, 1, 1, 1, groups=2)


def test_linear_branch_plus_residual_equals_linear() -> None:
    w, b = torch.randn(24, 40), torch.randn(24)
    x = torch.randn(3, 7, 40)
    l1, l2, r = lowrank_split(w, 6)
    out = lowrank_apply_linear(x, l1, l2) + F.linear(x, r, b)
    assert out.shape == (3, 7, 24)
    assert _rel(out, F.linear(x, w, b)) < 1e-5


def test_rank_is_clipped_and_full_rank_leaves_no_residual() -> None:
    w = torch.randn(6, 20)
    l1, l2, r = lowrank_split(w, 100)
    assert l1.shape == (6, 6) and l2.shape == (6, 20)
    assert float(r.abs().max()) < 1e-5


def test_rank_zero_is_identity() -> None:
    w = torch.randn(8, 4, 3, 3)
    l1, l2, r = lowrank_split(w, 0)
    assert l1.shape == (8, 0) and l2.shape == (0, 36)
    assert torch.equal(r, w)
    x = torch.randn(1, 4, 6, 6)
    assert torch.equal(lowrank_apply_conv2d(x, l1, l2, 3, 1, 1, 1), torch.zeros(1, 8, 6, 6))
    assert lowrank_apply_conv2d(x, l1, l2, 3, 2, 0, 1).shape == F.conv2d(x, w, stride=2).shape
    assert lowrank_apply_conv2d(x, l1, l2, 3, 1, "same", 1).shape == (1, 8, 6, 6)
    assert torch.equal(lowrank_apply_linear(torch.randn(5, 36), l1, l2), torch.zeros(5, 8))


def test_dtype_follows_weight() -> None:
    w = torch.randn(8, 12, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in lowrank_split(w, 3))
    assert all(t.dtype == torch.bfloat16 for t in lowrank_split(w.bfloat16(), 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_raises(bad: float) -> None:
    w = torch.randn(4, 4)
    w[1, 2] = bad
    with pytest.raises(ConfigError, match="NaN or inf") as info:
        lowrank_split(w, 2)
    assert "\n" not in str(info.value)


def test_negative_rank_raises() -> None:
    with pytest.raises(ConfigError, match="rank must be >= 0") as info:
        lowrank_split(torch.randn(4, 4), -1)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        lowrank_bytes(4, 4, -1)
    with pytest.raises(ConfigError):
        lowrank_macs(4, 4, -1, 10)


def test_bytes_and_macs() -> None:
    # 1280x1280 linear, rank 32, fp16: 32 * 2560 values * 2 bytes.
    assert lowrank_bytes(1280, 1280, 32) == 163_840
    # conv 320 -> 640, 3x3: K = 2880; 16 * (640 + 2880) = 56_320 values, at 8 bits one byte each.
    assert lowrank_bytes(640, 2880, 16, bits=8) == 56_320
    assert lowrank_bytes(3, 4, 1, bits=4) == 4  # 7 values * 4 bits = 3.5 bytes, rounded up
    assert lowrank_bytes(100, 100, 0) == 0
    # 64x64 feature map, batch 2: 8192 positions * 16 * 3520.
    assert lowrank_macs(640, 2880, 16, 2 * 64 * 64) == 461_373_440
    assert lowrank_macs(10, 20, 3, 7) == 630
    with pytest.raises(ConfigError, match="bits must be positive"):
        lowrank_bytes(4, 4, 1, bits=0)
