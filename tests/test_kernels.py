"""Real execution: every kernel against the simulated layer it replaces, packing, dispatch, loading, reports."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny_models import calibrate_layer, tiny_folder, tiny_quantized_folder
from torch import nn
from typer.testing import CliRunner

from qdiffuse.config import SCHEMES
from qdiffuse.errors import ConfigError
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.io import load_quantized, save_quantized
from qdiffuse.kernels import RealLayer, check_runtime, dispatch, freeze, model_bytes, runtime_report
from qdiffuse.kernels.attention import RealAttnProcessor
from qdiffuse.kernels.base import activation_codes
from qdiffuse.kernels.cpu_int8 import IM2COL_MIN_REDUCTION, has_vnni, onednn_available
from qdiffuse.kernels.cuda_fp8 import Fp8RowwiseLinear
from qdiffuse.kernels.packing import pack_int4, unpack_int4
from qdiffuse.models.loading import build_model
from qdiffuse.nn.attention import QuantAttnProcessor
from qdiffuse.nn.layers import QuantConv2d, QuantLayer, QuantLinear
from qdiffuse.nn.quantizer import ActivationQuantizer, set_activation_variant
from qdiffuse.progress import set_progress_enabled

set_progress_enabled(False)
needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN quantized ops")
needs_vnni = pytest.mark.skipif(not has_vnni(), reason="8-bit weights run on oneDNN only on CPUs with VNNI")


def _real_vs_simulated(layer: QuantLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, RealLayer]:
    holder = nn.Sequential(layer)
    with torch.no_grad():
        simulated = layer(x)
        freeze(holder)
        real = holder[0]
        return simulated, real(x), real


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """Same integers, float epilogue only: the difference is rounding of the output's magnitude."""
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= rel * a.abs().max().item() + 1e-6


def test_int4_packing_hand_computed() -> None:
    codes = torch.tensor([-8, 7, 0, -1], dtype=torch.int8)
    packed = pack_int4(codes)
    # nibbles 0, 15, 8, 7 (code + 8), low nibble first: 0xF0, 0x78
    assert packed.tolist() == [0xF0, 0x78]
    assert torch.equal(unpack_int4(packed, (2, 2)), codes.reshape(2, 2))


def test_int4_packing_rejects_out_of_range_codes() -> None:
    with pytest.raises(Exception, match="outside"):
        pack_int4(torch.tensor([9, 0], dtype=torch.int8))


def test_activation_codes_hand_computed() -> None:
    q = ActivationQuantizer(FormatSpec(kind="int", bits=8, symmetric=False))
    q.scale, q.zero_point = torch.tensor(0.5), torch.tensor(2.0)
    codes = activation_codes(q, torch.tensor([-1.0, 0.0, 0.74, 200.0]))
    assert codes.codes.tolist() == [0, 2, 3, 255] and codes.zero_point == 2 and codes.scale == 0.5
    # a signed grid shifts by 128 without changing codes - zero point
    s = ActivationQuantizer(FormatSpec(kind="int", bits=8, symmetric=True))
    s.scale, s.zero_point = torch.tensor(1.0), None
    signed = activation_codes(s, torch.tensor([-3.0, 0.0, 200.0]))
    assert signed.codes.tolist() == [125, 128, 255] and signed.zero_point == 128


CONV_CASES = [
    # (in, out, kernel, stride, padding, groups, weight bits, expected kernel)
    (16, 24, 3, 1, 1, 1, 8, "onednn-int8-conv"),
    (16, 24, 1, 1, 0, 1, 8, "onednn-int8-conv"),
    (16, 24, 3, 2, 1, 1, 8, "onednn-int8-conv"),
    (16, 24, 3, 1, 1, 4, 8, "onednn-int8-conv"),
    (16, 24, 3, 1, 1, 1, 4, "int4-packed-onednn-conv"),
    (128, 32, 3, 1, 1, 1, 4, "int4-packed-im2col-conv"),
    (128, 32, 3, 2, 1, 1, 4, "int4-packed-im2col-conv"),
]


@needs_onednn
@pytest.mark.parametrize(
    "cin,cout,k,stride,pad,groups,bits,kernel",
    [pytest.param(*case, marks=needs_vnni) if case[6] == 8 else case for case in CONV_CASES],
)
def test_conv_kernels_equal_the_simulated_layer(
    cin: int, cout: int, k: int, stride: int, pad: int, groups: int, bits: int, kernel: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatch, "has_vnni", lambda: True)  # the _int_mm kernels are exact and tested on any CPU
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups)
    weight, act = SCHEMES["w8a8" if bits == 8 else "w4a8"]
    x = torch.randn(3, cin, 9, 9) * 2 + 0.5
    layer = calibrate_layer(QuantConv2d(conv, weight, act), x)
    simulated, real, module = _real_vs_simulated(layer, x)
    assert module.kernel_names == [kernel]
    _close(simulated, real)
    if kernel == "int4-packed-im2col-conv":
        assert cin * k * k >= IM2COL_MIN_REDUCTION


@needs_onednn
@pytest.mark.parametrize(
    "bits,kernel", [pytest.param(8, "onednn-int8-linear", marks=needs_vnni), (4, "int4-packed-int-mm-linear")]
)
def test_linear_kernels_equal_the_simulated_layer(bits: int, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "has_vnni", lambda: True)
    weight, act = SCHEMES["w8a8" if bits == 8 else "w4a8"]
    x = torch.randn(2, 5, 33) * 3
    layer = calibrate_layer(QuantLinear(nn.Linear(33, 20), weight, act), x)
    simulated, real, module = _real_vs_simulated(layer, x)
    assert module.kernel_names == [kernel]
    _close(simulated, real)


@needs_onednn
def test_without_vnni_w4_runs_on_onednn_and_w8_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without VNNI torch._int_mm is slower than FP32 and oneDNN's sums saturate for 8-bit weights: W4 linears and
    wide convs take oneDNN's kernels (exact for 4-bit codes; the weight held at 8 bits), narrow W4 convs keep
    their nibbles, and W8 layers fall back to the dequantizing kernel, saying why."""
    monkeypatch.setattr(dispatch, "has_vnni", lambda: False)
    weight, act = SCHEMES["w4a8"]
    x = torch.randn(2, 5, 33) * 3
    linear = calibrate_layer(QuantLinear(nn.Linear(33, 20), weight, act), x)
    simulated, real, module = _real_vs_simulated(linear, x)
    assert module.kernel_names == ["onednn-int8-linear"]
    _close(simulated, real)
    for cin, kernel in [(128, "onednn-int8-conv"), (16, "int4-packed-onednn-conv")]:
        x = torch.randn(3, cin, 9, 9)
        conv = calibrate_layer(QuantConv2d(nn.Conv2d(cin, 8, 3, padding=1), weight, act), x)
        simulated, real, module = _real_vs_simulated(conv, x)
        assert module.kernel_names == [kernel]
        _close(simulated, real)
    x = torch.randn(4, 33)
    w8 = nn.Sequential(calibrate_layer(QuantLinear(nn.Linear(33, 20), *SCHEMES["w8a8"]), x))
    with torch.no_grad():
        simulated = w8(x)
        report = freeze(w8)
        _close(simulated, w8(x))
    assert report.layers[0].kernels == ["dequant-fallback"]
    assert any("no VNNI" in reason for reason in report.layers[0].fallback)


@needs_onednn
@needs_vnni
def test_split_layer_sums_its_parts() -> None:
    """Shortcut splitting: two input ranges with their own scales, one kernel each, outputs summed."""
    conv = nn.Conv2d(24, 8, 3, padding=1)
    x = torch.cat([torch.randn(2, 16, 6, 6), 50 * torch.randn(2, 8, 6, 6)], dim=1)
    layer = calibrate_layer(QuantConv2d(conv, *SCHEMES["w8a8"], split_at=16), x)
    simulated, real, module = _real_vs_simulated(layer, x)
    assert module.kernel_names == ["onednn-int8-conv"] * 2
    _close(simulated, real)


@needs_onednn
@needs_vnni
def test_dynamic_activation_ranges_run_on_integer_kernels() -> None:
    x = torch.randn(4, 16) * 5
    layer = calibrate_layer(QuantLinear(nn.Linear(16, 8), *SCHEMES["w8a8"], dynamic=True), x)
    simulated, real, module = _real_vs_simulated(layer, x * 0.1)  # another range than calibration saw
    assert module.kernel_names == ["onednn-int8-linear"]
    _close(simulated, real)


@pytest.mark.parametrize("scheme", ["w8a16", "nvfp4", "mxfp4", "fp8"])
def test_formats_without_a_cpu_kernel_fall_back_exactly_and_say_why(scheme: str) -> None:
    x = torch.randn(3, 32)
    layer = calibrate_layer(QuantLinear(nn.Linear(32, 16), *SCHEMES[scheme]), x)
    holder = nn.Sequential(layer)
    with torch.no_grad():
        simulated = layer(x)
        report = freeze(holder)
        real = holder(x)
    assert report.layers[0].kernels == ["dequant-fallback"]
    assert report.layers[0].fallback and "layers on simulated compute" in report.summary()
    assert torch.allclose(simulated, real, atol=1e-6, rtol=1e-6)


def test_fp8_rowwise_kernel_equals_the_simulated_layer() -> None:
    """``torch._scaled_mm`` also runs on a CPU: the GPU kernel's math is checked here, its speed on a GPU."""
    x = torch.randn(8, 32)
    layer = calibrate_layer(QuantLinear(nn.Linear(32, 16), *SCHEMES["fp8"]), x)
    with torch.no_grad():
        simulated = layer(x)
        codes = layer.weight_quantizers[0].encode(layer.weight)
        kernel = Fp8RowwiseLinear(codes, layer.weight_quantizers[0].scale)
        real = kernel.run(x, layer.input_quantizers[0], layer.bias)
    _close(simulated, real, rel=1e-4)
    assert torch.equal(kernel.storage_codes(0), codes)


def test_real_attention_matches_the_simulated_processor() -> None:
    act = SCHEMES["w8a8"][1]
    softmax = FormatSpec(kind="int", bits=8, unsigned=True, symmetric=False)
    processor = QuantAttnProcessor(act, softmax)
    q, k, v = (torch.randn(2, 3, 40, 8) for _ in range(3))
    for quantizer in processor.quantizers().values():
        quantizer.start_calibration()
    processor.attend(q, k, v, None)
    for quantizer in processor.quantizers().values():
        quantizer.finish_calibration()
    mask = torch.zeros(2, 3, 1, 40)
    mask[..., -5:] = -1e4
    simulated = processor.attend(q, k, v, mask)
    real = RealAttnProcessor(processor).attend(q, k, v, mask)
    # identical codes up to a rounding flip of a softmax code here and there: one code step of |V| at most
    step = processor.softmax_quantizer.scale.item() * v.abs().max().item()
    assert (simulated - real).abs().max().item() <= 2 * step
    assert (simulated - real).pow(2).mean() / simulated.pow(2).mean() < 1e-4


@pytest.fixture(scope="module")
def unet_w4a8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_quantized_folder("unet", "w4a8", tmp_path_factory)


def _inputs(denoiser) -> tuple:  # noqa: ANN001
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, *denoiser.sample_shape, generator=gen)
    return x, torch.tensor([900, 500, 100, 5]), torch.tensor([0, 1, 2, 3]), None


@needs_onednn
def test_loading_builds_packed_real_layers_and_no_float_weights(unet_w4a8: Path) -> None:
    real = load_quantized(unet_w4a8).denoiser.model
    simulated = load_quantized(unet_w4a8, runtime="simulated").denoiser.model
    layers = [m for m in real.modules() if isinstance(m, RealLayer)]
    assert layers and not any(isinstance(m, QuantLayer) for m in real.modules())
    assert all(not hasattr(m, "weight") for m in layers)
    assert not any(t.device.type == "meta" for t in [*real.parameters(), *real.buffers()])
    real_bytes, fp_bytes = model_bytes(real), model_bytes(simulated)
    assert real_bytes["float_weights"] < 0.05 * fp_bytes["float_weights"]  # the FP first layer's input only
    assert real_bytes["total"] < 0.3 * fp_bytes["total"]
    report = runtime_report(real)
    assert report.runtime == "real" and len(report.layers) == len(layers)
    assert any("int4-packed" in k for k in report.kernel_counts())


@needs_onednn
def test_real_and_simulated_loads_agree(unet_w4a8: Path) -> None:
    real = load_quantized(unet_w4a8).denoiser
    simulated = load_quantized(unet_w4a8, runtime="simulated").denoiser
    with torch.no_grad():
        a, b = simulated.forward_raw(*_inputs(simulated)), real.forward_raw(*_inputs(real))
    psnr = 10 * torch.log10(a.pow(2).max() / (a - b).pow(2).mean())
    # Each layer agrees to float rounding; a rounding difference upstream can flip an activation code downstream,
    # and such flips add up through the network. With VNNI the 8-bit layers run on oneDNN (above 45 dB); without,
    # on the float fallback, whose other rounding order gave 40.4 dB on an AVX2 CPU.
    assert psnr > (45 if has_vnni() else 35)


@needs_onednn
def test_skeleton_parameters_are_on_meta_until_filled(unet_w4a8: Path) -> None:
    import json

    config = json.loads((unet_w4a8 / "unet" / "config.json").read_text())
    model = build_model(config, "test", meta=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type != "meta" for b in model.buffers())


@needs_onednn
def test_real_model_saves_the_same_folder(unet_w4a8: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    loaded = load_quantized(unet_w4a8)
    save_quantized(loaded, tmp_path / "again")
    a = load_file(str(unet_w4a8 / "quantized.safetensors"))
    b = load_file(str(tmp_path / "again" / "quantized.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(a[key], b[key]) for key in a)


@needs_onednn
def test_deepcopy_of_a_real_model_computes_the_same(unet_w4a8: Path) -> None:
    denoiser = load_quantized(unet_w4a8).denoiser
    twin = copy.deepcopy(denoiser.model)
    with torch.no_grad():
        a = denoiser.model(*_inputs(denoiser)[:2], class_labels=_inputs(denoiser)[2]).sample
        b = twin(*_inputs(denoiser)[:2], class_labels=_inputs(denoiser)[2]).sample
    assert torch.equal(a, b)


@needs_onednn
def test_mixed_precision_switches_real_layers(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tiny_quantized_folder("unet", "w4-mixed", tmp_path_factory)
    real = load_quantized(folder).denoiser
    simulated = load_quantized(folder, runtime="simulated").denoiser
    outs = {}
    for key in ("a4", "a8"):
        set_activation_variant(real.model, key)
        set_activation_variant(simulated.model, key)
        with torch.no_grad():
            outs[key] = real.forward_raw(*_inputs(real)), simulated.forward_raw(*_inputs(simulated))
        r, s = outs[key]
        assert 10 * torch.log10(s.pow(2).max() / (r - s).pow(2).mean()) > 40
    assert not torch.allclose(outs["a4"][0], outs["a8"][0])


def test_bad_runtime_name_is_a_config_error(unet_w4a8: Path) -> None:
    with pytest.raises(ConfigError, match="runtime"):
        check_runtime("fast")
    with pytest.raises(ConfigError, match="real or simulated"):
        load_quantized(unet_w4a8, runtime="fast")


def test_cli_sample_says_which_runtime_runs(unet_w4a8: Path, tmp_path: Path) -> None:
    from qdiffuse.cli import app

    runner = CliRunner()
    out = tmp_path / "s.npz"
    args = ["sample", str(unet_w4a8), "--num", "2", "--steps", "2", "--out", str(out), "--quiet", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "runtime: real" in result.output and out.is_file()
    result = runner.invoke(app, [*args, "--overwrite", "--runtime", "simulated"])
    assert result.exit_code == 0 and "runtime: simulated" in result.output
    result = runner.invoke(app, [*args, "--overwrite", "--runtime", "fast"])
    assert result.exit_code != 0


def test_cli_info_reports_memory_and_kernels(unet_w4a8: Path) -> None:
    from qdiffuse.cli import app

    result = CliRunner().invoke(app, ["info", str(unet_w4a8), "--runtime"])
    assert result.exit_code == 0, result.output
    assert "memory:" in result.output and "loaded on the real runtime" in result.output
    assert "fallback:" in result.output  # the FP-input first layer says why it is not on an integer kernel


def test_fp_model_folder_is_unchanged_by_the_runtime_option(tmp_path_factory: pytest.TempPathFactory) -> None:
    from qdiffuse.pipeline import load_any

    folder = tiny_folder("unet", tmp_path_factory)
    loaded = load_any(folder, "cpu", "real")
    assert not any(isinstance(m, (RealLayer, QuantLayer)) for m in loaded.denoiser.model.modules())


@needs_onednn
@pytest.mark.parametrize("cin,bits", [(16, 8), (16, 4), (128, 4)])
def test_real_layers_trace_without_graph_breaks(cin: int, bits: int) -> None:
    """The hot path of every CPU kernel is one graph for ``torch.compile`` (static scales are plain numbers)."""
    x = torch.randn(2, cin, 6, 6)
    layer = calibrate_layer(QuantConv2d(nn.Conv2d(cin, 8, 3, padding=1), *SCHEMES["w8a8" if bits == 8 else "w4a8"]), x)
    holder = nn.Sequential(layer)
    freeze(holder)
    explained = torch._dynamo.explain(holder)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(holder, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), holder(x))


@needs_onednn
def test_quantize_is_real_by_default(tmp_path_factory: pytest.TempPathFactory) -> None:
    from qdiffuse.api import quantize
    from qdiffuse.config import QuantConfig
    from qdiffuse.eval.cost import cost_summary
    from qdiffuse.models.loading import load_model_folder

    loaded = load_model_folder(tiny_folder("dit", tmp_path_factory))
    config = QuantConfig.from_scheme("w8a8", calib_steps=2, calib_per_step=2, calib_num_inference_steps=4)
    model = quantize(loaded.denoiser, loaded.scheduler_config, config)
    assert not any(isinstance(m, QuantLayer) for m in model.modules())
    report = runtime_report(model)
    assert freeze(model) is report  # freezing a real model again keeps its layers and report
    w8_kernel = "onednn-int8-linear" if has_vnni() else "dequant-fallback"
    assert report.runtime == "real" and report.kernel_counts()[w8_kernel] > 0
    assert "attention matmul pairs on" in report.summary()
    assert cost_summary(loaded.denoiser)["bops_reduction"] > 10  # BOPs are counted on real layers too


def test_a_real_layer_called_on_another_device_says_how_to_load_it() -> None:
    from qdiffuse.errors import ModelLoadError

    x = torch.randn(2, 16)
    layer = calibrate_layer(QuantLinear(nn.Linear(16, 8), *SCHEMES["w8a8"]), x)
    holder = nn.Sequential(layer)
    freeze(holder)
    with pytest.raises(ModelLoadError, match="load the folder again with device='meta'"):
        holder(x.to("meta"))
