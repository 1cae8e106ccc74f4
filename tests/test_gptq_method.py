"""The gptq methods end to end: lower error than round-to-nearest, weights on the grid, exact save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import tiny_folder
from torch import nn

import qdiffuse.calibration.ptq as ptq
from qdiffuse.api import quant_state, quantize
from qdiffuse.calibration.collect import CalibrationSet, collect_calibration
from qdiffuse.calibration.gptq import HessianAccumulator
from qdiffuse.config import QuantConfig
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.io import load_quantized, save_quantized
from qdiffuse.models.loading import LoadedModel, load_model_folder
from qdiffuse.nn.layers import QuantConv2d, QuantLinear
from qdiffuse.nn.rewrite import quant_layers
from qdiffuse.progress import set_progress_enabled

set_progress_enabled(False)

INT4_CH = FormatSpec(kind="int", bits=4, symmetric=True, granularity="channel")


def _collect(loaded: LoadedModel, seed: int) -> CalibrationSet:
    return collect_calibration(
        loaded.denoiser, loaded.scheduler_config, n_steps=4, n_per_step=8, num_inference_steps=8, seed=seed
    )


def _eps(loaded: LoadedModel, data: CalibrationSet) -> torch.Tensor:
    with torch.no_grad():
        return loaded.denoiser.forward_raw(data.x, data.t, data.labels, data.cond)


_CACHE: dict[str, object] = {}


def _end_to_end(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The tiny UNet at w4a16 by mse and by gptq: both models, their ε MSE to FP on held-out inputs."""
    if not _CACHE:
        folder = tiny_folder("unet", tmp_path_factory)
        fp = load_model_folder(folder)
        calib, test = _collect(fp, 0), _collect(fp, 1)
        reference = _eps(fp, test)
        for method in ("mse", "gptq"):
            loaded = load_model_folder(folder)
            config = QuantConfig.from_scheme("w4a16", method=method)
            quantize(loaded.denoiser, loaded.scheduler_config, config, calib=calib, runtime="simulated")
            _CACHE[method] = loaded
            _CACHE[f"err_{method}"] = float((_eps(loaded, test) - reference).pow(2).mean())
        _CACHE["test"] = test
    return _CACHE


def test_config_of_the_gptq_methods() -> None:
    for method in ("gptq", "gptq+ptqd"):
        config = QuantConfig.from_scheme("w4a8", method=method)
        assert config.uses_gptq and config.observer == "mse" and not config.reconstructs
        assert config.corrects_noise == (method == "gptq+ptqd")
    assert not QuantConfig.from_scheme("w4a8", method="mse").uses_gptq


def test_gptq_beats_round_to_nearest(tmp_path_factory: pytest.TempPathFactory) -> None:
    run = _end_to_end(tmp_path_factory)
    print(f"tiny UNet w4a16 held-out eps MSE: mse {run['err_mse']:.3e}, gptq {run['err_gptq']:.3e}")
    assert run["err_gptq"] < run["err_mse"], (run["err_gptq"], run["err_mse"])
    assert quant_state(run["gptq"].denoiser.model).config.method == "gptq"


def test_gptq_weights_lie_on_the_grid(tmp_path_factory: pytest.TempPathFactory) -> None:
    model = _end_to_end(tmp_path_factory)["gptq"].denoiser.model
    layers = list(quant_layers(model))
    assert any(len(layer.splits) == 2 for _, layer in layers), "the tiny UNet should have split skip inputs"
    for name, layer in layers:
        assert layer.weight_hardened, name
        for q, part in zip(layer.weight_quantizers, layer.weight_parts(layer.weight.detach()), strict=True):
            assert torch.equal(q.decode(q.encode(part), part.shape), part), name
            assert torch.equal(q(part), part), name


def test_gptq_model_saves_and_loads_exactly(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    run = _end_to_end(tmp_path_factory)
    loaded, test = run["gptq"], run["test"]
    back = load_quantized(save_quantized(loaded, tmp_path / "q"), runtime="simulated")
    assert torch.equal(_eps(back, test), _eps(loaded, test))
    assert quant_state(back.denoiser.model).config.method == "gptq"


def test_unsupported_weight_formats_round_to_nearest(tmp_path_factory: pytest.TempPathFactory) -> None:
    """FP8 weights have no integer grid for GPTQ: the gptq method must give exactly the mse model."""
    folder = tiny_folder("unet", tmp_path_factory)
    calib = _collect(load_model_folder(folder), 0)
    weights = {}
    for method in ("mse", "gptq"):
        loaded = load_model_folder(folder)
        config = QuantConfig.from_scheme("fp8", method=method).with_overrides(activation=None, fp_inputs=())
        quantize(loaded.denoiser, loaded.scheduler_config, config, calib=calib, runtime="simulated")
        weights[method] = {n: m.weight.detach().clone() for n, m in quant_layers(loaded.denoiser.model)}
    assert weights["mse"].keys() == weights["gptq"].keys()
    assert all(torch.equal(weights["mse"][n], weights["gptq"][n]) for n in weights["mse"])


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_split_hessians_see_the_treated_split_inputs(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per split: the Hessian of that split's channels of ``main_input(x)``, also when fed in small chunks."""
    torch.manual_seed(0)
    if kind == "conv":
        layer = QuantConv2d(nn.Conv2d(12, 8, 3, padding=1), INT4_CH, None, split_at=5)
        x = torch.randn(6, 12, 7, 7)
    else:
        layer = QuantLinear(nn.Linear(12, 8), INT4_CH, None, split_at=5)
        x = torch.randn(6, 9, 12)
    layer.treat_input(torch.rand(12) + 0.5, torch.tensor([2, 7]))
    layer.calibrate_weight()
    main = layer.input_treatment.main_input(x)
    dim = layer.channel_dim
    reference = []
    for part, channels in zip(torch.split(main, layer.splits, dim=dim), layer.splits, strict=True):
        geometry = nn.Conv2d(channels, 8, 3, padding=1) if kind == "conv" else nn.Linear(channels, 8)
        acc = HessianAccumulator(geometry)
        acc.add(part)
        reference.append(acc.hessian)
    monkeypatch.setattr(ptq, "GPTQ_CHUNK_ELEMENTS", 300)
    accs = ptq._accumulators(layer)
    handle = layer.register_forward_pre_hook(ptq._hessian_hook(accs))
    with torch.no_grad():
        layer(x)
    handle.remove()
    for acc, expected, channels in zip(accs, reference, layer.splits, strict=True):
        assert acc.hessian.shape == expected.shape == (acc.columns, acc.columns)
        assert acc.columns == channels * (9 if kind == "conv" else 1)
        assert torch.allclose(acc.hessian, expected, rtol=1e-5, atol=1e-6)


def test_hessians_over_budget_take_one_pass_per_group(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for one layer's Hessian at a time, GPTQ passes once per layer (rounding each before the next
    pass): the weights still lie on their grids and the error stays below round-to-nearest's."""
    run = _end_to_end(tmp_path_factory)
    folder = tiny_folder("unet", tmp_path_factory)
    fp = load_model_folder(folder)
    calib, test = _collect(fp, 0), run["test"]
    passes = []
    original = CalibrationSet.run_through
    monkeypatch.setattr(CalibrationSet, "run_through", lambda self, *a: (passes.append(1), original(self, *a))[1])
    monkeypatch.setattr(ptq, "HESSIAN_BUDGET", 1)
    loaded = load_model_folder(folder)
    denoiser = loaded.denoiser
    config = QuantConfig.from_scheme("w4a16", method="gptq")
    from qdiffuse.nn.rewrite import quantize_model

    quantize_model(denoiser.model, config)
    ptq.calibrate_weights_gptq(denoiser, calib, budget=1)
    layers = list(quant_layers(denoiser.model))
    assert len(passes) == sum(1 for _, layer in layers if any(ptq._accumulators(layer))) > 1
    for name, layer in layers:
        for q, part in zip(layer.weight_quantizers, layer.weight_parts(layer.weight.detach()), strict=True):
            assert torch.equal(q(part), part), name
    err = float((_eps(loaded, test) - _eps(fp, test)).pow(2).mean())
    assert err < run["err_mse"], (err, run["err_mse"])
