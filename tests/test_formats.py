"""Number formats against hand-computed values: integer grids, FP8, e2m1, NVFP4, MXFP4, STE gradients."""

import pytest
import torch

from qdiffuse.errors import ConfigError, DataError
from qdiffuse.formats import (
    E2M1_VALUES,
    FormatSpec,
    check_finite,
    dequantize_fp8,
    dequantize_int,
    e2m1_decode,
    e2m1_encode,
    fake_quant_fp8,
    fake_quant_int,
    fake_quant_mxfp4,
    fake_quant_nvfp4,
    fake_quantize,
    fp8_scale,
    group_view,
    int_bounds,
    int_qparams,
    mxfp4_dequantize,
    mxfp4_quantize,
    nvfp4_dequantize,
    nvfp4_global_scale,
    nvfp4_quantize,
    quantize_fp8,
    quantize_int,
    round_e2m1,
    round_ste,
    ungroup_view,
)

T = torch.tensor

# ------------------------------------------------------------------------------------------------ STE


def test_round_ste_rounds_half_to_even_with_identity_gradient() -> None:
    x = T([-1.5, -0.5, 0.4, 0.5, 1.5, 2.5, 2.6], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [-2.0, -0.0, 0.0, 0.0, 2.0, 2.0, 3.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0] * 7


# ------------------------------------------------------------------------------------------------ int


def test_int_bounds() -> None:
    assert int_bounds(8, True) == (-127, 127)
    assert int_bounds(4, True) == (-7, 7)
    assert int_bounds(2, True) == (-1, 1)
    assert int_bounds(8, False) == (0, 255)
    assert int_bounds(4, False) == (0, 15)
    assert int_bounds(8, True, unsigned=True) == (0, 255)
    with pytest.raises(ConfigError):
        int_bounds(0, True)


def test_int4_symmetric_hand_example() -> None:
    x = T([-1.0, -0.3, 0.0, 0.2, 0.7, 1.5])
    scale, zp = int_qparams(T(-1.0), T(0.7), bits=4, symmetric=True)
    assert scale.item() == pytest.approx(1 / 7)
    assert zp.item() == 0.0
    q = quantize_int(x, scale, zp, -7, 7)
    # x * 7 = [-7, -2.1, 0, 1.4, 4.9, 10.5] -> round -> [-7, -2, 0, 1, 5, 10] -> clamp 7
    assert q.tolist() == [-7.0, -2.0, 0.0, 1.0, 5.0, 7.0]
    expected = T([-1.0, -2 / 7, 0.0, 1 / 7, 5 / 7, 1.0])
    torch.testing.assert_close(dequantize_int(q, scale, zp), expected)
    torch.testing.assert_close(fake_quant_int(x, scale, zp, -7, 7), expected)


def test_int_asymmetric_uint8_zero_point_example() -> None:
    # range [-1, 3] on 0..255: scale 4/255, zero point round(0 - (-1) / (4/255)) = round(63.75) = 64
    scale, zp = int_qparams(T(-1.0), T(3.0), bits=8, symmetric=False)
    assert scale.item() == pytest.approx(4 / 255)
    assert zp.item() == 64.0
    x = T([-1.0, 0.0, 1.0, 3.0, 5.0, -2.0])
    q = quantize_int(x, scale, zp, 0, 255)
    # 1.0 -> round(63.75) + 64 = 128; 3.0 -> round(191.25) + 64 = 255; out of range clamps
    assert q.tolist() == [0.0, 64.0, 128.0, 255.0, 255.0, 0.0]
    deq = dequantize_int(q, scale, zp)
    torch.testing.assert_close(deq, T([-256, 0, 256, 764, 764, -256]) / 255)
    assert deq[1].item() == 0.0  # zero is exact


def test_int_qparams_widen_to_zero_and_unsigned() -> None:
    scale, zp = int_qparams(T(1.0), T(2.0), bits=8, symmetric=False)  # widened to [0, 2]
    assert scale.item() == pytest.approx(2 / 255) and zp.item() == 0.0
    scale, zp = int_qparams(T(0.2), T(0.7), bits=4, symmetric=True)  # widened to [0, 0.7]
    assert scale.item() == pytest.approx(0.1)
    scale, zp = int_qparams(T(-0.5), T(2.55), bits=8, symmetric=True, unsigned=True)
    assert scale.item() == pytest.approx(0.01) and zp.item() == 0.0
    q = quantize_int(T([-0.5, 0.0, 1.234, 3.0]), scale, zp, 0, 255)
    assert q.tolist() == [0.0, 0.0, 123.0, 255.0]


def test_int_qparams_per_channel_shapes() -> None:
    xmin = T([-1.0, -2.0, 0.0]).reshape(3, 1, 1)
    xmax = T([1.0, 0.5, 0.0]).reshape(3, 1, 1)
    scale, zp = int_qparams(xmin, xmax, bits=8, symmetric=True)
    assert scale.shape == (3, 1, 1) and zp.shape == (3, 1, 1)
    torch.testing.assert_close(scale.flatten()[:2], T([1 / 127, 2 / 127]))
    assert scale.flatten()[2].item() > 0


@pytest.mark.parametrize("symmetric,unsigned", [(True, False), (False, False), (False, True)])
def test_int_all_zero_tensor_is_exact(symmetric: bool, unsigned: bool) -> None:
    scale, zp = int_qparams(T(0.0), T(0.0), bits=4, symmetric=symmetric, unsigned=unsigned)
    assert scale.item() > 0
    qmin, qmax = int_bounds(4, symmetric, unsigned)
    out = fake_quant_int(torch.zeros(10), scale, zp, qmin, qmax)
    assert torch.equal(out, torch.zeros(10))


def test_int_constant_tensor() -> None:
    x = torch.full((7,), 0.5)
    scale, zp = int_qparams(x.min(), x.max(), bits=8, symmetric=True)
    torch.testing.assert_close(fake_quant_int(x, scale, zp, -127, 127), x)


def test_int_ste_gradients_inside_and_outside_range() -> None:
    x = T([-2.0, -0.5, 0.3, 0.9, 2.0], requires_grad=True)
    scale = torch.full((5,), 0.25, requires_grad=True)  # int4: clip at +-1.75
    fake_quant_int(x, scale, 0.0, -7, 7).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # LSQ: round(x/s) - x/s inside, the clip level outside
    torch.testing.assert_close(scale.grad, T([-7.0, 0.0, -0.2, 0.4, 7.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_fake_quant_int_matches_quantize_dequantize(dtype: torch.dtype) -> None:
    x = (torch.randn(64) * 3).to(dtype)
    scale, zp = int_qparams(x.min(), x.max(), bits=4, symmetric=False)
    ref = dequantize_int(quantize_int(x, scale, zp, 0, 15), scale, zp).to(dtype)
    out = fake_quant_int(x, scale, zp, 0, 15)
    assert out.dtype == dtype
    assert torch.equal(out, ref)


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_int_inference_path_equals_the_differentiable_one(symmetric: bool) -> None:
    """Sampling takes an in-place path when no gradient is needed; it must give the STE path's exact values."""
    torch.manual_seed(0)
    x = torch.randn(8, 5, 6, 6) * torch.rand(8, 1, 1, 1) * 10
    original = x.clone()
    qmin, qmax = int_bounds(4, symmetric)
    amin, amax = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    for scale, zp in (int_qparams(x.min(), x.max(), 4, symmetric), int_qparams(amin, amax, 4, symmetric)):
        with torch.no_grad():
            fast = fake_quant_int(x, scale, zp, qmin, qmax)
        slow = fake_quant_int(x.clone().requires_grad_(True), scale, zp, qmin, qmax)
        assert torch.equal(fast, slow.detach())
    assert torch.equal(x, original)  # the in-place path works on its own copy


# ------------------------------------------------------------------------------------------------ fp8


def test_fp8_e4m3_known_values() -> None:
    one = T(1.0)
    x = T([448.0, 1000.0, -1000.0, 0.1, 2.0**-9, 0.003, 2.0**-10, 3 * 2.0**-11, 0.0])
    q = quantize_fp8(x, one, "fp8_e4m3")
    assert q.dtype == torch.float8_e4m3fn
    expected = [448.0, 448.0, -448.0, 0.1015625, 2.0**-9, 0.00390625, 0.0, 2.0**-9, 0.0]
    assert dequantize_fp8(q, one).tolist() == expected
    assert fake_quant_fp8(x, one, "fp8_e4m3").tolist() == expected


def test_fp8_e5m2_known_values_and_saturation() -> None:
    one = T(1.0)
    x = T([57344.0, 1e6, -1e6, 0.1, 2.0**-16])
    q = quantize_fp8(x, one, "fp8_e5m2")
    assert q.dtype == torch.float8_e5m2
    # 0.1 = 1.6 * 2^-4; two mantissa bits -> 1.5 * 2^-4; 2^-16 is the smallest subnormal
    assert dequantize_fp8(q, one).tolist() == [57344.0, 57344.0, -57344.0, 0.09375, 2.0**-16]


def test_fp8_scale_and_scaled_values() -> None:
    scale = fp8_scale(T(896.0), "fp8_e4m3")
    assert scale.item() == 2.0
    assert fp8_scale(T(0.0), "fp8_e4m3").item() > 0
    x = T([0.2, 896.0, 2000.0])
    # 0.2 / 2 = 0.1 -> 0.1015625 -> * 2
    assert fake_quant_fp8(x, scale, "fp8_e4m3").tolist() == [0.203125, 896.0, 896.0]
    zero_scale = fp8_scale(T(0.0), "fp8_e4m3")
    assert torch.equal(fake_quant_fp8(torch.zeros(4), zero_scale, "fp8_e4m3"), torch.zeros(4))
    with pytest.raises(ConfigError):
        fp8_scale(T(1.0), "fp8_e3m4")


@pytest.mark.parametrize("kind", ["fp8_e4m3", "fp8_e5m2"])
def test_fake_quant_fp8_inference_path_equals_the_differentiable_one(kind: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5) * torch.logspace(-4, 3, 6).reshape(1, 6, 1, 1)
    original = x.clone()
    for scale in (fp8_scale(x.abs().amax(), kind), fp8_scale(x.abs().amax(dim=(0, 2, 3), keepdim=True), kind)):
        with torch.no_grad():
            fast = fake_quant_fp8(x, scale, kind)
        slow = fake_quant_fp8(x.clone().requires_grad_(True), scale, kind)
        assert torch.equal(fast, slow.detach())
    assert torch.equal(x, original)


def test_fp8_ste_gradient() -> None:
    x = T([0.1, 300.0, 500.0, -500.0], requires_grad=True)
    y = fake_quant_fp8(x, T(1.0), "fp8_e4m3")
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_fp8_keeps_dtype() -> None:
    x = torch.randn(8, dtype=torch.bfloat16)
    assert fake_quant_fp8(x, T(0.01), "fp8_e5m2").dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ e2m1


def test_e2m1_rounding_table_with_ties() -> None:
    x = T([0.0, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 2.9, 3.5, 5.0, 5.1, 6.0, 7.0, 100.0])
    expected = [0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 6.0, 6.0, 6.0, 6.0]
    assert round_e2m1(x).tolist() == expected
    assert round_e2m1(-x).tolist() == [-v for v in expected]


def test_e2m1_grid_is_fixed_point() -> None:
    grid = T(E2M1_VALUES)
    assert torch.equal(round_e2m1(grid), grid)
    assert torch.equal(round_e2m1(-grid), -grid)


def test_e2m1_ste_gradient() -> None:
    x = T([0.3, 5.9, -2.2, 7.0, -7.0], requires_grad=True)
    round_e2m1(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_e2m1_codes() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1_decode(codes)
    assert values.dtype == torch.float32
    assert values.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert e2m1_encode(T([0.0, 0.5, 1.5, 2.0, 6.0, -0.5, -6.0])).tolist() == [0, 1, 3, 4, 7, 9, 15]
    keep = codes != 8  # -0 encodes as +0
    assert torch.equal(e2m1_encode(values)[keep], codes[keep])
    with pytest.raises(DataError):
        e2m1_encode(T([0.7]))


# ------------------------------------------------------------------------------------------------ NVFP4


def test_nvfp4_exact_block_with_amax_6() -> None:
    block = T([6, -4, 3, -2, 1.5, 1, 0.5, 0, -0.5, -1, 2, -3, 4, -6, 0, 1])
    x = block.reshape(1, 16)
    codes, scales = nvfp4_quantize(x, T(1.0))
    assert codes.shape == (1, 16) and codes.dtype == torch.uint8
    assert scales.shape == (1, 1) and scales.dtype == torch.float8_e4m3fn
    assert scales.float().item() == 1.0  # 6 / 6 / 1
    assert torch.equal(codes, e2m1_encode(x))
    assert torch.equal(nvfp4_dequantize(codes, scales, T(1.0)), x)
    assert torch.equal(fake_quant_nvfp4(x, T(1.0)), x)
    # with the default (data) global scale the reconstruction is exact up to fp32 rounding
    torch.testing.assert_close(fake_quant_nvfp4(x), x)


def test_nvfp4_block_scale_rounds_to_e4m3() -> None:
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1] = 5.0, 1.0
    codes, scales = nvfp4_quantize(x, T(1.0))
    # 5 / 6 = 0.8333 -> e4m3 1.625 * 2^-1 = 0.8125; 5 / 0.8125 = 6.15 saturates to 6; 1 / 0.8125 = 1.23 -> 1
    assert scales.float().item() == 0.8125
    out = nvfp4_dequantize(codes, scales, T(1.0))
    assert out[0, :2].tolist() == [4.875, 0.8125]
    assert torch.equal(fake_quant_nvfp4(x, T(1.0)), out)


def test_nvfp4_global_scale_and_padding() -> None:
    assert nvfp4_global_scale(T(2688.0)).item() == 1.0
    x = torch.randn(3, 20) * 4
    g = nvfp4_global_scale(x.abs().amax())
    codes, scales = nvfp4_quantize(x, g)
    assert codes.shape == (3, 20) and scales.shape == (3, 2)
    out = nvfp4_dequantize(codes, scales, g)
    assert out.shape == (3, 20)
    assert torch.equal(out, fake_quant_nvfp4(x))
    assert torch.equal(nvfp4_dequantize(codes, scales, g, orig_last_dim=18), out[:, :18])
    assert (out - x).abs().max() <= x.abs().amax() / 6  # at worst half the largest grid step
    with pytest.raises(DataError):
        nvfp4_dequantize(codes, scales[:, :1], g)


def test_nvfp4_all_zero_blocks() -> None:
    x = torch.zeros(2, 32)
    x[1, 16:] = torch.linspace(-3, 3, 16)
    out = fake_quant_nvfp4(x)
    assert not out.isnan().any()
    assert torch.equal(out[0], torch.zeros(32)) and torch.equal(out[1, :16], torch.zeros(16))
    assert torch.equal(fake_quant_nvfp4(torch.zeros(4, 16)), torch.zeros(4, 16))
    codes, scales = nvfp4_quantize(torch.zeros(1, 16), nvfp4_global_scale(T(0.0)))
    assert torch.equal(nvfp4_dequantize(codes, scales, nvfp4_global_scale(T(0.0))), torch.zeros(1, 16))


def test_nvfp4_ste_gradient_and_dtype() -> None:
    x = (torch.rand(2, 16) * 2 - 1).requires_grad_()
    fake_quant_nvfp4(x, T(1 / 448)).sum().backward()
    assert torch.equal(x.grad, torch.ones(2, 16))
    assert fake_quant_nvfp4(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ MXFP4


def test_mxfp4_power_of_two_scale() -> None:
    x = torch.zeros(2, 32)
    x[0, :4] = T([5.0, 1.0, 0.3, -2.2])  # amax 5: floor(log2 5) - 2 = 0 -> scale 1
    x[1, :4] = T([0.75, 0.1, -0.3, 0.2])  # amax 0.75: floor(log2 0.75) - 2 = -3 -> scale 1/8
    codes, exps = mxfp4_quantize(x)
    assert exps.dtype == torch.uint8 and exps.tolist() == [[127], [124]]
    out = mxfp4_dequantize(codes, exps)
    assert out[0, :4].tolist() == [4.0, 1.0, 0.5, -2.0]
    # x * 8 = [6, 0.8, -2.4, 1.6] -> [6, 1, -2, 1.5] -> / 8
    assert out[1, :4].tolist() == [0.75, 0.125, -0.25, 0.1875]
    assert torch.equal(out, fake_quant_mxfp4(x))


def test_mxfp4_exact_grid_and_saturation() -> None:
    grid = T(E2M1_VALUES)
    x = torch.cat([grid, -grid, grid.flip(0), -grid.flip(0)]).reshape(1, 32) * 2.0**-5
    assert torch.equal(fake_quant_mxfp4(x), x)  # amax 6 * 2^-5 -> scale 2^-5, every value on the grid
    y = torch.zeros(1, 32)
    y[0, 0] = 7.5  # floor(log2 7.5) - 2 = 0: 7.5 saturates to 6
    assert fake_quant_mxfp4(y)[0, 0].item() == 6.0
    _, exps = mxfp4_quantize(T([[2.0**-130] + [0.0] * 31]))  # exponent clamps at -127
    assert exps.item() == 0


def test_mxfp4_zeros_padding_and_gradient() -> None:
    z = torch.zeros(3, 40)
    codes, exps = mxfp4_quantize(z)
    assert codes.shape == (3, 40) and exps.shape == (3, 2)
    assert torch.equal(mxfp4_dequantize(codes, exps), z)
    assert torch.equal(fake_quant_mxfp4(z), z)
    x = torch.randn(3, 40)
    codes, exps = mxfp4_quantize(x)
    assert torch.equal(mxfp4_dequantize(codes, exps), fake_quant_mxfp4(x))
    g = (torch.rand(1, 32) * 5.9).requires_grad_()  # amax in [4, 6): nothing saturates
    g.data[0, 0] = 5.9
    fake_quant_mxfp4(g).sum().backward()
    assert torch.equal(g.grad, torch.ones(1, 32))


# ------------------------------------------------------------------------------------ group view / dispatch


def test_group_view_pads_and_round_trips() -> None:
    x = torch.arange(1, 61, dtype=torch.float32).reshape(4, 3, 5)
    g = group_view(x, 4)
    assert g.shape == (4, 4, 4)
    assert g[0, 0].tolist() == [1, 2, 3, 4] and g[0, 3].tolist() == [13, 14, 15, 0]
    assert torch.equal(ungroup_view(g, x.shape), x)
    assert group_view(x, 5).shape == (4, 3, 5)
    with pytest.raises(ConfigError):
        group_view(x, 0)


def test_fake_quantize_dispatch() -> None:
    x = torch.randn(4, 3, 5)
    spec = FormatSpec(kind="int", bits=4, granularity="tensor")
    scale, zp = int_qparams(x.min(), x.max(), 4, True)
    assert torch.equal(fake_quantize(x, spec, scale, zp), fake_quant_int(x, scale, zp, -7, 7))
    assert torch.equal(fake_quantize(x, spec, scale), fake_quant_int(x, scale, 0.0, -7, 7))

    spec = FormatSpec(kind="int", bits=4, symmetric=False, granularity="channel")
    lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
    scale, zp = int_qparams(lo, hi, 4, False)
    assert torch.equal(fake_quantize(x, spec, scale, zp), fake_quant_int(x, scale, zp, 0, 15))

    spec = FormatSpec(kind="int", bits=4, granularity="group", group_size=4)
    gv = group_view(x, 4)
    scale, zp = int_qparams(gv.amin(-1, keepdim=True), gv.amax(-1, keepdim=True), 4, True)
    expected = ungroup_view(fake_quant_int(gv, scale, zp, -7, 7), x.shape)
    assert torch.equal(fake_quantize(x, spec, scale, zp), expected)

    spec = FormatSpec(kind="fp8_e4m3")
    assert torch.equal(fake_quantize(x, spec, T(0.01)), fake_quant_fp8(x, T(0.01), "fp8_e4m3"))
    assert torch.equal(fake_quantize(x, FormatSpec(kind="nvfp4")), fake_quant_nvfp4(x))
    assert torch.equal(fake_quantize(x, FormatSpec(kind="mxfp4")), fake_quant_mxfp4(x))
    with pytest.raises(ConfigError):
        fake_quantize(x, FormatSpec(kind="int"))


# ------------------------------------------------------------------------------------------------ checks


def test_check_finite() -> None:
    check_finite(torch.randn(5), "weight")
    check_finite(torch.arange(3), "codes")
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(DataError, match="weight contains NaN or inf"):
            check_finite(T([1.0, bad]), "weight")
