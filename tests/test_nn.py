"""Quantized layers, quantizers, the attention processor and the model rewrite on the tiny diffusers models."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from tiny_models import calibrate_layer, tiny_cond_unet, tiny_dit, tiny_unet
from torch import nn

from qdiffuse.api import quant_state, quantize
from qdiffuse.calibration.collect import CalibrationSet
from qdiffuse.config import QuantConfig
from qdiffuse.errors import ConfigError
from qdiffuse.formats import pack_bits, unpack_bits
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.nn.attention import QuantAttnProcessor, is_diffusers_attention
from qdiffuse.nn.layers import QuantConv2d, QuantLinear
from qdiffuse.nn.quantizer import ActivationQuantizer, WeightQuantizer
from qdiffuse.nn.rewrite import (
    activation_quantizers,
    quant_layers,
    quantize_model,
    set_quantization_enabled,
    shortcut_splits,
)
from qdiffuse.progress import set_progress_enabled

set_progress_enabled(False)

INT8_CH = FormatSpec(kind="int", bits=8, symmetric=True, granularity="channel")
INT8_ACT = FormatSpec(kind="int", bits=8, symmetric=False, granularity="tensor")
BUILDERS = {"unet": lambda: tiny_unet(4), "cond": tiny_cond_unet, "dit": tiny_dit}
META = {"unet": {"num_classes": 3, "null_class": 3}, "cond": None, "dit": None}


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter so zero-initialised layers (conv_out, adaLN) carry signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _model(kind: str) -> nn.Module:
    return _randomize(BUILDERS[kind]())


def _inputs(denoiser: Denoiser, n: int = 2) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, *denoiser.sample_shape, generator=gen)
    t = torch.tensor([999, 10, 500, 250][:n])
    labels = torch.arange(n) % 3 if denoiser.num_classes else None
    cond = torch.randn(n, 8, denoiser.cross_attention_dim, generator=gen) if denoiser.kind == "unet_cond" else None
    return x, t, labels, cond


def _out(denoiser: Denoiser, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return denoiser.forward_raw(*inputs)


def _calib(denoiser: Denoiser, n: int = 4) -> CalibrationSet:
    x, _, labels, cond = _inputs(denoiser, n)
    return CalibrationSet(x, torch.tensor([999, 600, 300, 20][:n]), labels, cond)


def _quantized(kind: str, scheme: str = "w8a8", **overrides: object) -> tuple[Denoiser, nn.Module]:
    """(quantized denoiser, FP copy) of a fresh tiny model, calibrated on 4 fixed inputs."""
    model = _model(kind)
    fp = copy.deepcopy(model)
    denoiser = Denoiser.from_model(model, META[kind])
    overrides = {"outliers": "off", "guard_db": 0, **overrides}  # the handling: tests/test_outliers.py
    config = QuantConfig.from_scheme(scheme, **overrides)
    quantize(denoiser, {}, config, calib=_calib(denoiser), runtime="simulated")
    return denoiser, fp


# ------------------------------------------------------------------------------- layers with quantization off


def test_quant_linear_equals_linear_when_disabled() -> None:
    linear = nn.Linear(24, 7)
    x = torch.randn(3, 5, 24)
    ref = linear(x)
    layer = QuantLinear(linear, INT8_CH, INT8_ACT, split_at=10)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    layer.quant_enabled = False
    assert torch.equal(layer(x), ref)
    layer.quant_enabled = True
    calibrate_layer(layer, x)
    assert not torch.equal(layer(x), ref)  # quantization does something ...
    layer.quant_enabled = False
    assert torch.equal(layer(x), ref)  # ... and nothing once switched off before hardening


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": 1},
        {"stride": 2, "padding": 2, "dilation": 2},
        {"padding": 1, "padding_mode": "reflect"},
        {"padding": 1, "groups": 2},
        {"bias": False},
    ],
)
def test_quant_conv_equals_conv_when_disabled(kwargs: dict) -> None:
    conv = nn.Conv2d(8, 6, 3, **kwargs)
    x = torch.randn(2, 8, 9, 9)
    ref = conv(x)
    layer = QuantConv2d(conv, INT8_CH, INT8_ACT, split_at=3)
    if conv.groups != 1:
        assert layer.splits == (conv.in_channels // conv.groups,)  # no split across groups
    layer.quant_enabled = False
    assert torch.equal(layer(x), ref)
    layer.quant_enabled = True
    calibrate_layer(layer, x)
    layer.quant_enabled = False
    assert torch.equal(layer(x), ref)


def test_per_channel_int8_weight_error_within_half_a_step() -> None:
    # channels with very different magnitudes: each must get its own step
    weight = torch.randn(16, 8, 3, 3) * torch.logspace(-3, 1, 16).view(16, 1, 1, 1)
    quantizer = WeightQuantizer(INT8_CH)
    quantizer.calibrate(weight)
    assert quantizer.scale.shape == (16, 1, 1, 1)
    expected = weight.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    torch.testing.assert_close(quantizer.scale, expected)
    error = (quantizer(weight) - weight).abs()
    assert bool((error <= quantizer.scale / 2 * (1 + 1e-5)).all())
    # every channel's largest value is on the grid
    assert torch.allclose(quantizer(weight).abs().amax(dim=(1, 2, 3)), weight.abs().amax(dim=(1, 2, 3)))


# ----------------------------------------------------------------------- hardening and the stored weight codes

INT_SPECS = [
    FormatSpec(kind="int", bits=bits, symmetric=sym, granularity=gran, group_size=16 if gran == "group" else 0)
    for bits in range(2, 9)
    for sym in (True, False)
    for gran in ("tensor", "channel", "group")
]
FLOAT_SPECS = [
    FormatSpec(kind=kind, granularity=gran) for kind in ("fp8_e4m3", "fp8_e5m2") for gran in ("tensor", "channel")
] + [FormatSpec(kind="nvfp4"), FormatSpec(kind="mxfp4")]
FP8_GROUP = pytest.param(
    FormatSpec(kind="fp8_e4m3", granularity="group", group_size=16),
    id="fp8_e4m3-g16",
)


@pytest.mark.parametrize("spec", INT_SPECS + FLOAT_SPECS + [FP8_GROUP], ids=lambda s: getattr(s, "describe", str)())
@pytest.mark.parametrize("layer_kind", ["conv", "linear"])
def test_harden_then_encode_decode_is_bit_exact(spec: FormatSpec, layer_kind: str) -> None:
    torch.manual_seed(3)
    if layer_kind == "conv":  # 12 * 3 * 3 = 108 inputs per row: not a multiple of any block size
        layer = QuantConv2d(nn.Conv2d(12, 8, 3), spec, None, split_at=5)
    else:
        layer = QuantLinear(nn.Linear(40, 6), spec, None, split_at=17)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-2, 1, layer.weight.shape[0]).view(-1, *[1] * (layer.weight.dim() - 1)))
    original = layer.weight.detach().clone()
    layer.calibrate_weight()
    expected = layer.quantized_weight().detach().clone()
    layer.harden()
    assert layer.weight_hardened
    assert torch.equal(layer.weight, expected)
    assert not torch.equal(layer.weight, original)
    assert len(layer.weight_quantizers) == 2
    for quantizer, part in zip(layer.weight_quantizers, layer.weight_parts(layer.weight), strict=True):
        codes = quantizer.encode(part)
        assert codes.dtype == torch.uint8
        assert tuple(codes.shape) == quantizer.code_shape(part.shape)
        assert int(codes.max()) < 2**spec.value_bits
        decoded = quantizer.decode(codes, part.shape)
        assert decoded.dtype == torch.float32
        assert torch.equal(decoded, part)
        if spec.value_bits < 8:  # what a saved folder stores: the packed codes
            packed = pack_bits(codes, spec.value_bits)
            unpacked = unpack_bits(packed, spec.value_bits, codes.numel()).reshape(codes.shape)
            assert torch.equal(quantizer.decode(unpacked, part.shape), part)
    # hardened weights are a fixed point of the quantizer: quantizing them again changes nothing
    assert torch.equal(layer.quantized_weight(), layer.weight)


# ---------------------------------------------------------------------------------------- shortcut splitting


def _record_up_block_concats(model: nn.Module) -> tuple[dict[str, tuple[int, int]], list]:
    """For each up-block resnet: (channels of its whole input, channels of the skip tensor concatenated last)."""
    seen: dict[str, tuple[int, int]] = {}
    handles = []

    def block_hook(skips: list[torch.Tensor]) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            skips[:] = list(res)

        return hook

    def resnet_hook(key: str, j: int, skips: list[torch.Tensor]) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            x, skip = args[0], skips[-(j + 1)]
            # diffusers concatenates [hidden | skip]: the trailing channels are exactly the skip tensor
            assert torch.equal(x[:, x.shape[1] - skip.shape[1] :], skip)
            seen[key] = (x.shape[1], skip.shape[1])

        return hook

    for i, block in enumerate(model.up_blocks):
        skips: list[torch.Tensor] = []
        handles.append(block.register_forward_pre_hook(block_hook(skips), with_kwargs=True))
        for j, resnet in enumerate(block.resnets):
            handles.append(resnet.register_forward_pre_hook(resnet_hook(f"up_blocks.{i}.resnets.{j}", j, skips)))
    return seen, handles


@pytest.mark.parametrize("kind", ["unet", "cond"])
def test_shortcut_splits_match_the_real_concatenations(kind: str) -> None:
    model = _model(kind)
    splits = shortcut_splits(model)
    seen, handles = _record_up_block_concats(model)
    denoiser = Denoiser.from_model(model, META[kind])
    _out(denoiser, _inputs(denoiser))
    for h in handles:
        h.remove()
    resnets_with_shortcut = {k for k in seen if isinstance(model.get_submodule(k).conv_shortcut, nn.Conv2d)}
    expected = {}
    for key, (total, skip) in seen.items():
        expected[f"{key}.conv1"] = total - skip
        if key in resnets_with_shortcut:
            expected[f"{key}.conv_shortcut"] = total - skip
    assert len(seen) == sum(len(b.resnets) for b in model.up_blocks) == 4
    assert splits == expected
    assert all(0 < hidden < model.get_submodule(name).in_channels for name, hidden in splits.items())


def test_no_shortcut_splits_outside_unet_up_blocks() -> None:
    assert shortcut_splits(_model("dit")) == {}
    assert shortcut_splits(nn.Sequential(nn.Conv2d(2, 2, 1))) == {}


def test_rewrite_applies_the_splits_and_no_split_disables_them() -> None:
    model = _model("unet")
    splits = shortcut_splits(model)
    plan = {p.name: p for p in quantize_model(model, QuantConfig.from_scheme("w8a8"))}
    for name, hidden in splits.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantConv2d)
        assert layer.splits == (hidden, layer.in_channels - hidden)
        assert len(layer.input_quantizers) == len(layer.weight_quantizers) == 2
        assert f"split[{hidden}, {layer.in_channels - hidden}]" in plan[name].label
    other = _model("unet")
    quantize_model(other, QuantConfig.from_scheme("w8a8", split_shortcuts=False))
    assert all(len(layer.splits) == 1 for _, layer in quant_layers(other))


def test_split_conv_gets_separate_input_ranges() -> None:
    conv = nn.Conv2d(8, 4, 1)
    gen = torch.Generator().manual_seed(0)
    deep = torch.randn(4, 4, 6, 6, generator=gen) * 20.0
    skip = torch.randn(4, 4, 6, 6, generator=gen) * 0.05
    x = torch.cat([deep, skip], dim=1)
    split = QuantConv2d(conv, INT8_CH, INT8_ACT, split_at=4)
    shared = QuantConv2d(copy.deepcopy(conv), INT8_CH, INT8_ACT)
    for layer in (split, shared):
        calibrate_layer(layer, x)
    q_deep, q_skip = split.input_quantizers
    assert float(q_deep.scale) > 100 * float(q_skip.scale)
    assert len(shared.input_quantizers) == 1
    # the skip half keeps its detail only with its own range
    err_split = (split.quantize_input(x)[:, 4:] - skip).abs().max()
    err_shared = (shared.quantize_input(x)[:, 4:] - skip).abs().max()
    assert err_split <= float(q_skip.scale)
    assert err_shared > 10 * err_split


# ---------------------------------------------------------------------------------------- attention processor


@pytest.mark.parametrize("kind", ["unet", "cond", "dit"])
def test_attention_processor_with_quantization_off_matches_diffusers(kind: str) -> None:
    model = _model(kind)
    denoiser = Denoiser.from_model(model, META[kind])
    inputs = _inputs(denoiser)
    attentions = [m for m in model.modules() if is_diffusers_attention(m)]
    assert attentions and all(isinstance(a.processor, AttnProcessor2_0) for a in attentions)
    ref = _out(denoiser, inputs)
    config = QuantConfig.from_scheme("w4a4")
    for attn in attentions:
        processor = QuantAttnProcessor(config.activation, config.softmax_spec())
        processor.quant_enabled = False
        attn.set_processor(processor)
    torch.testing.assert_close(_out(denoiser, inputs), ref, atol=1e-5, rtol=0)


def test_attention_processor_receives_temb() -> None:
    attn = Attention(query_dim=32, heads=2, dim_head=16, spatial_norm_dim=4).eval()
    gen = torch.Generator().manual_seed(0)
    hidden, temb = torch.randn(2, 32, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    with torch.no_grad():
        ref = attn(hidden, temb=temb)
        config = QuantConfig.from_scheme("w8a8")
        processor = QuantAttnProcessor(config.activation, config.softmax_spec())
        processor.quant_enabled = False
        attn.set_processor(processor)
        out = attn(hidden, temb=temb)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_softmax_quantizer_is_unsigned_with_zero_point_zero() -> None:
    denoiser, _ = _quantized("unet", "w4a4")
    processors = [m for m in denoiser.model.modules() if isinstance(m, QuantAttnProcessor)]
    assert len(processors) == 4
    for processor in processors:
        sq = processor.softmax_quantizer
        assert sq.spec.unsigned and sq.spec.kind == "int" and sq.spec.bits == 8
        assert sq.scale is not None and float(sq.scale) > 0 and float(sq.scale) <= 1 / 255 * (1 + 1e-6)
        assert torch.equal(sq.zero_point, torch.zeros_like(sq.zero_point))
        probs = torch.softmax(torch.randn(2, 2, 5, 7) * 3, dim=-1)
        out = sq(probs)
        assert bool((out >= 0).all())
        assert torch.equal(sq(torch.zeros(3)), torch.zeros(3))  # exact zeros stay zero
        assert torch.equal(sq(torch.full((2,), -0.5)), torch.zeros(2))  # no negative codes
        # Q, K, V use the (asymmetric 4-bit) activation format
        assert processor.q_quantizer.spec == processor.k_quantizer.spec == processor.v_quantizer.spec
        assert processor.q_quantizer.spec.bits == 4 and not processor.q_quantizer.spec.symmetric


# ---------------------------------------------------------------------------------------- the model rewrite


@pytest.mark.parametrize("kind", ["unet", "cond", "dit"])
@pytest.mark.parametrize("scheme", ["w4a4", "nvfp4"])
def test_quantize_keeps_the_model_class_and_runs(kind: str, scheme: str) -> None:
    model = _model(kind)
    cls = type(model)
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    n_attn = sum(is_diffusers_attention(m) for m in model.modules())
    denoiser = Denoiser.from_model(model, META[kind])
    fp_out = _out(denoiser, _inputs(denoiser))
    result = quantize(denoiser, {}, QuantConfig.from_scheme(scheme), calib=_calib(denoiser), runtime="simulated")
    assert result is model and type(result) is cls
    state = quant_state(result)
    assert state is not None and state.config.scheme == scheme
    assert sum(p.kind in ("QuantLinear", "QuantConv2d") for p in state.plan) == n_layers
    assert sum(p.kind == "QuantAttnProcessor" for p in state.plan) == n_attn
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules())
    assert all(layer.weight_hardened for _, layer in quant_layers(model))
    assert all(q.calibrated for _, q in activation_quantizers(model))
    out = _out(denoiser, _inputs(denoiser))
    assert out.shape == fp_out.shape and bool(torch.isfinite(out).all())
    assert not torch.equal(out, fp_out)
    with pytest.raises(ConfigError):
        quantize(denoiser, {}, QuantConfig.from_scheme(scheme), calib=_calib(denoiser))


def _labels(plan: list) -> dict[str, str]:
    return {p.name: p.label for p in plan}


W4A4 = "W:int4-sym-channel A:int4-asym-tensor"
W8A8 = "W:int8-sym-channel A:int8-asym-tensor"
W8_FP_INPUT = "W:int8-sym-channel A:fp"


def test_default_policy_keeps_first_last_and_embeddings_at_8_bits() -> None:
    for kind in ("unet", "cond"):
        labels = _labels(quantize_model(_model(kind), QuantConfig.from_scheme("w4a4")))
        assert labels["conv_in"] == W8_FP_INPUT  # reads x_t, whose input stays in FP
        for name in ("conv_out", "time_embedding.linear_1", "time_embedding.linear_2"):
            assert labels[name] == W8A8, (kind, name)
        assert labels["down_blocks.0.resnets.0.conv1"] == W4A4
        assert labels["mid_block.resnets.0.time_emb_proj"] == W4A4
    labels = _labels(quantize_model(_model("dit"), QuantConfig.from_scheme("w4a4")))
    assert labels["pos_embed.proj"] == W8_FP_INPUT
    for name in (
        "proj_out_1",
        "proj_out_2",
        "transformer_blocks.0.norm1.linear",
        "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1",
    ):
        assert labels[name] == W8A8, name
    assert labels["transformer_blocks.0.ff.net.2"] == W4A4
    assert labels["transformer_blocks.1.attn1"] == "QK/AV:int4-asym-tensor softmax:int8-u-tensor"


def test_policy_variants_weight_only_no_keep_and_8bit_schemes() -> None:
    labels = _labels(quantize_model(_model("unet"), QuantConfig.from_scheme("w4a16")))
    assert labels["conv_in"] == "W:int8-sym-channel A:fp"
    assert labels["down_blocks.0.resnets.0.conv1"] == "W:int4-sym-channel A:fp"
    assert not any(p.startswith("QK/AV") for p in labels.values())  # weight-only: no attention matmuls
    labels = _labels(quantize_model(_model("unet"), QuantConfig.from_scheme("w4a4", keep_8bit=None)))
    assert labels["conv_in"] == "W:int4-sym-channel A:fp" and labels["conv_out"] == W4A4
    everything = QuantConfig.from_scheme("w4a4", keep_8bit=None, fp_inputs=())
    assert _labels(quantize_model(_model("unet"), everything))["conv_in"] == W4A4
    labels = _labels(quantize_model(_model("unet"), QuantConfig.from_scheme("nvfp4")))
    assert labels["conv_out"] == W8A8 and labels["down_blocks.0.resnets.0.conv1"] == "W:nvfp4 A:nvfp4"
    assert labels["conv_in"] == W8_FP_INPUT
    labels = _labels(quantize_model(_model("unet"), QuantConfig.from_scheme("fp8")))
    assert labels["conv_in"] == "W:fp8_e4m3-channel A:fp"
    assert labels["conv_out"] == "W:fp8_e4m3-channel A:fp8_e4m3-tensor"


def test_keep_fp_and_custom_rules() -> None:
    model = _model("unet")
    config = QuantConfig.from_scheme("w4a4", keep_fp=("conv_out", "mid_block.attentions.0"))
    labels = _labels(quantize_model(model, config))
    assert "conv_out" not in labels and type(model.conv_out) is nn.Conv2d
    assert "mid_block.attentions.0" not in labels
    assert isinstance(model.mid_block.attentions[0].processor, AttnProcessor2_0)
    assert isinstance(model.mid_block.attentions[0].to_q, QuantLinear)  # the projections are separate layers
    assert labels["conv_in"] == W8_FP_INPUT

    from qdiffuse.config import LayerRule

    model = _model("unet")
    rules = (LayerRule("*.to_q", "w8a8"), LayerRule("*.conv_shortcut", "fp"), LayerRule("*", "w4a8"))
    config = QuantConfig.from_scheme("w4a4").with_overrides(rules=rules)
    labels = _labels(quantize_model(model, config))
    assert labels["mid_block.attentions.0.to_q"] == W8A8
    assert not any(name.endswith("conv_shortcut") for name in labels)
    assert labels["conv_in"] == "W:int4-sym-channel A:fp"  # the catch-all rule won; x_t stays FP
    assert labels["conv_out"] == "W:int4-sym-channel A:int8-asym-tensor"
    assert labels["mid_block.attentions.0"].startswith("QK/AV:int8-asym-tensor")


def test_set_quantization_enabled_restores_fp_activations() -> None:
    denoiser, fp = _quantized("unet", "w4a4")
    model = denoiser.model
    inputs = _inputs(denoiser)
    quant_out = _out(denoiser, inputs)
    # the reference: the FP architecture holding the hardened (quantized) weights, FP activations
    reference = copy.deepcopy(fp)
    missing, _ = reference.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    ref_denoiser = Denoiser.from_model(reference, META["unet"])
    ref_out = _out(ref_denoiser, inputs)
    set_quantization_enabled(model, False)
    seen: list[bool] = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o, seen=seen: seen.append(torch.equal(m.quantize_input(a[0]), a[0])))
        for _, layer in quant_layers(model)
    ]
    off_out = _out(denoiser, inputs)
    for h in hooks:
        h.remove()
    assert seen and all(seen)
    torch.testing.assert_close(off_out, ref_out, atol=1e-5, rtol=0)
    assert (off_out - quant_out).abs().max() > 1e-3
    set_quantization_enabled(model, True)
    assert torch.equal(_out(denoiser, inputs), quant_out)


def test_activation_quantizer_rejects_non_tensor_granularity() -> None:
    with pytest.raises(ConfigError):
        ActivationQuantizer(FormatSpec(kind="int", bits=8, granularity="channel"))
