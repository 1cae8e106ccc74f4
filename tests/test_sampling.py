"""The sampling loop, sampler names, labels and guidance, the uint8 convention, and calibration collection."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_cond_unet, tiny_dit, tiny_unet
from torch import nn

from qdiffuse.calibration.collect import CalibrationSet, calibration_step_indices, collect_calibration
from qdiffuse.errors import ConfigError, DataError
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.progress import set_progress_enabled
from qdiffuse.sampling.loop import SampleRequest, resolve_labels, sample, to_uint8
from qdiffuse.sampling.schedulers import SAMPLERS, make_scheduler

set_progress_enabled(False)

SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
}


def _randomize(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def unet() -> Denoiser:
    """Class-conditional UNet: classes 0-2, null class 3."""
    return Denoiser.from_model(_randomize(tiny_unet(4)), {"num_classes": 3, "null_class": 3})


@pytest.fixture(scope="module")
def cond_unet() -> Denoiser:
    return Denoiser.from_model(_randomize(tiny_cond_unet()))


@pytest.fixture(scope="module")
def dit() -> Denoiser:
    return Denoiser.from_model(_randomize(tiny_dit()))


def _run(denoiser: Denoiser, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    kwargs = {"num": 3, "steps": 4, **kwargs}
    return sample(denoiser, SCHEDULER, SampleRequest(**kwargs))


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_samples_different_seed_different(unet: Denoiser) -> None:
    a, labels_a = _run(unet, seed=5, sampler="ddpm")
    b, labels_b = _run(unet, seed=5, sampler="ddpm")
    c, _ = _run(unet, seed=6, sampler="ddpm")
    assert torch.equal(a, b) and torch.equal(labels_a, labels_b)
    assert (a - c).abs().max() > 1e-2


def test_noise_is_seeded_per_batch(unet: Denoiser) -> None:
    """Noise comes from one generator per (seed, batch index): batches are reproducible on their own, so the
    batch size is part of the request. The first batch is a prefix of a larger first batch; later batches draw
    from their own generators, so changing the batch size changes the images after the first batch."""
    full, _ = _run(unet, num=4, batch_size=4, seed=3)
    halves, _ = _run(unet, num=4, batch_size=2, seed=3)
    again, _ = _run(unet, num=4, batch_size=2, seed=3)
    assert torch.equal(halves, again)
    torch.testing.assert_close(halves[:2], full[:2], atol=1e-3, rtol=0)  # same noise, batched float sums
    assert (halves[2:] - full[2:]).abs().max() > 0.1


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs(unet: Denoiser, sampler: str) -> None:
    images, labels = _run(unet, sampler=sampler, num=2)
    assert images.shape == (2, 1, 16, 16) and images.dtype == torch.float32
    assert bool(torch.isfinite(images).all())
    assert labels.tolist() == [0, 1]
    scheduler = make_scheduler(sampler, SCHEDULER)
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.beta_schedule == "linear"


def test_unknown_sampler_and_bad_requests() -> None:
    with pytest.raises(ConfigError):
        make_scheduler("heun++", SCHEDULER)
    for bad in ({"num": 0}, {"num": 2, "batch_size": 0}, {"num": 2, "eta": -1.0}):
        with pytest.raises(ConfigError):
            SampleRequest(**bad)


@pytest.mark.parametrize("steps", [0, 1001])
def test_steps_out_of_range(unet: Denoiser, steps: int) -> None:
    with pytest.raises(ConfigError, match="--steps"):
        _run(unet, steps=steps)


def test_eta_only_for_ddim(unet: Denoiser) -> None:
    with pytest.raises(ConfigError, match="eta"):
        _run(unet, sampler="euler", eta=0.5)
    deterministic, _ = _run(unet, sampler="ddim", eta=0.0, seed=1)
    stochastic, _ = _run(unet, sampler="ddim", eta=1.0, seed=1)
    assert bool(torch.isfinite(stochastic).all()) and not torch.equal(deterministic, stochastic)


@pytest.mark.parametrize("fixture", ["cond_unet", "dit"])
def test_other_model_kinds_sample(fixture: str, request: pytest.FixtureRequest) -> None:
    denoiser = request.getfixturevalue(fixture)
    images, labels = _run(denoiser, num=2)
    assert images.shape == (2, 1, 16, 16) and bool(torch.isfinite(images).all())
    if fixture == "dit":
        assert labels.tolist() == [0, 1]
        guided, _ = _run(denoiser, num=2, guidance=3.0)
        assert bool(torch.isfinite(guided).all()) and not torch.equal(guided, images)
    else:
        assert labels is None
        condition = torch.randn(8, 24)
        with_cond, _ = sample(denoiser, SCHEDULER, SampleRequest(num=2, steps=4), cond=condition)
        assert not torch.equal(with_cond, images)


# ------------------------------------------------------------------------------------------- labels, guidance


def test_labels_cycle(unet: Denoiser) -> None:
    assert resolve_labels(unet, (2, 0), 5).tolist() == [2, 0, 2, 0, 2]
    assert resolve_labels(unet, None, 4).tolist() == [0, 1, 2, 0]  # every real class, not the null class
    _, labels = _run(unet, num=5, labels=(1, 2), batch_size=2)
    assert labels.tolist() == [1, 2, 1, 2, 1]
    with pytest.raises(ConfigError, match="out of range"):
        resolve_labels(unet, (0, 3), 2)  # 3 is the null class
    with pytest.raises(ConfigError, match="out of range"):
        resolve_labels(unet, (-1,), 2)


def test_labels_on_unconditional_model(cond_unet: Denoiser) -> None:
    with pytest.raises(ConfigError, match="not class-conditional"):
        resolve_labels(cond_unet, (0,), 2)


def test_guidance_with_the_null_class(unet: Denoiser) -> None:
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([500, 500])
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        eps_c = unet.forward_raw(x, t, labels)
        eps_u = unet.forward_raw(x, t, torch.tensor([3, 3]))
        guided = unet(x, t, labels, guidance=2.5)
    torch.testing.assert_close(guided, eps_u + 2.5 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(eps_c, eps_u)
    plain, _ = _run(unet, seed=2)
    guided_images, _ = _run(unet, seed=2, guidance=2.0)
    assert bool(torch.isfinite(guided_images).all()) and not torch.equal(plain, guided_images)


def test_guidance_needs_a_null_class() -> None:
    no_null = Denoiser.from_model(_randomize(tiny_unet(4)))
    assert no_null.num_classes == 4 and no_null.null_class is None
    with pytest.raises(ConfigError, match="null class"):
        _run(no_null, guidance=2.0)


# ------------------------------------------------------------------------------------------------- uint8


def test_to_uint8_adm_convention() -> None:
    values = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 0.99, 1.0, 2.0, -0.9961, 1 / 127.5 - 1])
    images = values.view(1, 1, 1, -1).expand(2, 3, 2, -1).clone()  # N=2, C=3, H=2, W=10
    out = to_uint8(images)
    assert out.dtype == torch.uint8 and out.shape == (2, 2, 10, 3)
    # (x + 1) * 127.5: -0.5 -> 63.75 -> 64; 0 -> 127.5 -> 128 (half to even); 0.5 -> 191.25 -> 191;
    # 0.99 -> 253.7250 -> 254; -0.9961 -> 0.4972 -> 0; 1/127.5 - 1 -> 1.0 -> 1; out of range clamps.
    assert out[0, 0, :, 0].tolist() == [0, 0, 64, 128, 191, 254, 255, 255, 0, 1]
    assert torch.equal(out[1, 1], out[0, 0])
    channels_last = torch.arange(6, dtype=torch.float32).view(1, 3, 1, 2) / 127.5 - 1  # codes 0..5
    assert to_uint8(channels_last)[0, 0].tolist() == [[0, 2, 4], [1, 3, 5]]


# ------------------------------------------------------------------------------------------------ calibration


def test_calibration_step_indices_by_hand() -> None:
    # round(i * 49 / 19) for i = 0..19
    expected = [0, 3, 5, 8, 10, 13, 15, 18, 21, 23, 26, 28, 31, 34, 36, 39, 41, 44, 46, 49]
    assert calibration_step_indices(50, 20) == expected
    assert calibration_step_indices(10, 4) == [0, 3, 6, 9]
    assert calibration_step_indices(5, 20) == [0, 1, 2, 3, 4]
    assert calibration_step_indices(50, 1) == [0]


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_collect_calibration_counts_and_timesteps(unet: Denoiser, guidance: float) -> None:
    calib = collect_calibration(
        unet, SCHEDULER, n_steps=4, n_per_step=5, num_inference_steps=10, guidance=guidance, batch_size=2
    )
    factor = 2 if guidance != 1.0 else 1
    assert len(calib) == 4 * 5 * factor
    assert calib.x.shape == (4 * 5 * factor, 1, 16, 16) and calib.labels.shape == (len(calib),)
    assert calib.cond is None
    scheduler = make_scheduler("ddim", SCHEDULER)
    scheduler.set_timesteps(10)
    expected_t = {int(scheduler.timesteps[i]) for i in calibration_step_indices(10, 4)}
    assert set(calib.t.tolist()) == expected_t
    for t in expected_t:
        assert int((calib.t == t).sum()) == 5 * factor
    labels = calib.labels.tolist()
    if guidance == 1.0:
        assert set(labels) <= {0, 1, 2}
    else:
        assert labels.count(3) == len(labels) // 2  # the unconditional half uses the null class
    # the first recorded step is the pure noise the sampler starts from
    first = calib.x[calib.t == max(expected_t)][:2]
    start = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    assert torch.equal(first, start)


def test_collect_calibration_with_text_condition(cond_unet: Denoiser) -> None:
    condition = torch.randn(8, 24)
    calib = collect_calibration(cond_unet, SCHEDULER, n_steps=2, n_per_step=3, num_inference_steps=4, cond=condition)
    assert len(calib) == 6 and calib.labels is None and calib.cond.shape == (6, 8, 24)
    assert torch.equal(calib.cond[0], condition)
    guided = collect_calibration(
        cond_unet, SCHEDULER, n_steps=2, n_per_step=3, num_inference_steps=4, cond=condition, guidance=3.0
    )
    assert len(guided) == 12
    assert int((guided.cond.abs().sum(dim=(1, 2)) == 0).sum()) == 6  # the null (zero) condition half


def test_calibration_set_rejects_nan_and_empty_data() -> None:
    x = torch.randn(4, 1, 16, 16)
    t = torch.full((4,), 10)
    x[2, 0, 3, 3] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        CalibrationSet(x, t)
    cond = torch.randn(4, 8, 24)
    cond[0, 0, 0] = float("inf")
    with pytest.raises(DataError):
        CalibrationSet(torch.randn(4, 1, 16, 16), t, cond=cond)
    with pytest.raises(DataError, match="empty"):
        CalibrationSet(torch.empty(0, 1, 16, 16), torch.empty(0))


def test_collect_calibration_from_a_nan_model_raises_data_error() -> None:
    model = _randomize(tiny_unet(4))
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))
    denoiser = Denoiser.from_model(model, {"num_classes": 3, "null_class": 3})
    with pytest.raises(DataError) as exc:
        collect_calibration(denoiser, SCHEDULER, n_steps=3, n_per_step=2, num_inference_steps=4)
    assert "\n" not in str(exc.value)


def test_calibration_set_batches_and_file_round_trip(tmp_path) -> None:
    calib = CalibrationSet(torch.randn(5, 1, 4, 4), torch.arange(5), torch.tensor([0, 1, 2, 0, 1]))
    batches = list(calib.batches(2))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1] and batches[0][3] is None
    calib.save(tmp_path / "c.safetensors")
    back = CalibrationSet.load(tmp_path / "c.safetensors")
    assert torch.equal(back.x, calib.x) and torch.equal(back.t, calib.t) and torch.equal(back.labels, calib.labels)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError):
        CalibrationSet.load(tmp_path / "bad.safetensors")
