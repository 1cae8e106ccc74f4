"""Every sampler on linear, scaled-linear and cosine schedules: the same trajectory as diffusers' own scheduler built
``from_config``, and a sound sample distribution from a near-exact denoiser on every schedule and spacing."""

from __future__ import annotations

import json
import math
import warnings

import diffusers
import pytest
import torch
from tiny_models import tiny_unet

from qdiffuse.errors import ConfigError, QDiffuseWarning
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.progress import set_progress_enabled
from qdiffuse.sampling.loop import SampleRequest, batch_generator, sample
from qdiffuse.sampling.schedulers import SAMPLERS, check_conditioning, make_scheduler

set_progress_enabled(False)

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

# what each sampler is, written out here rather than read from the module under test
REFERENCE = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": False}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpm++2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++3s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
}


def saved_config(beta_schedule: str, **overrides: object) -> dict:
    """A model folder's scheduler config as ``DDPMScheduler.save_pretrained`` writes it (the JSON round trip drops
    diffusers' in-memory record of which values were defaults, so every saved value is the model's own)."""
    kwargs = {"beta_schedule": beta_schedule, "clip_sample": False, **overrides}
    if beta_schedule == "scaled_linear":
        kwargs.update(beta_start=0.00085, beta_end=0.012)
    return json.loads(diffusers.DDPMScheduler(**kwargs).to_json_string())


def reference_scheduler(name: str, config: dict) -> object:
    class_name, extra = REFERENCE[name]
    extra = dict(extra)
    if "DPMSolver" in class_name and config["beta_schedule"] == "squaredcos_cap_v2":
        extra["lambda_min_clipped"] = -5.1  # diffusers' documented setting for cosine schedules
    return getattr(diffusers, class_name).from_config(config, **extra)


def test_every_sampler_is_covered() -> None:
    assert set(SAMPLERS) == set(REFERENCE)


@pytest.fixture(scope="module")
def unet() -> Denoiser:
    model = tiny_unet(None)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return Denoiser.from_model(model.eval())


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", list(REFERENCE))
def test_sampler_follows_diffusers_from_config(unet: Denoiser, name: str, schedule: str) -> None:
    config = saved_config(schedule)
    steps = 6
    ours, _ = sample(unet, config, SampleRequest(num=2, steps=steps, sampler=name, seed=3))

    scheduler = reference_scheduler(name, config)
    scheduler.set_timesteps(steps)
    gen = batch_generator(3, 0)
    x = torch.randn((2, *unet.sample_shape), generator=gen) * scheduler.init_noise_sigma
    kwargs = {"generator": gen} if name in ("ddpm", "ddim", "euler", "dpm++2m", "dpm++3m") else {}
    if name == "ddim":
        kwargs["eta"] = 0.0
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(x, t)
            eps = unet.model(model_in, t.expand(2)).sample
            x = scheduler.step(eps, t, x, **kwargs).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- a near-exact denoiser


DATA_MEAN, DATA_STD = 0.3, 0.5


def oracle_eps(x: torch.Tensor, alpha_bar: float, rel_error: torch.Tensor) -> torch.Tensor:
    """E[ε | x_t] for data N(DATA_MEAN, DATA_STD²), plus a fixed small relative error like a trained network's."""
    a, s2 = alpha_bar, DATA_STD**2
    eps = math.sqrt(1 - a) * (x - math.sqrt(a) * DATA_MEAN) / (a * s2 + 1 - a)
    return eps * (1 + rel_error)


def _alpha_bar(scheduler: object, t: torch.Tensor) -> float:
    return float(scheduler.alphas_cumprod[int(round(float(t)))])


SAMPLED = ["ddim", "dpm++2m", "dpm++3m", "dpm++2s", "dpm++3s", "unipc", "pndm", "euler"]


def _sample_gaussian(name: str, config: dict, steps: int = 10) -> torch.Tensor:
    scheduler = make_scheduler(name, config)
    scheduler.set_timesteps(steps)
    check_conditioning(name, scheduler)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 1, 1, 1, generator=gen) * scheduler.init_noise_sigma
    rel_error = torch.randn(x.shape, generator=gen) * 0.01
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(oracle_eps(model_in, _alpha_bar(scheduler, t), rel_error), t, x).prev_sample
    return x


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", SAMPLED)
def test_near_exact_denoiser_samples_the_data_or_is_warned(name: str, schedule: str, spacing: str) -> None:
    """The reported failure: on a cosine schedule, samplers that start at t ≈ T where ᾱ ≈ 0 turn a network's
    small error into saturated images. Gaussian data have an exact ε; with 1% error on it, every sampler at 10 steps
    lands on the data's mean and spread, except where it starts ill-conditioned, and exactly there the user is
    warned: cosine schedules with linspace/trailing spacing for the samplers diffusers gives no λ clip."""
    ill = schedule == "squaredcos_cap_v2" and spacing != "leading" and not name.startswith("dpm")
    config = saved_config(schedule, timestep_spacing=spacing)
    if ill:
        with pytest.warns(QDiffuseWarning, match="timestep_spacing"):
            _sample_gaussian(name, config)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", QDiffuseWarning)
        x = _sample_gaussian(name, config)
    assert torch.isfinite(x).all()
    assert float(x.mean()) == pytest.approx(DATA_MEAN, abs=0.05)
    assert 0.6 * DATA_STD < float(x.std()) < 1.2 * DATA_STD  # 10-step ODE solvers under-disperse a little


def test_the_warned_cases_do_saturate() -> None:
    """The warning is not noise: DDIM from t = 999 of a cosine schedule spreads the 0.5-wide data over ±14."""
    with pytest.warns(QDiffuseWarning):
        x = _sample_gaussian("ddim", saved_config("squaredcos_cap_v2", timestep_spacing="trailing"))
    assert float(x.std()) > 20 * DATA_STD


def test_model_settings_are_carried_over() -> None:
    config = saved_config("linear", timestep_spacing="trailing", steps_offset=0)
    for name in ("ddim", "dpm++2m", "unipc", "euler"):
        scheduler = make_scheduler(name, config)
        assert scheduler.config.timestep_spacing == "trailing"
        scheduler.set_timesteps(10)
        assert int(scheduler.timesteps[0]) == 999


def test_cosine_schedule_clips_lambda_unless_the_config_says() -> None:
    assert make_scheduler("dpm++2m", saved_config("squaredcos_cap_v2")).config.lambda_min_clipped == -5.1
    assert make_scheduler("dpm++2m", saved_config("linear")).config.lambda_min_clipped == -math.inf
    own = dict(saved_config("squaredcos_cap_v2"), lambda_min_clipped=-4.0)
    assert make_scheduler("dpm++2s", own).config.lambda_min_clipped == -4.0


def test_unknown_sampler_names_every_sampler() -> None:
    with pytest.raises(ConfigError, match="dpm\\+\\+3m"):
        make_scheduler("heun++", saved_config("linear"))
