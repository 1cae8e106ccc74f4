"""PTQD: statistics recovered on synthetic noise, exact variance bookkeeping, hooks that change nothing when off."""

from __future__ import annotations

import math

import pytest
import torch

from qdiffuse.noise.correction import PTQDCorrector, PTQDOptions
from qdiffuse.noise.schedule import probe_step, scaled_noise
from qdiffuse.noise.stats import NoiseStats, StepAccumulator
from qdiffuse.sampling.schedulers import make_scheduler

SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}


def synthetic_step(k: float, mu: list[float], sigma: float, batches: int = 4) -> tuple[StepAccumulator, list]:
    gen = torch.Generator().manual_seed(1)
    acc = StepAccumulator(channels=len(mu))
    for _ in range(batches):
        eps = torch.randn(64, len(mu), 16, 16, generator=gen)
        resid = torch.randn(eps.shape, generator=gen) * sigma
        delta = k * eps + torch.tensor(mu).view(1, -1, 1, 1) + resid
        acc.update(eps, eps + delta)
    return acc


@pytest.mark.parametrize("k,mu,sigma", [(0.05, [0.02, -0.03], 0.1), (0.0, [0.0], 0.2), (0.3, [0.1, 0.0, -0.1], 0.05)])
def test_statistics_recover_known_noise(k: float, mu: list[float], sigma: float) -> None:
    step, resid = synthetic_step(k, mu, sigma).finish(timestep=500, snr_f=1.0)
    assert step.k == pytest.approx(k, abs=0.01)
    assert step.mu == pytest.approx(mu, abs=0.01)
    assert step.sigma_q == pytest.approx(sigma, rel=0.02)
    assert step.normality_p > 1e-3  # Gaussian residual: not rejected
    assert len(resid) > 100


def test_negative_correlation_is_clipped() -> None:
    gen = torch.Generator().manual_seed(2)
    acc = StepAccumulator(channels=1)
    eps = torch.randn(256, 1, 8, 8, generator=gen)
    acc.update(eps, eps - 0.2 * eps + 0.05 * torch.randn(eps.shape, generator=gen))
    step, _ = acc.finish(timestep=10, snr_f=1.0)
    assert step.k_raw == pytest.approx(-0.2, abs=0.01)
    assert step.k == 0.0
    assert step.sigma_q == pytest.approx(math.sqrt(0.2**2 + 0.05**2), rel=0.03)  # residual keeps the -0.2 eps


def test_uniform_residual_fails_the_normality_test() -> None:
    gen = torch.Generator().manual_seed(2)
    acc = StepAccumulator(channels=1)
    eps = torch.randn(256, 1, 8, 8, generator=gen)
    acc.update(eps, eps + 0.1 * eps + torch.rand(eps.shape, generator=gen) - 0.5)
    step, _ = acc.finish(timestep=10, snr_f=1.0)
    assert step.k == pytest.approx(0.1, abs=0.01)
    assert step.normality_p < 1e-3


def test_snr_q_is_signal_over_noise_energy() -> None:
    acc = StepAccumulator(channels=1)
    eps = torch.ones(2, 1, 4, 4)
    acc.update(eps, eps + 0.5)
    step, _ = acc.finish(timestep=1, snr_f=2.0)
    assert step.snr_q == pytest.approx(1 / 0.25)
    assert step.snr_f == 2.0


def test_stats_roundtrip_and_interpolation(tmp_path) -> None:
    acc_a = synthetic_step(0.1, [0.0], 0.1)
    acc_b = synthetic_step(0.3, [0.2], 0.3)
    stats = NoiseStats(settings={"sampler": "ddim", "steps": 2, "eta": 0.0, "guidance": 1.0, "num": 4, "seed": 0})
    stats.steps[900], _ = acc_a.finish(900, 0.1)
    stats.steps[100], _ = acc_b.finish(100, 10.0)
    stats.save(tmp_path / "s.json")
    loaded = NoiseStats.load(tmp_path / "s.json")
    assert loaded.to_dict() == stats.to_dict()
    exact, how = loaded.lookup(900)
    assert how == "exact" and exact.k == stats.steps[900].k
    mid, how = loaded.lookup(500)
    assert how == "interpolated"
    assert mid.k == pytest.approx((stats.steps[900].k + stats.steps[100].k) / 2)


def _ddpm_coefficients(s, t: int) -> tuple[float, float]:
    prev = int(s.previous_timestep(t))
    ac = s.alphas_cumprod
    a_prev = float(ac[prev]) if prev >= 0 else 1.0
    alpha = float(ac[t]) / a_prev
    c = -(1 - alpha) / math.sqrt(alpha * (1 - float(ac[t])))
    var = (1 - a_prev) / (1 - float(ac[t])) * (1 - alpha)
    return c, math.sqrt(var)


def _ddim_coefficients(s, t: int, eta: float) -> tuple[float, float]:
    prev = t - s.config.num_train_timesteps // s.num_inference_steps
    ac = s.alphas_cumprod
    a_t = float(ac[t])
    a_prev = float(ac[prev]) if prev >= 0 else float(s.final_alpha_cumprod)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    c = math.sqrt(1 - a_prev - sigma**2) - math.sqrt(a_prev * (1 - a_t) / a_t)
    return c, sigma


@pytest.mark.parametrize("index", [0, 10, 40])
def test_probe_matches_ddpm_formulas(index: int) -> None:
    s = make_scheduler("ddpm", SCHEDULE)
    s.set_timesteps(50)
    t = s.timesteps[index]
    x, eps = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    got = probe_step(s, t, x, eps, {})
    c, sigma = _ddpm_coefficients(s, int(t))
    assert got.c == pytest.approx(c, rel=1e-4)
    assert got.sigma == pytest.approx(sigma, rel=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_probe_matches_ddim_formulas(eta: float) -> None:
    s = make_scheduler("ddim", SCHEDULE)
    s.set_timesteps(50)
    t = s.timesteps[20]
    got = probe_step(s, t, torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4), {"eta": eta})
    c, sigma = _ddim_coefficients(s, int(t), eta)
    assert got.c == pytest.approx(c, rel=1e-4)
    assert got.sigma == pytest.approx(sigma, rel=1e-4, abs=1e-7)


def test_probe_does_not_advance_the_scheduler() -> None:
    s = make_scheduler("dpm++2m", SCHEDULE)
    s.set_timesteps(10)
    x, eps = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    before = s.step_index
    probe_step(s, s.timesteps[0], x, eps, {})
    assert s.step_index == before


def test_scaled_noise_scales_the_injected_noise_exactly() -> None:
    s = make_scheduler("ddpm", SCHEDULE)
    s.set_timesteps(20)
    t = s.timesteps[5]
    x, eps = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    outs = {}
    for factor in (0.0, 1.0, 0.5):
        gen = torch.Generator().manual_seed(3)
        with scaled_noise(s, factor):
            outs[factor] = s.step(eps, t, x, generator=gen).prev_sample
    noise = outs[1.0] - outs[0.0]
    torch.testing.assert_close(outs[0.5] - outs[0.0], 0.5 * noise)


def _stats_for(timesteps, k: float, mu: float, sigma_q: float) -> NoiseStats:
    from qdiffuse.noise.stats import StepStats

    stats = NoiseStats(settings={"sampler": "ddpm", "steps": len(timesteps), "eta": 0.0, "guidance": 1.0})
    for t in timesteps:
        stats.steps[int(t)] = StepStats(int(t), k, [mu], sigma_q, 1.0, 1.0, 0.5, k, 1)
    return stats


def test_correction_formula_and_variance_bookkeeping() -> None:
    s = make_scheduler("ddpm", SCHEDULE)
    s.set_timesteps(20)
    t = s.timesteps[3]
    corrector = PTQDCorrector(_stats_for(s.timesteps, k=0.25, mu=0.1, sigma_q=0.2))
    eps = torch.full((1, 1, 2, 2), 1.35)
    torch.testing.assert_close(corrector.eps_hook(3, t, eps), torch.full_like(eps, (1.35 - 0.1) / 1.25))
    x = torch.randn(1, 1, 2, 2)
    factor = corrector.noise_hook(3, t, s, x, eps, {})
    c, sigma = _ddpm_coefficients(s, int(t))
    expected_var = max(sigma**2 - (c * 0.2 / 1.25) ** 2, 0.0)
    assert factor == pytest.approx(math.sqrt(expected_var) / sigma, rel=1e-4)
    row = corrector.summary()["steps"][0]
    assert row["sigma_new"] ** 2 + row["quant_noise_var"] == pytest.approx(sigma**2, rel=1e-4)


def test_unabsorbable_noise_is_reported() -> None:
    s = make_scheduler("ddim", SCHEDULE)
    s.set_timesteps(10)
    corrector = PTQDCorrector(_stats_for(s.timesteps, k=0.0, mu=0.0, sigma_q=0.5))
    t = s.timesteps[2]
    factor = corrector.noise_hook(2, t, s, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), {"eta": 0.0})
    assert factor == 1.0  # DDIM eta=0 injects nothing to shrink
    assert corrector.summary()["steps_unabsorbed"] == 1


def test_corrections_off_leave_sampling_bit_identical() -> None:
    from tiny_models import tiny_unet

    from qdiffuse.models.denoiser import Denoiser
    from qdiffuse.sampling.loop import SampleRequest, sample

    model = tiny_unet(num_class_embeds=None).eval()
    den = Denoiser.from_model(model)
    request = SampleRequest(num=2, steps=4, sampler="ddpm", seed=5, batch_size=2)
    plain, _ = sample(den, SCHEDULE, request)
    s = make_scheduler("ddpm", SCHEDULE)
    s.set_timesteps(4)
    off = PTQDCorrector(
        _stats_for(s.timesteps, k=0.3, mu=0.2, sigma_q=0.5),
        PTQDOptions(correct_k=False, correct_bias=False, calibrate_variance=False),
    )
    hooked, _ = sample(den, SCHEDULE, request, **off.hooks())
    assert torch.equal(plain, hooked)
    on = PTQDCorrector(_stats_for(s.timesteps, k=0.3, mu=0.2, sigma_q=0.5))
    corrected, _ = sample(den, SCHEDULE, request, **on.hooks())
    assert not torch.equal(plain, corrected)
