"""Outliers and range drift: twins, input treatments, per-layer decisions, the guard and the sensitivity report."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_cli import run  # noqa: F401 - the in-process CLI fixture
from tiny_models import calibrate_layer
from torch import nn

from qdiffuse.api import quant_state, quantize
from qdiffuse.calibration.collect import collect_calibration
from qdiffuse.config import QuantConfig
from qdiffuse.errors import ConfigError, ModelLoadError
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.io import load_quantized, save_quantized
from qdiffuse.kernels import freeze
from qdiffuse.kernels.cpu_int8 import onednn_available
from qdiffuse.models.loading import LoadedModel, load_model_folder
from qdiffuse.models.twins import TWINS, Pathology, TwinSpec, apply_twin
from qdiffuse.nn.layers import QuantConv2d, QuantLinear
from qdiffuse.nn.rewrite import quant_layers
from qdiffuse.outliers.sensitivity import block_of, input_sensitivity
from qdiffuse.outliers.stats import RangeStats
from qdiffuse.progress import set_progress_enabled

set_progress_enabled(False)
INT8 = FormatSpec(kind="int", bits=8, symmetric=True, granularity="channel")
A8 = FormatSpec(kind="int", bits=8, symmetric=False, granularity="tensor")
SMALL_CALIB = {"calib_steps": 4, "calib_per_step": 6, "calib_num_inference_steps": 10}


def _eval(loaded: LoadedModel, seed: int = 7) -> tuple[torch.Tensor, ...]:
    data = collect_calibration(loaded.denoiser, loaded.scheduler_config, n_steps=4, n_per_step=4,
                               num_inference_steps=10, seed=seed)
    return data.x, data.t, data.labels


def _out(loaded: LoadedModel, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return loaded.denoiser.forward_raw(inputs[0], inputs[1], inputs[2], None)


def _psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (a - ref).pow(2).mean()))


# ------------------------------------------------------------------------------------------------ twins


@pytest.mark.parametrize("name", sorted(TWINS))
def test_twins_are_function_preserving_and_carry_the_pathologies(name: str) -> None:
    spec = TWINS[name]
    base, twin = load_model_folder(spec.base), load_model_folder(name)
    inputs = _eval(base)
    a, b = _out(base, inputs), _out(twin, inputs)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert twin.meta["twin"]["name"] == name and twin.source == name
    seen: dict[str, RangeStats] = {}
    hooks = []
    for layer in spec.layers():
        module = twin.denoiser.model.get_submodule(layer)
        stats = seen[layer] = RangeStats(1 if isinstance(module, nn.Conv2d) else -1)
        hooks.append(module.register_forward_hook(lambda m, args, o, s=stats, t=inputs[1]: s.update(args[0], t)))
    _out(twin, inputs)
    for h in hooks:
        h.remove()
    for p in spec.pathologies:
        if p.kind == "outliers":
            assert seen[p.layer].channel_ratio > p.factor / 100, p.layer
        else:
            assert seen[p.layer].drift_ratio > 2.0, p.layer


def test_twin_spec_round_trips_and_rejects_bad_pathologies() -> None:
    spec = TWINS["fmnist-dit-twin"]
    assert TwinSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ModelLoadError, match="unknown"):
        Pathology("conv_in", "spikes", 10.0)
    with pytest.raises(ModelLoadError, match="names no channels"):
        Pathology("conv_in", "outliers", 10.0)
    model = load_model_folder("fmnist-tiny").denoiser.model
    with pytest.raises(ModelLoadError, match="no layer"):
        apply_twin(model, TwinSpec("x", "fmnist-tiny", (Pathology("nope", "drift", 2.0),)))


# ------------------------------------------------------------------------------------------------ treatments


def _layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "conv":
        fp = nn.Conv2d(16, 8, 3, padding=1)
        x = torch.randn(4, 16, 6, 6)
        x[:, 3] *= 1e4
    else:
        fp = nn.Linear(16, 8)
        x = torch.randn(4, 5, 16)
        x[..., 3] *= 1e4
    return fp, x


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_smoothing_and_fp_channels_are_exact_identities_in_fp(kind: str) -> None:
    fp, x = _layer(kind)
    cls = QuantConv2d if kind == "conv" else QuantLinear
    layer = cls(copy.deepcopy(fp), INT8, A8)
    smooth = torch.rand(16) * 10 + 0.1
    layer.treat_input(smooth, torch.tensor([3, 7]), rotation=16, rank=2)
    assert "Hadamard" in layer.input_treatment.describe() and "rank-2" in layer.input_treatment.describe()
    layer.quant_enabled = False
    with torch.no_grad():
        assert torch.allclose(layer(x), fp(x), rtol=1e-5, atol=1e-5 * fp(x).abs().max().item())
    with pytest.raises(RuntimeError, match="before the weight"):
        layer.calibrate_weight()
        layer.harden()
        layer.treat_input(smooth, None)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_fp_channels_rescue_an_outlier_input(kind: str) -> None:
    fp, x = _layer(kind)
    cls = QuantConv2d if kind == "conv" else QuantLinear
    plain = calibrate_layer(cls(copy.deepcopy(fp), INT8, A8), x)
    treated = cls(copy.deepcopy(fp), INT8, A8)
    treated.treat_input(None, torch.tensor([3]))
    calibrate_layer(treated, x)
    with torch.no_grad():
        ref = fp(x)
        assert _psnr(treated(x), ref) > _psnr(plain(x), ref) + 20


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN quantized ops")
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_treated_real_layers_compute_what_the_simulated_ones_do(kind: str, dynamic: bool) -> None:
    fp, x = _layer(kind)
    cls = QuantConv2d if kind == "conv" else QuantLinear
    layer = cls(copy.deepcopy(fp), INT8, A8, dynamic=dynamic)
    layer.treat_input(torch.rand(16) + 0.5, torch.tensor([3]), rotation=8 if dynamic else 0, rank=1)
    calibrate_layer(layer, x)
    layer.harden()
    holder = nn.Sequential(layer)
    with torch.no_grad():
        simulated = layer(x)
        freeze(holder)
        real = holder[0](x)
    assert type(holder[0]).__name__ == "RealLayer"
    assert (real - simulated).abs().max() <= 1e-4 * simulated.abs().max()


# ------------------------------------------------------------------------------------------------ decisions


@pytest.fixture(scope="module")
def tiny_twin_w8a8(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, Path]:
    loaded = load_model_folder("fmnist-tiny-twin")
    config = QuantConfig.from_scheme("w8a8", **SMALL_CALIB)
    quantize(loaded.denoiser, loaded.scheduler_config, config, runtime="simulated")
    folder = save_quantized(loaded, tmp_path_factory.mktemp("twin") / "q")
    return loaded, folder


def test_detection_handles_every_injected_layer_and_reports_why(tiny_twin_w8a8: tuple[LoadedModel, Path]) -> None:
    loaded, _ = tiny_twin_w8a8
    info = quant_state(loaded.denoiser.model).calibration
    changed = {d["layer"]: d for d in info["outliers"]["changed"]}
    spec = TWINS["fmnist-tiny-twin"]
    for p in spec.pathologies:
        if p.kind == "outliers":
            decision = changed[p.layer]
            assert decision["choice"] != "static" and "channel max/median" in decision["reason"]
            assert decision["sqnr_db"][decision["choice"]] > decision["sqnr_db"]["static"] + 15
    drift = [changed[n] for n in spec.layers("drift") if n in changed and n not in spec.layers("outliers")]
    assert drift and all("drifts" in d["reason"] for d in drift)


def test_handling_and_guard_rescue_the_twin(tiny_twin_w8a8: tuple[LoadedModel, Path]) -> None:
    loaded, _ = tiny_twin_w8a8
    inputs = _eval(loaded)
    fp = _out(load_model_folder("fmnist-tiny-twin"), inputs)
    plain = load_model_folder("fmnist-tiny-twin")
    config = QuantConfig.from_scheme("w8a8", outliers="off", guard_db=0, **SMALL_CALIB)
    quantize(plain.denoiser, plain.scheduler_config, config, runtime="simulated")
    handled, broken = _psnr(_out(loaded, inputs), fp), _psnr(_out(plain, inputs), fp)
    assert broken < 20 and handled > broken + 15
    guard = quant_state(loaded.denoiser.model).calibration["guard"]
    assert guard["after_db"] >= guard["before_db"]
    assert guard["within_budget"] == (guard["weight_only_db"] - guard["after_db"] <= guard["budget_db"])
    config = quant_state(loaded.denoiser.model).config
    assert all(m["layer"] in config.fp_inputs for m in guard["fp_input_layers"])


def test_treated_twin_folder_loads_with_its_hooks_and_treatments(tiny_twin_w8a8: tuple[LoadedModel, Path]) -> None:
    loaded, folder = tiny_twin_w8a8
    inputs = _eval(loaded)
    back = load_quantized(folder, runtime="simulated")
    assert torch.equal(_out(back, inputs), _out(loaded, inputs))
    assert quant_state(back.denoiser.model).config == quant_state(loaded.denoiser.model).config
    treated = [n for n, m in quant_layers(back.denoiser.model) if m.input_treatment.active]
    assert set(treated) >= set(TWINS["fmnist-tiny-twin"].layers("outliers"))
    real = load_quantized(folder)
    assert _psnr(_out(real, inputs), _out(back, inputs)) > 35


def test_sensitivity_report_finds_the_injected_layers() -> None:
    loaded = load_model_folder("fmnist-tiny-twin")
    config = QuantConfig.from_scheme("w8a8", outliers="off", guard_db=0, **SMALL_CALIB)
    quantize(loaded.denoiser, loaded.scheduler_config, config, runtime="simulated")
    data = collect_calibration(loaded.denoiser, loaded.scheduler_config, n_steps=3, n_per_step=4,
                               num_inference_steps=10, seed=3)
    rows, headline = input_sensitivity(loaded.denoiser, data, per="layer")
    injected = set(TWINS["fmnist-tiny-twin"].layers("outliers"))
    assert {r.unit for r in rows[:3]} <= injected
    assert headline["all_inputs_db"] <= rows[0].psnr_db + 1e-6
    blocks, _ = input_sensitivity(loaded.denoiser, data, per="block")
    assert blocks[0].unit == block_of(rows[0].unit)
    assert set(blocks[0].by_t) == {"high noise", "mid", "low noise"}


def test_outlier_mode_and_guard_are_validated() -> None:
    with pytest.raises(ConfigError, match="outlier handling"):
        QuantConfig.from_scheme("w8a8", outliers="maybe")
    with pytest.raises(ConfigError, match="--guard-db nan must be a finite number"):
        QuantConfig.from_scheme("w8a8", guard_db=float("nan"))
    assert QuantConfig.from_scheme("w8a8").guard_db == 3.0
    assert QuantConfig.from_scheme("w4a4").guard_db == 0.0
    assert QuantConfig.from_scheme("w4a4-g32").method == "gptq"  # the recommended W4A4 recipe
    assert QuantConfig.from_scheme("w8a8").method == "minmax" and QuantConfig.from_scheme("w8a8", "mse").method == "mse"
    with pytest.raises(ConfigError, match="rank"):
        QuantConfig.from_scheme("w4a4-g32", lowrank_rank=-1)
    config = QuantConfig.from_scheme("w8a8", dynamic_layers=("a.b",))
    assert QuantConfig.from_dict(config.to_dict()) == config and config.is_dynamic("a.b")


# ------------------------------------------------------------------------------------------------ command line


def test_quantize_info_and_sensitivity_commands_report_the_decisions(run, tmp_path: Path) -> None:  # noqa: F811
    flags = ("--calib-steps", 3, "--calib-per-step", 4, "--calib-inference-steps", 10, "--lowrank-rank", 2)
    res = run("quantize", "fmnist-tiny-twin", "--out", tmp_path / "q", *flags)
    assert res.code == 0, res.stderr
    assert "outliers:" in res.stdout and "up_blocks.1.resnets.1.conv_shortcut" in res.stdout
    assert "guard:" in res.stdout
    res = run("info", tmp_path / "q")
    assert res.code == 0, res.stderr
    assert "outliers:" in res.stdout and "channel max/median" in res.stdout
    back = load_quantized(tmp_path / "q", runtime="simulated")
    assert any(m.input_treatment.lowrank_up is not None for _, m in quant_layers(back.denoiser.model))
    res = run("sensitivity", "fmnist-tiny-twin", "--num", 1, "--json", tmp_path / "s.json",
              "--calib-steps", 3, "--calib-per-step", 4, "-q")
    assert res.code == 0, res.stderr
    top = res.stdout.splitlines()[3].split()[0]
    assert top in {block_of(n) for n in TWINS["fmnist-tiny-twin"].layers("outliers")}, res.stdout
    assert (tmp_path / "s.json").is_file()
    res = run("sensitivity", "fmnist-tiny-twin", "--per", "channel", "-q")
    assert res.code == 2 and "--per 'channel' unknown" in res.stderr
    res = run("quantize", "fmnist-tiny", "--out", tmp_path / "x", "--outliers", "sometimes", "-q")
    assert res.code == 2 and "outlier handling 'sometimes' unknown" in res.stderr and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ per-group A4


def test_grouped_int4_activations_match_hand_computed_values() -> None:
    from qdiffuse.nn.quantizer import ActivationQuantizer

    spec = FormatSpec(kind="int", bits=4, symmetric=False, granularity="group", group_size=4)
    q = ActivationQuantizer(spec, block_dim=-1)
    assert not q.needs_calibration and q.calibrated
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 40.0, -5.0]])
    step = 40.0 / 15  # second group: range [0, 40] on 16 codes
    expected = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4 * step, 8 * step, 11 * step, 40.0, -5.0]])
    assert torch.allclose(q(x), expected, atol=1e-5)  # third group: one value, padded with zeros: -5 exact
    conv_q = ActivationQuantizer(spec, block_dim=1)
    image = torch.randn(2, 8, 3, 3)
    per_pixel = conv_q(image)
    manual = q(image.movedim(1, -1)).movedim(-1, 1)
    assert torch.equal(per_pixel, manual)


def test_grouped_scheme_runs_on_the_fallback_and_says_so() -> None:
    loaded = load_model_folder("fmnist-dit")
    config = QuantConfig.from_scheme("w4a4-g32", **SMALL_CALIB)
    quantize(loaded.denoiser, loaded.scheduler_config, config)
    from qdiffuse.kernels import runtime_report

    report = runtime_report(loaded.denoiser.model)
    assert report.attention and "not per tensor" in report.attention
    assert any("dequant-fallback" in k for k in report.kernel_counts())
    with pytest.raises(ConfigError, match="per channel"):
        from qdiffuse.nn.quantizer import ActivationQuantizer

        ActivationQuantizer(FormatSpec(kind="int", bits=4, granularity="channel"))
