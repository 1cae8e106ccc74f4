"""QuantConfig, LayerRule and FormatSpec validation: JSON round trips, one-line errors, the layer policy."""

from __future__ import annotations

import json

import pytest

from qdiffuse.config import DEFAULT_FP_INPUT, DEFAULT_KEEP_8BIT, METHODS, SCHEMES, LayerRule, QuantConfig
from qdiffuse.errors import ConfigError
from qdiffuse.formats.spec import FormatSpec

INT8_W = FormatSpec(kind="int", bits=8, symmetric=True, granularity="channel")
INT8_A = FormatSpec(kind="int", bits=8, symmetric=False, granularity="tensor")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("method", METHODS)
def test_to_dict_from_dict_round_trip_through_json(scheme: str, method: str) -> None:
    config = QuantConfig.from_scheme(
        scheme,
        method=method,
        keep_fp=("conv_out", "*.attn1"),
        quantize_attention=False,
        softmax_bits=8,
        split_shortcuts=False,
        dynamic_activations=True,
        calib_steps=7,
        calib_per_step=3,
        calib_sampler="dpm++2m",
        calib_num_inference_steps=25,
        seed=11,
    )
    text = json.dumps(config.to_dict())
    back = QuantConfig.from_dict(json.loads(text))
    assert back == config
    assert back.to_dict() == config.to_dict()
    assert isinstance(back.rules, tuple) and all(isinstance(r, LayerRule) for r in back.rules)


def test_round_trip_keeps_rule_order_and_custom_formats() -> None:
    weight = FormatSpec(kind="int", bits=3, symmetric=False, granularity="group", group_size=32)
    config = QuantConfig(
        scheme="custom",
        weight=weight,
        activation=None,
        rules=(LayerRule("a.*", "fp"), LayerRule("a.b", "w8a8"), LayerRule("*", "w4a4")),
    )
    back = QuantConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config
    assert [r.pattern for r in back.rules] == ["a.*", "a.b", "*"]
    assert back.weight.group_size == 32 and back.activation is None


def test_from_dict_rejects_malformed_data_with_config_error() -> None:
    good = QuantConfig.from_scheme("w8a8").to_dict()
    for broken in (
        {k: v for k, v in good.items() if k != "weight"},
        {**good, "unexpected_field": 1},
        {**good, "rules": [{"pattern": "x"}]},
        {**good, "weight": {**good["weight"], "bits": 12}},
        {**good, "weight": {**good["weight"], "from_the_future": True}},
        {**good, "method": "adaround-9000"},
    ):
        with pytest.raises(ConfigError) as exc:
            QuantConfig.from_dict(broken)
        _one_line(exc)


# ------------------------------------------------------------------------------------- schemes and methods


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as exc:
        QuantConfig.from_scheme("w3a3")
    message = _one_line(exc)
    assert "'w3a3'" in message
    assert all(name in message for name in SCHEMES)


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as exc:
        QuantConfig.from_scheme("w8a8", method="awq")
    message = _one_line(exc)
    assert "'awq'" in message and all(m in message for m in METHODS)
    with pytest.raises(ConfigError):
        QuantConfig.from_scheme("w8a8").with_overrides(method="awq")


@pytest.mark.parametrize("field, value", [("calib_steps", 0), ("calib_per_step", -1), ("softmax_bits", 7)])
def test_out_of_range_settings_raise(field: str, value: int) -> None:
    with pytest.raises(ConfigError) as exc:
        QuantConfig.from_scheme("w8a8", **{field: value})
    _one_line(exc)


def test_schemes_have_the_documented_formats() -> None:
    w, a = SCHEMES["w4a8"]
    assert (w.kind, w.bits, w.symmetric, w.granularity) == ("int", 4, True, "channel")
    assert (a.kind, a.bits, a.symmetric, a.granularity) == ("int", 8, False, "tensor")
    assert SCHEMES["w8a16"][1] is None and SCHEMES["w4a16"][1] is None
    assert SCHEMES["fp8"][0].kind == "fp8_e4m3" and SCHEMES["fp8"][0].granularity == "channel"
    assert SCHEMES["nvfp4"][0].block_size == 16 and SCHEMES["mxfp4"][0].block_size == 32


# ------------------------------------------------------------------------------------------- FormatSpec


@pytest.mark.parametrize("bits", [-1, 0, 1, 9, 16])
def test_integer_bits_out_of_range(bits: int) -> None:
    with pytest.raises(ConfigError) as exc:
        FormatSpec(kind="int", bits=bits)
    assert str(bits) in _one_line(exc)


@pytest.mark.parametrize("bits", range(2, 9))
def test_integer_bits_in_range(bits: int) -> None:
    assert FormatSpec(kind="int", bits=bits).value_bits == bits


def test_format_spec_other_validation() -> None:
    with pytest.raises(ConfigError):
        FormatSpec(kind="int7")
    with pytest.raises(ConfigError):
        FormatSpec(granularity="row")
    with pytest.raises(ConfigError):
        FormatSpec(granularity="group")  # no group size
    assert FormatSpec(kind="nvfp4", bits=99).value_bits == 4  # fixed-width kinds ignore bits
    assert FormatSpec(kind="fp8_e5m2").value_bits == 8


# -------------------------------------------------------------------------------------------- LayerRule


@pytest.mark.parametrize("scheme", ["fp", *SCHEMES])
def test_layer_rule_accepts_fp_and_every_scheme(scheme: str) -> None:
    assert LayerRule("conv_in", scheme).scheme == scheme


@pytest.mark.parametrize("scheme", ["FP", "w2a2", "int8", ""])
def test_layer_rule_rejects_unknown_schemes(scheme: str) -> None:
    with pytest.raises(ConfigError) as exc:
        LayerRule("conv_in", scheme)
    message = _one_line(exc)
    assert "conv_in" in message and "'fp'" in message


def test_layer_rules_first_match_wins_and_weight_only_stays_weight_only() -> None:
    config = QuantConfig.from_scheme("w4a4", keep_fp=("conv_out",), keep_8bit=("conv_*",))
    assert config.formats_for("conv_out") is None  # keep_fp comes before the 8-bit rules
    assert config.formats_for("conv_in") == (INT8_W, None)  # 8-bit rule, input x_t left in FP by default
    assert config.formats_for("conv_norm_out") == (INT8_W, INT8_A)
    weight, act = config.formats_for("down_blocks.0.resnets.0.conv1")
    assert (weight.bits, act.bits) == (4, 4)
    weight_only = QuantConfig.from_scheme("w4a16")
    assert weight_only.formats_for("conv_in") == (INT8_W, None)
    assert weight_only.formats_for("mid_block.resnets.0.conv1")[1] is None


def test_network_input_stays_fp_by_default_and_can_be_quantized() -> None:
    config = QuantConfig.from_scheme("w8a8")
    assert config.fp_inputs == DEFAULT_FP_INPUT
    assert config.formats_for("conv_in") == (INT8_W, None)
    assert config.formats_for("pos_embed.proj") == (INT8_W, None)
    assert config.formats_for("down_blocks.0.resnets.0.conv1") == (INT8_W, INT8_A)
    quantized_input = QuantConfig.from_scheme("w8a8", fp_inputs=())
    assert quantized_input.formats_for("conv_in") == (INT8_W, INT8_A)
    assert QuantConfig.from_scheme("w4a16").fp_inputs == ()  # nothing to exempt without activation quantization
    mixed = QuantConfig.from_scheme("w8-mixed")
    assert mixed.activation_variants("conv_in") is None
    assert mixed.activation_variants("down_blocks.0.resnets.0.conv1") is not None


def test_configs_saved_before_fp_inputs_keep_their_quantized_input() -> None:
    data = QuantConfig.from_scheme("w8a8").to_dict()
    assert QuantConfig.from_dict(data) == QuantConfig.from_scheme("w8a8")
    del data["fp_inputs"]
    old = QuantConfig.from_dict(data)
    assert old.fp_inputs == () and old.formats_for("conv_in") == (INT8_W, INT8_A)


def test_default_8bit_policy_only_below_8_bits() -> None:
    assert QuantConfig.from_scheme("w8a8").rules == ()
    assert QuantConfig.from_scheme("fp8").rules == ()
    assert [r.pattern for r in QuantConfig.from_scheme("w4a8").rules] == list(DEFAULT_KEEP_8BIT)
    assert [r.pattern for r in QuantConfig.from_scheme("nvfp4").rules] == list(DEFAULT_KEEP_8BIT)
    assert QuantConfig.from_scheme("w4a4", keep_8bit=None).rules == ()


def test_softmax_spec_is_unsigned_8bit() -> None:
    spec = QuantConfig.from_scheme("w4a4").softmax_spec()
    assert (spec.kind, spec.bits, spec.unsigned, spec.granularity) == ("int", 8, True, "tensor")


def test_softmax_bits_above_8_are_honoured_or_rejected() -> None:
    try:
        config = QuantConfig.from_scheme("w8a8", softmax_bits=12)
    except ConfigError:
        return
    assert config.softmax_spec().bits == 12
