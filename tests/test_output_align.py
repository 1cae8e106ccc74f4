"""Network-level alignment after block reconstruction: it lowers its own loss, leaves every integer code where the
block stage put it, and runs through ``quantize`` into the real runtime."""

from __future__ import annotations

import copy
import json

import diffusers
import pytest
import torch
from tiny_models import tiny_unet

from qdiffuse.api import quant_state, quantize
from qdiffuse.calibration.output_align import OutputAlignSettings, align_outputs, gain_eligible
from qdiffuse.calibration.ptq import calibrate_ptq
from qdiffuse.calibration.reconstruct import ReconstructionSettings
from qdiffuse.calibration.trajectory import collect_trajectory
from qdiffuse.config import QuantConfig
from qdiffuse.errors import ConfigError
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.nn.layers import QuantLayer
from qdiffuse.nn.rewrite import quantize_model
from qdiffuse.progress import set_progress_enabled

set_progress_enabled(False)

CONFIG = json.loads(diffusers.DDPMScheduler(clip_sample=False).to_json_string())
META = {"num_classes": 3, "null_class": 3}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m = tiny_unet(4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return m.eval()


def test_output_alignment_lowers_its_loss_and_keeps_the_codes(model: torch.nn.Module) -> None:
    fp = Denoiser.from_model(copy.deepcopy(model), META)
    denoiser = Denoiser.from_model(copy.deepcopy(model), META)
    traj = collect_trajectory(fp, CONFIG, "dpm++2m", 6, n_per_step=4, guidance=2.0)
    quantize_model(denoiser.model, QuantConfig.from_scheme("w4a8", method="mota", calib_sampler="dpm++2m",
                                                           outliers="off"))
    calibrate_ptq(denoiser, traj.calib, 64)
    layers = [m for m in denoiser.model.modules() if isinstance(m, QuantLayer)]
    eligible = [m for m in layers if gain_eligible(m)]
    assert eligible, "w4a8's per-channel INT4 weights take a gain"
    with torch.no_grad():
        before = {id(m): m.effective_weight().clone() for m in eligible}
    objective = ReconstructionSettings(block_weight=1.0, align_weight=1.0, cos_weight=0.1)
    result = align_outputs(denoiser, fp, traj.calib, objective, OutputAlignSettings(iters=80, lr=1e-2),
                           traj.aligned)
    assert result.kept
    assert result.loss_after < 0.99 * result.loss_before
    assert result.gained_layers == len(eligible) and result.act_scales > 0
    assert result.max_gain_change > 0
    with torch.no_grad():
        for m in eligible:
            # on the (new) grid: quantizing the weight again changes nothing, and its stored codes decode to it
            assert torch.equal(m.quantized_weight(), m.weight)
            for q, part in zip(m.weight_quantizers, m.weight_parts(m.weight.detach()), strict=True):
                assert torch.equal(q.decode(q.encode(part), part.shape), part)
            # one factor per output channel: the integer codes are the ones before the stage
            old, new = before[id(m)].flatten(1), m.weight.flatten(1)
            nz = old.abs() > 0
            ratio = torch.where(nz, new / torch.where(nz, old, torch.ones_like(old)), torch.nan)
            spread = torch.nan_to_num(ratio.nan_to_num(0).amax(1) - torch.where(nz, ratio, torch.inf).amin(1), 0.0)
            assert float(spread.abs().max()) < 1e-5


def test_output_alignment_without_iterations_changes_nothing(model: torch.nn.Module) -> None:
    fp = Denoiser.from_model(copy.deepcopy(model), META)
    denoiser = Denoiser.from_model(copy.deepcopy(model), META)
    traj = collect_trajectory(fp, CONFIG, "dpm++2m", 4, n_per_step=2, guidance=2.0)
    quantize_model(denoiser.model, QuantConfig.from_scheme("w8a8", outliers="off"))
    calibrate_ptq(denoiser, traj.calib, 64)
    state = copy.deepcopy(denoiser.model.state_dict())
    result = align_outputs(denoiser, fp, traj.calib, ReconstructionSettings(), OutputAlignSettings(iters=0))
    assert not result.kept and result.loss_after == result.loss_before
    for key, value in denoiser.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_quantize_runs_the_stage_and_records_it(model: torch.nn.Module) -> None:
    config = QuantConfig.from_scheme(
        "w4a8", method="mota", calib_sampler="dpm++2m", calib_num_inference_steps=4, calib_per_step=2,
        recon_iters=10, recon_act_iters=5, recon_output_iters=10, recon_output_lr=1e-2, outliers="off",
    )
    q = quantize(Denoiser.from_model(copy.deepcopy(model), META), CONFIG, config, guidance=2.0)
    stage = quant_state(q).calibration["reconstruction"]["output_alignment"]
    assert stage["iters"] == 10 and stage["loss_after"] <= stage["loss_before"]
    with torch.no_grad():
        out = Denoiser.from_model(q, META)(torch.randn(2, 1, 16, 16), torch.tensor([500, 500]), torch.tensor([0, 1]))
    assert torch.isfinite(out).all()


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="--recon-output-iters"):
        QuantConfig.from_scheme("w4a8", method="qdiffusion", recon_output_iters=-1)
    with pytest.raises(ConfigError, match="--recon-output-lr"):
        QuantConfig.from_scheme("w4a8", method="qdiffusion", recon_output_lr=0.0)


def test_align_at_output_keeps_the_blocks_plain(model: torch.nn.Module) -> None:
    """``--mota-align-at output``: the block stage fits the plain target, the output stage the higher-order one;
    the manifest says which."""
    config = QuantConfig.from_scheme(
        "w4a8", method="mota", calib_sampler="dpm++2m", calib_num_inference_steps=4, calib_per_step=2,
        recon_iters=5, recon_act_iters=0, recon_output_iters=5, mota_align_at="output", outliers="off",
    )
    q = quantize(Denoiser.from_model(copy.deepcopy(model), META), CONFIG, config, guidance=2.0)
    assert quant_state(q).calibration["mota"]["align_at"] == "output"
    assert "output_alignment" in quant_state(q).calibration["reconstruction"]
    with pytest.raises(ConfigError, match="--recon-output-iters > 0"):
        QuantConfig.from_scheme("w4a8", method="mota", calib_sampler="dpm++2m", mota_align_at="output",
                                recon_output_iters=0)
    with pytest.raises(ConfigError, match="--mota-align-at 'middle' unknown"):
        QuantConfig.from_scheme("w4a8", method="mota", calib_sampler="dpm++2m", mota_align_at="middle")


def test_mota_aligns_at_the_output_by_default() -> None:
    """``mota`` runs the network-output stage with its higher-order terms there unless told otherwise; without
    the stage it aligns the blocks; other methods run no output stage unless asked."""
    from qdiffuse.config import MOTA_OUTPUT_ITERS

    default = QuantConfig.from_scheme("w4a8", method="mota", calib_sampler="dpm++2m")
    assert (default.recon_output_iters, default.mota_align_at) == (MOTA_OUTPUT_ITERS, "output")
    blocks = QuantConfig.from_scheme("w4a8", method="mota+ptqd", calib_sampler="dpm++2m", recon_output_iters=0)
    assert (blocks.recon_output_iters, blocks.mota_align_at) == (0, "blocks")
    both = QuantConfig.from_scheme("w4a8", method="mota", calib_sampler="dpm++2m", mota_align_at="both")
    assert (both.recon_output_iters, both.mota_align_at) == (MOTA_OUTPUT_ITERS, "both")
    assert QuantConfig.from_scheme("w4a8", method="qdiffusion").recon_output_iters == 0
