"""Block reconstruction (``--method qdiffusion``) on the tiny diffusers models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_dit, tiny_folder

import qdiffuse.calibration.reconstruct as recon
from qdiffuse.api import quant_state, quantize
from qdiffuse.calibration.collect import CalibrationSet
from qdiffuse.calibration.ptq import calibrate_ptq
from qdiffuse.calibration.reconstruct import ReconstructionSettings, find_units, forward_order, reconstruct
from qdiffuse.config import QuantConfig
from qdiffuse.errors import ConfigError
from qdiffuse.io import load_quantized, save_quantized
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.models.loading import LoadedModel, load_model_folder
from qdiffuse.nn.quantizer import ActivationQuantizer
from qdiffuse.nn.rewrite import quant_layers, quantize_model
from qdiffuse.progress import set_progress_enabled

set_progress_enabled(False)

FAST = {"recon_iters": 50, "recon_act_iters": 25, "recon_batch_size": 8}


def _calib(n: int, seed: int) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    return CalibrationSet(
        torch.randn(n, 1, 16, 16, generator=g),
        torch.randint(0, 1000, (n,), generator=g),
        torch.randint(0, 3, (n,), generator=g),
    )


def _eps(denoiser: Denoiser, data: CalibrationSet) -> torch.Tensor:
    with torch.no_grad():
        return denoiser.forward_raw(data.x, data.t, data.labels)


def _dit_noisy() -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_dit()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _ptq_dit(calib: CalibrationSet) -> tuple[torch.nn.Module, Denoiser]:
    """(FP copy, RTN-quantized w4a8 denoiser) of the tiny DiT."""
    model = _dit_noisy()
    fp = copy.deepcopy(model)
    denoiser = Denoiser.from_model(model)
    quantize_model(model, QuantConfig.from_scheme("w4a8", method="mse"))
    calibrate_ptq(denoiser, calib, batch_size=16)
    return fp, denoiser


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {f"{n}.weight": m.weight.detach().clone() for n, m in quant_layers(model)}
    for name, module in model.named_modules():
        if isinstance(module, ActivationQuantizer) and module.scale is not None:
            out[f"{name}.scale"] = module.scale.detach().clone()
    return out


# ------------------------------------------------------------------------------------------------- units


def test_units_follow_forward_order_and_cover_every_layer() -> None:
    calib = _calib(4, 1)
    _, denoiser = _ptq_dit(calib)
    names = find_units(denoiser.model)
    order = forward_order(denoiser, names, (calib.x[:2], calib.t[:2], calib.labels[:2], None))
    assert order[:2] == ["pos_embed.proj", "transformer_blocks.0"]
    assert "transformer_blocks.1" in order and order.index("transformer_blocks.1") > order.index("transformer_blocks.0")
    assert all(not n.startswith("transformer_blocks.0.") for n in order)  # a block's layers go with the block
    covered = {n for n, _ in quant_layers(denoiser.model) if any(n == u or n.startswith(u + ".") for u in order)}
    assert covered == {n for n, _ in quant_layers(denoiser.model)}
    assert set(find_units(denoiser.model, "layer")) == {n for n, _ in quant_layers(denoiser.model)}


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="blocks"):
        ReconstructionSettings(blocks="stage")
    with pytest.raises(ConfigError, match="iterations"):
        ReconstructionSettings(iters=-1)
    with pytest.raises(ConfigError, match="recon-iters"):
        QuantConfig.from_scheme("w4a8", method="qdiffusion", recon_batch_size=0)
    for bad, match in (
        ({"recon_max_samples": 0}, "calibration row"),
        ({"recon_lr_round": 0.0}, "--recon-lr 0 is out of range"),
        ({"recon_beta": (20.0,)}, "beta"),
        ({"recon_warmup": 1.0}, "warm-up"),
        ({"recon_blocks": "stage"}, "auto or layer"),
    ):
        with pytest.raises(ConfigError, match=match):
            QuantConfig.from_scheme("w4a8", method="qdiffusion", **bad)


def test_config_round_trip_and_backward_compatible() -> None:
    config = QuantConfig.from_scheme("w4a8", method="qdiffusion", recon_iters=7, recon_checkpoint_dir="/tmp/x")
    assert config.observer == "mse"
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    old = QuantConfig.from_scheme("w8a8").to_dict()
    for key in ("recon_iters", "recon_act_iters", "recon_batch_size", "recon_checkpoint_dir"):
        old.pop(key)
    assert QuantConfig.from_dict(old).recon_iters == 500
    tuned = QuantConfig.from_scheme("w4a8", method="qdiffusion+ptqd", recon_beta=(10.0, 1.0), recon_blocks="layer")
    assert tuned.reconstructs and tuned.corrects_noise
    assert QuantConfig.from_dict(json.loads(json.dumps(tuned.to_dict()))) == tuned


# ------------------------------------------------------------------------------------------ learned rounding


def test_learned_rounding_lowers_the_block_error_it_started_from() -> None:
    calib = _calib(16, 1)
    fp, denoiser = _ptq_dit(calib)
    # no safety net: the learned rounding alone must beat round-to-nearest on each transformer block
    settings = ReconstructionSettings(iters=80, act_iters=0, batch_size=8, keep_best=False)
    results = {r.name: r for r in reconstruct(fp, denoiser, calib, settings)}
    for name in ("transformer_blocks.0", "transformer_blocks.1"):
        assert results[name].loss < results[name].loss_rtn, results[name]
    # with the safety net (default) no unit ever ends worse than it started
    fp, denoiser = _ptq_dit(calib)
    results = reconstruct(fp, denoiser, calib, ReconstructionSettings(iters=30, act_iters=15, batch_size=8))
    assert all(r.loss <= r.loss_rtn for r in results)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calib = _calib(16, 1)
    fp, denoiser = _ptq_dit(calib)
    start = copy.deepcopy(denoiser.model)
    settings = ReconstructionSettings(iters=12, act_iters=6, batch_size=8)
    reconstruct(fp, denoiser, calib, settings)
    expected = _state(denoiser.model)

    ckpt = tmp_path / "ckpt"
    resumed = Denoiser.from_model(copy.deepcopy(start))
    real = recon._reconstruct_unit
    calls = {"n": 0}

    def crash_after_two(*args: object, **kwargs: object) -> recon.UnitResult:
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(recon, "_reconstruct_unit", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(fp, resumed, calib, ReconstructionSettings(**{**settings.fingerprint(), "checkpoint_dir": ckpt}))
    assert sorted(p.name for p in ckpt.iterdir()) == ["block_000.safetensors", "block_001.safetensors", recon.MANIFEST]
    monkeypatch.setattr(recon, "_reconstruct_unit", real)

    resumed = Denoiser.from_model(copy.deepcopy(start))
    results = reconstruct(
        fp, resumed, calib, ReconstructionSettings(**{**settings.fingerprint(), "checkpoint_dir": ckpt})
    )
    assert [r.resumed for r in results[:3]] == [True, True, False]
    got = _state(resumed.model)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), [
        k for k in expected if not torch.equal(got[k], expected[k])
    ]

    other = ReconstructionSettings(**{**settings.fingerprint(), "iters": 13, "checkpoint_dir": ckpt})
    with pytest.raises(ConfigError, match="other settings"):
        reconstruct(fp, Denoiser.from_model(copy.deepcopy(start)), calib, other)


# ---------------------------------------------------------------------------------------------- end to end

_CACHE: dict[str, tuple[LoadedModel, float, float]] = {}


def _end_to_end(kind: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, float, float]:
    """(qdiffusion-quantized model, its ε MSE to FP, the mse-method ε MSE) on held-out inputs, at w4a8."""
    if kind not in _CACHE:
        folder = tiny_folder(kind, tmp_path_factory)
        calib, test = _calib(24, 1), _calib(16, 2)
        reference = _eps(load_model_folder(folder).denoiser, test)
        errors = {}
        for method in ("mse", "qdiffusion"):
            loaded = load_model_folder(folder)
            config = QuantConfig.from_scheme("w4a8", method=method, **FAST)
            quantize(loaded.denoiser, loaded.scheduler_config, config, calib=calib, runtime="simulated")
            errors[method] = float((_eps(loaded.denoiser, test) - reference).pow(2).mean())
        _CACHE[kind] = (loaded, errors["qdiffusion"], errors["mse"])
    return _CACHE[kind]


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_qdiffusion_is_not_worse_than_mse(kind: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    loaded, err_q, err_mse = _end_to_end(kind, tmp_path_factory)
    assert err_q <= err_mse, (err_q, err_mse)
    state = quant_state(loaded.denoiser.model)
    assert state.config.method == "qdiffusion" and state.calibration["reconstruction"]["units"] > 0


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_reconstructed_weights_lie_on_the_grid(
    kind: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    loaded, _, _ = _end_to_end(kind, tmp_path_factory)
    for name, layer in quant_layers(loaded.denoiser.model):
        for q, part in zip(layer.weight_quantizers, layer.weight_parts(layer.weight.detach()), strict=True):
            assert torch.equal(q.decode(q.encode(part), part.shape), part), name
            assert torch.equal(q(part), part), name
    inputs = _calib(6, 3)
    expected = _eps(loaded.denoiser, inputs)
    back = load_quantized(save_quantized(loaded, tmp_path / "q"), runtime="simulated")
    assert torch.equal(_eps(back.denoiser, inputs), expected)
