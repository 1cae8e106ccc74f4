"""QuaRTZ: the leading-zero suppression against hand-computed groups, storage round trips, the fake-quantizer and
its gradient, the quantizers, schemes, one-line errors, and a QuaRTZ folder's save -> load equality."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_folder

from qdiffuse.api import quantize
from qdiffuse.config import SCHEMES, QuantConfig
from qdiffuse.errors import ConfigError, DataError
from qdiffuse.formats import fake_quantize, pack_bits, unpack_bits
from qdiffuse.formats.quartz import (
    effective_bits,
    fake_quant_quartz,
    lzs,
    lzs_decode,
    lzs_encode,
    lzs_ste,
    quartz_decode,
    quartz_encode,
    quartz_scale,
    search_quartz_scale,
)
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.io import describe_folder, load_quantized, save_quantized
from qdiffuse.kernels import runtime_report
from qdiffuse.models.loading import load_model_folder
from qdiffuse.nn.quantizer import ActivationQuantizer, WeightQuantizer
from qdiffuse.progress import set_progress_enabled

set_progress_enabled(False)

QUARTZ = SCHEMES["quartz-w4a4"][0]


def _codes(*values: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# ------------------------------------------------------------------------------------------ the integer map


@pytest.mark.parametrize(
    "group, truncated, rounded",
    [
        ((100, 7, -9, 1), (96, 0, 0, 0), (96, 0, -16, 0)),  # FLAG 4 (the example)
        ((7, -5, 3, 1), (7, -5, 3, 1), (7, -5, 3, 1)),  # FLAG 0: kept exactly
        ((15, 3, -2, 1), (14, 2, -2, 0), (14, 4, -2, 2)),  # FLAG 1: 15 rounds to 16, saturates at 7 << 1
        ((127, -64, 33, 8), (112, -64, 32, 0), (112, -64, 32, 16)),  # FLAG 4, 127 saturates to 112 rounded
        ((40, 20, -12, 4), (40, 16, -8, 0), (40, 24, -16, 8)),  # FLAG 3: ties (20/8 = 2.5) round up
        ((0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0)),  # all zero: FLAG 0, zeros
    ],
)
def test_lzs_hand_computed_groups(group: tuple, truncated: tuple, rounded: tuple) -> None:
    q = _codes(*group)
    assert lzs(q, 4, "truncate").tolist() == list(truncated)
    assert lzs(q, 4, "nearest").tolist() == list(rounded)


def test_lzs_flags_follow_bit_length() -> None:
    # m = 7 -> FLAG 0, 8 -> 1, 16 -> 2, 32 -> 3, 64 and 127 -> 4
    for m, flag in [(0, 0), (7, 0), (8, 1), (15, 1), (16, 2), (31, 2), (32, 3), (64, 4), (127, 4)]:
        _, flags = lzs_encode(_codes(m, 0, 0, 0), 4)
        assert flags.tolist() == [flag], m


def test_lzs_pads_the_last_group_with_zeros_and_keeps_shape_and_dtype() -> None:
    q = _codes(100, 1, 2, 3, 5, 1)  # groups [100, 1, 2, 3] and [5, 1, (0, 0)]
    assert lzs(q, 4, "truncate").tolist() == [96, 0, 0, 0, 5, 1]
    batch = torch.randint(-127, 128, (3, 2, 37), dtype=torch.int8)
    out = lzs(batch, 16, "nearest")
    assert out.shape == batch.shape and out.dtype == torch.int8
    assert torch.equal(out[1, 0], lzs(batch[1, 0], 16, "nearest"))  # groups never cross rows
    as_float = lzs(batch.float(), 16, "nearest")
    assert as_float.dtype == torch.float32 and torch.equal(as_float, out.float())


def test_lzs_saturates_minus_128_like_127() -> None:
    assert lzs(_codes(-128, 1, 0, 0), 4, "nearest").tolist() == [-112, 0, 0, 0]
    assert lzs(_codes(-128, 1, 0, 0), 4, "truncate").tolist() == [-112, 0, 0, 0]


def test_lzs_unsigned_variant_keeps_four_magnitude_bits() -> None:
    u = torch.uint8
    assert lzs(_codes(255, 17, 3, 1, dtype=u), 4, "truncate", unsigned=True).tolist() == [240, 16, 0, 0]
    assert lzs(_codes(15, 9, 3, 1, dtype=u), 4, "nearest", unsigned=True).tolist() == [15, 9, 3, 1]  # FLAG 0
    assert lzs(_codes(31, 16, 7, 1, dtype=u), 4, "nearest", unsigned=True).tolist() == [30, 16, 8, 2]  # FLAG 1
    # the signed map of the same codes keeps one bit less
    assert lzs(_codes(15, 9, 3, 1), 4, "nearest").tolist() == [14, 10, 4, 2]
    with pytest.raises(DataError):
        lzs(_codes(-3, 1, 0, 0), 4, unsigned=True)


def test_lzs_keeps_every_group_without_outlier_exactly_and_never_grows_the_maximum() -> None:
    q = torch.randint(-127, 128, (64, 16), dtype=torch.int8)
    q[:32] = torch.randint(-7, 8, (32, 16), dtype=torch.int8)
    for rounding in ("truncate", "nearest"):
        out = lzs(q, 16, rounding)
        assert torch.equal(out[:32], q[:32])
        assert (out.abs().amax(-1) <= q.abs().amax(-1)).all() or rounding == "nearest"
        assert (out.abs().amax(-1).to(torch.int32) < 2 ** (q.abs().amax(-1).to(torch.int32).float().log2().floor()
                                                         + 1)).all()


def test_lzs_rejects_bad_inputs_in_one_line() -> None:
    with pytest.raises(ConfigError, match="group size"):
        lzs(_codes(1, 2), 0)
    with pytest.raises(ConfigError, match="rounding"):
        lzs(_codes(1, 2), 2, "floor")
    with pytest.raises(DataError, match="integer codes"):
        lzs(torch.tensor([0.5, 1.0]), 2)


# --------------------------------------------------------------------------------------------- storage


@pytest.mark.parametrize("rounding", ["truncate", "nearest"])
@pytest.mark.parametrize("group", [16, 32])
@pytest.mark.parametrize("unsigned", [False, True])
def test_encode_decode_equals_lzs_and_packs_bit_for_bit(rounding: str, group: int, unsigned: bool) -> None:
    lo = 0 if unsigned else -127
    hi = 256 if unsigned else 128
    q = torch.randint(lo, hi, (5, 3 * group + 7), dtype=torch.int16)
    q[0, :group] = torch.randint(0, 4, (group,))  # a quiet group
    codes, flags = lzs_encode(q, group, rounding, unsigned)
    assert codes.dtype == flags.dtype == torch.uint8
    assert codes.shape == q.shape and flags.shape == (5, 4)
    assert int(codes.max()) <= 15 and int(flags.max()) <= 4
    assert torch.equal(lzs_decode(codes, flags, group, unsigned, dtype=torch.int16), lzs(q, group, rounding, unsigned))
    packed_codes, packed_flags = pack_bits(codes, 4), pack_bits(flags, 3)
    assert packed_codes.numel() == math.ceil(codes.numel() / 2)
    assert packed_flags.numel() == math.ceil(flags.numel() * 3 / 8)
    assert torch.equal(unpack_bits(packed_codes, 4, codes.numel()).reshape(codes.shape), codes)
    assert torch.equal(unpack_bits(packed_flags, 3, flags.numel()).reshape(flags.shape), flags)


def test_decode_rejects_flags_of_another_tensor() -> None:
    codes, flags = lzs_encode(torch.randint(-127, 128, (2, 32)), 16)
    with pytest.raises(DataError, match="do not match"):
        lzs_decode(codes, flags[:, :1], 16)


def test_effective_bits() -> None:
    assert effective_bits(64, 16) == 4 + 3 / 16 + 32 / 64 == 4.6875
    assert effective_bits(64, 32) == 4 + 3 / 32 + 0.5
    assert effective_bits(64, 16, scale_bits=16) == 4.4375
    assert QUARTZ.effective_bits == 4.6875 and QUARTZ.value_bits == 4
    spec32 = QuantConfig.from_scheme("quartz-w4a4", lzs_group=32).weight
    assert spec32.effective_bits == 4 + 3 / 32 + 0.5
    assert FormatSpec(kind="nvfp4").effective_bits == 4.5 and FormatSpec(kind="mxfp4").effective_bits == 4.25


# ------------------------------------------------------------------------------------ the fake-quantizer


def test_fake_quant_is_stage_one_then_lzs_then_scale() -> None:
    x = torch.randn(4, 130)
    scale = quartz_scale(x)
    assert scale.shape == (4, 3, 1)
    assert torch.allclose(scale[:, 0, 0], x[:, :64].abs().amax(-1) / 112)
    q = torch.round(torch.nn.functional.pad(x, (0, 62)).reshape(4, 3, 64) / scale).clamp(-127, 127)
    expected = (lzs(q.flatten(-2), 16, "nearest").reshape(4, 3, 64) * scale).flatten(-2)[:, :130]
    assert torch.allclose(fake_quant_quartz(x), expected, rtol=0, atol=1e-6)
    assert torch.equal(fake_quantize(x, QUARTZ), fake_quant_quartz(x))
    codes, flags = quartz_encode(x, scale)
    assert torch.allclose(quartz_decode(codes, flags, scale, 130), fake_quant_quartz(x, scale), rtol=0, atol=1e-7)


def test_the_largest_value_of_every_group_survives_unless_plain_min_max() -> None:
    x = torch.randn(64, 256)
    amax = x.abs().reshape(64, 4, 64).amax(-1)
    kept = fake_quant_quartz(x).abs().reshape(64, 4, 64).amax(-1)
    assert torch.allclose(kept, amax, rtol=1e-6)  # mapped to code 112 = 7 << 4, which LZS keeps exactly
    plain = fake_quant_quartz(x, fit_lzs=False).abs().reshape(64, 4, 64).amax(-1)
    assert torch.allclose(plain, amax * 112 / 127, rtol=1e-6)  # 127 saturates to 112: every max shrinks 12%
    assert QuantConfig.from_scheme("quartz-w4a4", quartz_fit_lzs=False).weight.describe().endswith("-mm127")


def test_quiet_groups_are_exact_on_the_int8_grid() -> None:
    scale = torch.full((1, 1, 1), 0.01)
    small = torch.randint(-7, 8, (1, 64)).float()
    x = small * 0.01
    x[0, 0] = 1.27  # the group of 16 holding the outlier is coarsened, the other three stay exact
    out = fake_quant_quartz(x, scale)
    assert torch.allclose(out[0, 16:], x[0, 16:], atol=1e-7)
    assert (out[0, 1:16] - x[0, 1:16]).abs().max() > 0.005 or (small[0, 1:16].abs() < 8).all()


def test_dim_argument_equals_moving_the_dimension_last() -> None:
    x = torch.randn(3, 96, 5, 4)
    along_channels = fake_quant_quartz(x, dim=1)
    assert torch.equal(along_channels, fake_quant_quartz(x.movedim(1, -1)).movedim(-1, 1))


def test_quartz_beats_per_row_int4_most_where_rows_have_outliers() -> None:
    gauss = torch.randn(256, 512)
    heavy = torch.distributions.Laplace(0.0, 1.0).sample((256, 512))
    heavy[:, ::97] *= 20

    def snr(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(10 * torch.log10(x.pow(2).mean() / (y - x).pow(2).mean()))

    def int4(x: torch.Tensor) -> torch.Tensor:
        s = x.abs().amax(-1, keepdim=True) / 7
        return (x / s).round().clamp(-7, 7) * s

    gains = []
    for x in (gauss, heavy):
        nearest, truncate = snr(x, fake_quant_quartz(x)), snr(x, fake_quant_quartz(x, rounding="truncate"))
        assert nearest > truncate
        gains.append(nearest - snr(x, int4(x)))
    assert gains[0] > 2 and gains[1] > 6
    assert abs(snr(gauss, fake_quant_quartz(gauss)) - snr(gauss, fake_quantize(gauss, FormatSpec(kind="nvfp4")))) < 1.5


def test_gradient_is_straight_through_inside_the_range() -> None:
    x = torch.randn(2, 64, requires_grad=True)
    scale = torch.full((2, 1, 1), 0.01)  # clips every |x| > 1.27
    fake_quant_quartz(x, scale).sum().backward()
    inside = x.detach().abs() <= 1.27
    assert torch.equal(x.grad, inside.float())
    q = torch.tensor([[15.0, 3.0, -2.0, 1.0]], requires_grad=True)
    out = lzs_ste(q, 4, "nearest")
    assert out.tolist() == [[14.0, 4.0, -2.0, 2.0]]
    out.sum().backward()
    assert torch.equal(q.grad, torch.ones_like(q))


def test_scale_search_never_loses_to_min_max() -> None:
    x = torch.randn(32, 256)
    x[:16, ::50] *= 30  # outliers in half of the rows
    for rounding in ("truncate", "nearest"):
        err_minmax = (fake_quant_quartz(x, quartz_scale(x), rounding=rounding) - x).pow(2)
        err_search = (fake_quant_quartz(x, search_quartz_scale(x, rounding=rounding), rounding=rounding) - x).pow(2)
        per_group = lambda e: torch.nn.functional.pad(e, (0, 0)).reshape(32, 4, 64).sum(-1)  # noqa: E731
        assert (per_group(err_search) <= per_group(err_minmax) + 1e-9).all()
        assert err_search.sum() < err_minmax.sum()


# ------------------------------------------------------------------------------------------ quantizers


@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_weight_quantizer_codes_decode_to_its_forward(observer: str) -> None:
    weight = torch.randn(8, 20, 3, 3)
    q = WeightQuantizer(QUARTZ, observer)
    q.calibrate(weight)
    codes = q.encode(weight)
    assert codes.shape == q.code_shape(weight.shape) == (8, 192)
    assert q.lzs_flags.dtype == torch.uint8 and q.lzs_flags.numel() == math.ceil(8 * 12 * 3 / 8)
    assert torch.equal(q.decode(codes, weight.shape), q(weight))
    hardened = q(weight)
    assert torch.equal(q(hardened), hardened)  # quantizing a hardened weight again changes nothing


def test_activation_quantizer_dynamic_and_static() -> None:
    x = torch.randn(2, 80, 4, 4)
    dynamic = ActivationQuantizer(QUARTZ, dynamic=True, block_dim=1)
    assert not dynamic.needs_calibration
    assert torch.equal(dynamic(x), fake_quant_quartz(x, dim=1))
    static = ActivationQuantizer(QUARTZ, dynamic=False, block_dim=1)
    static.start_calibration()
    static(x)
    static(2 * x)
    static.finish_calibration()
    assert static.scale.shape == (2, 1)
    amax = (2 * x).abs().amax(dim=(0, 2, 3))
    assert torch.allclose(static.scale[0, 0], amax[:64].max() / 112)
    y = static(x)
    assert y.shape == x.shape and not torch.equal(y, dynamic(x))
    with pytest.raises(ConfigError, match="unsigned"):
        ActivationQuantizer(FormatSpec(**{**QUARTZ.to_dict(), "unsigned": True}))


# ------------------------------------------------------------------------------------ schemes and errors


def test_schemes_and_their_defaults() -> None:
    config = QuantConfig.from_scheme("quartz-w4a4")
    assert config.weight.kind == config.activation.kind == "quartz"
    assert (config.weight.group_size, config.weight.lzs_group, config.weight.rounding) == (64, 16, "nearest")
    assert config.is_dynamic("down_blocks.0.resnets.0.conv1")
    assert not config.is_dynamic("time_embedding.linear_1")  # kept at 8 bits: a static INT8 grid
    assert not QuantConfig.from_scheme("quartz-w4a4", quartz_static=True).is_dynamic("down_blocks.0.resnets.0.conv1")
    assert QuantConfig.from_scheme("quartz-w4a8").activation == SCHEMES["w4a8"][1]
    assert QuantConfig.from_scheme("quartz-a4").weight == SCHEMES["w4a4"][0]
    assert QuantConfig.from_scheme("quartz-a4w8").weight == SCHEMES["w8a8"][0]
    variant = QuantConfig.from_scheme("quartz-w4a4", lzs_group=32, lzs_rounding="truncate")
    assert variant.activation.lzs_group == 32 and variant.weight.rounding == "truncate"
    assert QuantConfig.from_dict(variant.to_dict()) == variant
    assert QuantConfig.from_scheme("nvfp4-w4a8").weight.kind == "nvfp4"
    # a folder written before the QuaRTZ fields existed still reads
    old = {k: v for k, v in SCHEMES["w4a8"][0].to_dict().items() if k not in ("lzs_group", "rounding")}
    assert FormatSpec.from_dict(old) == SCHEMES["w4a8"][0]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"lzs_group": 24}, "multiple"),
        ({"lzs_group": 128}, "multiple"),
        ({"lzs_group": 1}, ">= 2"),
        ({"lzs_rounding": "floor"}, "rounding"),
    ],
)
def test_bad_variants_are_config_errors(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as exc:
        QuantConfig.from_scheme("quartz-w4a4", **kwargs)
    assert "\n" not in str(exc.value)


def test_variant_of_a_scheme_without_quartz_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no QuaRTZ format"):
        QuantConfig.from_scheme("w4a4", lzs_group=16)
    with pytest.raises(ConfigError, match="quartz format"):
        FormatSpec(kind="int", bits=4, lzs_group=16)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--lzs-group", "24"], "multiple of the LZS group"),
        (["--lzs-rounding", "up"], "rounding 'up' unknown"),
    ],
)
def test_cli_bad_variant_is_one_line_and_writes_nothing(args: list[str], words: str, tmp_path: Path) -> None:
    out = tmp_path / "q"
    proc = subprocess.run(
        [sys.executable, "-m", "qdiffuse.cli", "quantize", "fmnist-tiny", "--scheme", "quartz-w4a4", "--out", str(out),
         *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ whole models


def _quantized(folder: Path, scheme: str, **overrides: object):  # noqa: ANN202
    loaded = load_model_folder(folder)
    config = QuantConfig.from_scheme(
        scheme, calib_steps=3, calib_per_step=4, calib_num_inference_steps=4, outliers="off", guard_db=0, **overrides
    )
    quantize(loaded.denoiser, loaded.scheduler_config, config, runtime="simulated")
    return loaded


def _out(loaded, inputs):  # noqa: ANN001, ANN202
    with torch.no_grad():
        return loaded.denoiser.forward_raw(*inputs)


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("scheme, overrides", [("quartz-w4a4", {}), ("quartz-w4a4", {"quartz_static": True,
                                                                                      "lzs_rounding": "truncate"})])
def test_quartz_folder_save_load_equality(
    kind: str, scheme: str, overrides: dict, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    loaded = _quantized(tiny_folder(kind, tmp_path_factory), scheme, **overrides)
    d = loaded.denoiser
    gen = torch.Generator().manual_seed(3)
    inputs = (torch.randn(2, *d.sample_shape, generator=gen), torch.tensor([900, 20]),
              torch.tensor([0, 1]) if d.num_classes else None, None)
    expected = _out(loaded, inputs)
    folder = save_quantized(loaded, tmp_path / "q")
    simulated = load_quantized(folder, runtime="simulated")
    assert torch.equal(_out(simulated, inputs), expected)
    real = load_quantized(folder)
    assert torch.allclose(_out(real, inputs), expected, rtol=0, atol=1e-5)
    report = runtime_report(real.denoiser.model)
    quartz_layers = [layer for layer in report.layers if layer.fallback]
    assert quartz_layers and all("dequant-fallback" in layer.kernels for layer in quartz_layers)
    assert any("no real kernel takes quartz-g64-l16" in reason for layer in quartz_layers for reason in layer.fallback)
    formats = describe_folder(folder)["formats"]
    assert formats[0].startswith("weights quartz-g64-l16-") and "4.69 bits per value" in formats[0]
    # the folder holds 4-bit codes and 3-bit flags, not int8
    from safetensors import safe_open

    with safe_open(str(folder / "quantized.safetensors"), "pt") as f:
        keys = list(f.keys())
        flag_keys = [k for k in keys if k.endswith("lzs_flags")]
        assert flag_keys
        name = flag_keys[0].split(".weight_quantizers.")[0]
        codes = f.get_tensor(f"{name}.weight_codes.0")
        layer = dict(real.denoiser.model.named_modules())[name]
        rows, cols = layer.weight_quantizers[0].scale.shape[0], layer.weight_quantizers[0].scale.shape[1] * 64
        assert codes.numel() == rows * cols // 2
        assert f.get_tensor(flag_keys[0]).numel() == math.ceil(rows * cols // 16 * 3 / 8)


def test_reconstruction_learns_through_lzs(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    folder = tiny_folder("unet", tmp_path_factory)
    plain = _quantized(folder, "quartz-w4a4")
    learned = _quantized(folder, "quartz-w4a4", method="qdiffusion", recon_iters=40, recon_act_iters=0,
                         recon_max_samples=8, recon_batch_size=4)
    before = dict(plain.denoiser.model.named_parameters())
    after = learned.denoiser.model.named_parameters()
    changed = [n for n, b in after if n.endswith("weight") and not torch.equal(before[n], b)]
    assert changed  # learned rounding moved weights off round-to-nearest
    # every learned weight is still on its QuaRTZ grid: saving and loading reproduces the outputs bit for bit
    d = learned.denoiser
    inputs = (torch.randn(2, *d.sample_shape), torch.tensor([900, 20]), torch.tensor([0, 1]), None)
    expected = _out(learned, inputs)
    back = load_quantized(save_quantized(learned, tmp_path / "q"), runtime="simulated")
    assert torch.equal(_out(back, inputs), expected)
