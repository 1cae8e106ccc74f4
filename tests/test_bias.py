"""Empirical bias correction (``--method mse+bias``): the mean error it removes, and its save/load round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import save_folder, tiny_dit, tiny_folder

from qdiffuse.api import quant_state, quantize
from qdiffuse.calibration.bias import correct_bias, fp_weights
from qdiffuse.calibration.collect import CalibrationSet, collect_calibration
from qdiffuse.calibration.ptq import calibrate_ptq
from qdiffuse.config import QuantConfig
from qdiffuse.io import load_quantized, save_quantized
from qdiffuse.models.loading import LoadedModel, load_model_folder
from qdiffuse.nn.layers import QuantLayer
from qdiffuse.nn.rewrite import quant_layers, quantize_model
from qdiffuse.progress import set_progress_enabled

set_progress_enabled(False)

SMALL = dict(calib_steps=3, calib_per_step=4, calib_num_inference_steps=4)


def _calib(loaded: LoadedModel) -> CalibrationSet:
    return collect_calibration(
        loaded.denoiser, loaded.scheduler_config, n_steps=3, n_per_step=4, num_inference_steps=4, seed=0
    )


def _mean_errors(
    loaded: LoadedModel,
    calib: CalibrationSet,
    weights: dict[str, torch.Tensor],
    biases: dict[str, torch.Tensor],
    names: list[str],
):
    """Per-channel mean of (FP layer on its FP input − quantized layer) over the calibration set; the FP layer has
    its original weight and bias."""
    sums: dict[str, torch.Tensor] = {}
    layers = dict(quant_layers(loaded.denoiser.model))

    def hook(name: str, layer: QuantLayer):
        def measure(module, args, output):
            reference = layer.op(args[0], weights[name])
            shift = layer.bias.detach() - biases[name]
            reference = reference - (shift.view(1, -1, 1, 1) if reference.ndim == 4 else shift)
            diff = reference - output
            channel = layer.channel_dim % diff.ndim
            sums.setdefault(name, []).append(diff.double().mean(dim=[d for d in range(diff.ndim) if d != channel]))

        return measure

    handles = [layers[n].register_forward_hook(hook(n, layers[n])) for n in names]
    with torch.no_grad():
        for x, t, labels, cond in calib.batches(len(calib)):  # one batch: the mean is over all of it
            loaded.denoiser.forward_raw(x, t, labels, cond)
    for h in handles:
        h.remove()
    return {n: torch.stack(v).mean(0) for n, v in sums.items()}


def test_bias_correction_zeroes_the_mean_error_of_layers_fed_by_the_input(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """conv_in and the first time-embedding layer see inputs no other correction changes, so after the correction
    their mean output error on the calibration set is zero (to float precision); before, it was not."""
    loaded = load_model_folder(tiny_folder("unet", tmp_path_factory))
    calib = _calib(loaded)
    config = QuantConfig.from_scheme("w4a4", method="mse", keep_8bit=None, **SMALL)
    quantize_model(loaded.denoiser.model, config)
    weights = fp_weights(loaded.denoiser.model)
    calibrate_ptq(loaded.denoiser, calib, batch_size=len(calib))
    names = ["conv_in", "time_embedding.linear_1"]
    layers = dict(quant_layers(loaded.denoiser.model))
    biases = {n: layers[n].bias.detach().clone() for n in names}
    before = _mean_errors(loaded, calib, weights, biases, names)
    corrections = correct_bias(loaded.denoiser, calib, weights, batch_size=5)
    after = _mean_errors(loaded, calib, weights, biases, names)
    for name in names:
        assert before[name].abs().max() > 1e-4, name
        assert after[name].abs().max() < 1e-5, name
        assert corrections[name] == pytest.approx(float(before[name].abs().max()), rel=1e-4)
    assert set(corrections) == {n for n, _ in quant_layers(loaded.denoiser.model)}


def test_bias_correction_lowers_the_network_output_bias(tmp_path_factory: pytest.TempPathFactory) -> None:
    """On the whole tiny UNet at W4A4 the mean of the predicted-noise error over the calibration set shrinks."""
    folder = tiny_folder("unet", tmp_path_factory)
    outputs = {}
    for method in ("fp", "mse", "mse+bias"):
        loaded = load_model_folder(folder)
        calib = _calib(loaded)
        if method != "fp":
            config = QuantConfig.from_scheme("w4a4", method=method, keep_8bit=None, **SMALL)
            quantize(loaded.denoiser, loaded.scheduler_config, config, calib=calib, runtime="simulated")
        with torch.no_grad():
            outputs[method] = loaded.denoiser.forward_raw(calib.x, calib.t, calib.labels, calib.cond)
    bias_mse = (outputs["mse"] - outputs["fp"]).mean().abs()
    bias_corrected = (outputs["mse+bias"] - outputs["fp"]).mean().abs()
    assert bias_corrected < bias_mse


def test_layers_without_a_bias_get_one_that_survives_save_and_load(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """A DiT without attention biases: the corrected to_q/to_k/to_v gain a bias, and the folder reloads exactly."""
    dit = tiny_dit(attention_bias=False)
    folder = save_folder(dit, tmp_path / "fp")
    loaded = load_model_folder(folder)
    assert loaded.denoiser.model.transformer_blocks[0].attn1.to_q.bias is None
    config = QuantConfig.from_scheme("w4a8", method="mse+bias", **SMALL)
    quantize(loaded.denoiser, loaded.scheduler_config, config, runtime="simulated")
    to_q = loaded.denoiser.model.transformer_blocks[0].attn1.to_q
    assert isinstance(to_q, QuantLayer) and to_q.bias is not None and to_q.bias.abs().sum() > 0
    assert quant_state(loaded.denoiser.model).calibration["bias_correction"]["layers"] > 0
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([900, 10])
    labels = torch.tensor([0, 4])  # a class and the null class
    with torch.no_grad():
        expected = loaded.denoiser.forward_raw(x, t, labels)
    back = load_quantized(save_quantized(loaded, tmp_path / "q"), runtime="simulated")
    with torch.no_grad():
        got = back.denoiser.forward_raw(x, t, labels)
    assert torch.equal(got, expected)
    assert quant_state(back.denoiser.model).config.method == "mse+bias"


def test_missing_fp_weights_are_refused(tmp_path_factory: pytest.TempPathFactory) -> None:
    loaded = load_model_folder(tiny_folder("unet", tmp_path_factory))
    calib = _calib(loaded)
    quantize_model(loaded.denoiser.model, QuantConfig.from_scheme("w8a8", **SMALL))
    with pytest.raises(ValueError, match="no FP weights"):
        correct_bias(loaded.denoiser, calib, {})
