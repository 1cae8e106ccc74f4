"""GPTQ rounding: lower layer-output error than round-to-nearest, codes exactly on the quantizer's grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdiffuse.calibration.gptq import HessianAccumulator, gptq_round
from qdiffuse.formats import int_bounds, int_qparams
from qdiffuse.formats.integer import quantize_int
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.nn.layers import QuantConv2d, QuantLinear
from qdiffuse.nn.quantizer import WeightQuantizer


def _rtn(w: Tensor, scale: Tensor, zp: Tensor | None, qmin: int, qmax: int) -> Tensor:
    z = torch.zeros_like(scale) if zp is None else zp
    return quantize_int(w, scale, z, qmin, qmax).sub_(z).mul_(scale)


def _sym_scale(w: Tensor, qmax: int = 7) -> Tensor:
    """Per-output-channel symmetric scale, shaped like WeightQuantizer's ([out, 1] or [out, 1, 1, 1])."""
    dims = tuple(range(1, w.dim()))
    return (w.abs().amax(dim=dims, keepdim=True) / qmax).clamp_min(1e-8)


def _correlated(rows: int, features: int) -> Tensor:
    z = torch.randn(rows, features)
    mix = torch.randn(features, features)
    return z @ mix


def _assert_on_grid(wq: Tensor, scale: Tensor, zp: Tensor | None, qmin: int, qmax: int) -> None:
    codes = wq / scale + (0 if zp is None else zp)
    assert torch.allclose(codes, codes.round(), atol=1e-4), "values are off the integer grid"
    assert codes.round().min() >= qmin and codes.round().max() <= qmax


def _linear_case() -> tuple[Tensor, Tensor, Tensor]:
    x = _correlated(512, 64)
    layer = nn.Linear(64, 32, bias=False)
    acc = HessianAccumulator(layer)
    acc.add(x)
    return x, layer.weight.detach().clone(), acc.hessian


@pytest.mark.parametrize("act_order", [False, True])
def test_linear_gptq_beats_rtn(act_order: bool) -> None:
    x, w, h = _linear_case()
    scale = _sym_scale(w)
    rtn = _rtn(w, scale, None, -7, 7)
    gq = gptq_round(w, h, scale, None, -7, 7, block_size=16, act_order=act_order)
    assert gq.shape == w.shape and gq.dtype == w.dtype
    _assert_on_grid(gq, scale, None, -7, 7)
    err_rtn = (x @ w.T - x @ rtn.T).pow(2).sum()
    err_gptq = (x @ w.T - x @ gq.T).pow(2).sum()
    ratio = (err_gptq / err_rtn).item()
    print(f"linear act_order={act_order}: GPTQ/RTN output error {ratio:.3f}")
    assert ratio <= 0.8


def test_block_size_does_not_change_the_result() -> None:
    """Lazy batch updates are a reordering of the same arithmetic, not an approximation."""
    _, w, h = _linear_case()
    scale = _sym_scale(w)
    a = gptq_round(w, h, scale, None, -7, 7, block_size=1)
    b = gptq_round(w, h, scale, None, -7, 7, block_size=128)
    # Float reassociation may flip a weight sitting on a rounding boundary; nearly all must agree.
    assert (a == b).float().mean() > 0.99


def _smooth_images(n: int, channels: int, size: int) -> Tensor:
    """Spatially and channel-correlated inputs, like a conv's feature maps."""
    z = torch.randn(n, channels, size, size)
    z = F.avg_pool2d(z, 3, stride=1, padding=1)
    mix = torch.randn(channels, channels)
    return torch.einsum("dc,nchw->ndhw", mix, z)


def test_conv_gptq_beats_rtn_and_hessian_matches_unfold() -> None:
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    batches = [_smooth_images(4, 8, 12) for _ in range(3)]
    acc = HessianAccumulator(conv)
    for b in batches:
        acc.add(b)
    x = torch.cat(batches)
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 8 * 9).double()
    direct = (2.0 / cols.shape[0]) * cols.T @ cols
    assert acc.count == cols.shape[0]
    assert acc.hessian.dtype == torch.float32 and acc.hessian.shape == (72, 72)
    assert torch.allclose(acc.hessian.double(), direct, rtol=1e-5, atol=1e-5)

    w = conv.weight.detach().clone()
    scale = _sym_scale(w)
    rtn = _rtn(w, scale, None, -7, 7)
    gq = gptq_round(w, acc.hessian, scale, None, -7, 7)
    _assert_on_grid(gq, scale, None, -7, 7)
    ref = F.conv2d(x, w, padding=1)
    err_rtn = (ref - F.conv2d(x, rtn, padding=1)).pow(2).sum()
    err_gptq = (ref - F.conv2d(x, gq, padding=1)).pow(2).sum()
    ratio = (err_gptq / err_rtn).item()
    print(f"conv: GPTQ/RTN output error {ratio:.3f}")
    assert ratio <= 0.8


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "stride": 2, "padding": 1},
        {"kernel_size": 3, "dilation": 2, "padding": 2},
        {"kernel_size": (3, 1), "padding": "same"},
        {"kernel_size": 4, "padding": "same"},
        {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    ],
)
def test_conv_hessian_is_the_output_error_quadratic(kwargs: dict) -> None:
    """‖conv(x, ΔW)‖² = n/2 · vec(ΔW)ᵀ H vec(ΔW) per row: the columns follow weight.reshape(out, -1)."""
    conv = nn.Conv2d(3, 5, bias=False, **kwargs)
    x = torch.randn(2, 3, 9, 9)
    acc = HessianAccumulator(conv)
    acc.add(x)
    delta = torch.randn_like(conv.weight)
    with torch.no_grad():
        conv.weight.copy_(delta)
        energy = conv(x).double().pow(2).sum()
    d = delta.reshape(5, -1).double()
    quad = 0.5 * acc.count * torch.einsum("ok,kl,ol->", d, acc.hessian.double(), d)
    assert torch.allclose(energy, quad, rtol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_values_are_on_the_grid_and_encode_to_the_same_weight(symmetric: bool) -> None:
    x, w, h = _linear_case()
    w = w + 0.05  # off-centre rows, so the asymmetric zero points are not all mid-grid
    spec = FormatSpec(kind="int", bits=4, symmetric=symmetric, granularity="channel")
    qmin, qmax = int_bounds(4, symmetric)
    assert (qmin, qmax) == ((-7, 7) if symmetric else (0, 15))
    if symmetric:
        scale, zp = _sym_scale(w), None
    else:
        scale, zp = int_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), 4, symmetric=False)
        assert not torch.all(zp == zp.flatten()[0])
    gq = gptq_round(w, h, scale, zp, qmin, qmax)
    _assert_on_grid(gq, scale, zp, qmin, qmax)
    quantizer = WeightQuantizer(spec)
    quantizer.scale, quantizer.zero_point = scale, zp
    assert torch.equal(quantizer.decode(quantizer.encode(gq), gq.shape), gq)
    assert torch.equal(quantizer(gq), gq)


def test_zero_hessian_is_round_to_nearest() -> None:
    w = torch.randn(6, 4, 3, 3)
    scale, zp = int_qparams(w.amin((1, 2, 3), keepdim=True), w.amax((1, 2, 3), keepdim=True), 4, symmetric=False)
    h = torch.zeros(36, 36)
    for act_order in (False, True):
        gq = gptq_round(w, h, scale, zp, 0, 15, block_size=8, act_order=act_order)
        assert torch.equal(gq, _rtn(w, scale, zp, 0, 15))


def test_dead_input_is_rounded_to_nearest_and_decoupled() -> None:
    x, w, _ = _linear_case()
    x[:, 5] = 0.0
    acc = HessianAccumulator(nn.Linear(64, 32))
    acc.add(x)
    scale = _sym_scale(w)
    gq = gptq_round(w, acc.hessian, scale, None, -7, 7)
    assert torch.equal(gq[:, 5], _rtn(w, scale, None, -7, 7)[:, 5])
    assert not torch.equal(gq, _rtn(w, scale, None, -7, 7))


def test_quantized_drop_ins_give_the_float_layers_hessian() -> None:
    spec = FormatSpec(kind="int", bits=4, granularity="channel")
    conv, lin = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(6, 2)
    x, y = torch.randn(2, 3, 5, 5), torch.randn(4, 6)
    for layer, quant, inp in ((conv, QuantConv2d(conv, spec, None), x), (lin, QuantLinear(lin, spec, None), y)):
        a, b = HessianAccumulator(layer), HessianAccumulator(quant)
        a.add(inp)
        b.add(inp)
        assert torch.equal(a.hessian, b.hessian)


def test_two_halves_give_the_same_hessian() -> None:
    x = torch.randn(2, 7, 24)
    one = HessianAccumulator(nn.Linear(24, 3))
    one.add(x)
    halves = HessianAccumulator(nn.Linear(24, 3))
    halves.add(x[:1])
    halves.add(x[1:])
    assert one.count == halves.count == 14
    assert torch.allclose(one.hessian, halves.hessian, rtol=1e-6, atol=1e-7)


def test_per_element_scale_matches_per_channel() -> None:
    _, w, h = _linear_case()
    scale = _sym_scale(w)
    a = gptq_round(w, h, scale, None, -7, 7)
    b = gptq_round(w, h, scale.expand_as(w).clone(), None, -7, 7)
    assert torch.equal(a, b)


def test_unsupported_inputs_raise() -> None:
    with pytest.raises(ValueError, match="groups"):
        HessianAccumulator(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="features"):
        HessianAccumulator(nn.Linear(4, 2)).add(torch.randn(3, 5))
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="Hessian"):
        gptq_round(w, torch.eye(5), torch.ones(3, 1), None, -7, 7)
    with pytest.raises(ValueError, match="scale"):
        gptq_round(w, torch.eye(4), torch.ones(2, 1), None, -7, 7)
