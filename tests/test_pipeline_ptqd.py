"""PTQD inside diffusers' own pipeline call, on the tiny pipelines of every family: statistics of a known error,
the scheduler wrapper removing it exactly, its signature, the refusals, and ``qdiffuse analyze`` on a quantized
pipeline folder."""

from __future__ import annotations

import copy
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pipeline_fixtures import CALLS, FIXTURES, tiny_sd  # noqa: E402

import qdiffuse  # noqa: E402
from qdiffuse.errors import ConfigError  # noqa: E402
from qdiffuse.noise.stats import NoiseStats, StepStats  # noqa: E402
from qdiffuse.pipelines.ptqd import PTQDScheduler, measure_pipeline_noise  # noqa: E402
from qdiffuse.progress import set_progress_enabled  # noqa: E402

set_progress_enabled(False)

PROMPTS = ["a red cat", "a blue dog"]
LAST_LAYER = {"sd": "conv_out", "sdxl": "conv_out", "pixart": "proj_out", "sd3": "proj_out", "flux": "proj_out"}
COMPONENT = {"sd": "unet", "sdxl": "unet"}


def _images(pipe: object, name: str) -> np.ndarray:
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(3), output_type="np", **CALLS[name]).images


@pytest.mark.parametrize("name", list(FIXTURES))
def test_a_known_correlated_error_is_measured_and_removed_exactly(name: str, tmp_path: Path) -> None:
    """A 'quantized' denoiser whose output is 1.1x the FP one (its last layer scaled): through each pipeline's own
    guidance and output handling the statistics are k = 0.1, mu = 0, sigma_q = 0 at every step, and the
    PTQDScheduler then gives the FP pipeline's images back."""
    pipe = FIXTURES[name](tmp_path)
    pipe.set_progress_bar_config(disable=True)
    component = COMPONENT.get(name, "transformer")
    fp_images = _images(pipe, name)
    fp_model = getattr(pipe, component)
    scaled = copy.deepcopy(fp_model)
    layer = scaled.get_submodule(LAST_LAYER[name])
    with torch.no_grad():
        layer.weight.mul_(1.1)
        layer.bias.mul_(1.1)
    setattr(pipe, component, scaled)
    stats = measure_pipeline_noise(pipe, fp_model, PROMPTS, batch_size=2, **CALLS[name])
    steps = CALLS[name]["num_inference_steps"]
    assert len(stats.steps) == steps
    for step in stats.steps.values():
        assert step.k == pytest.approx(0.1, abs=1e-4)
        assert max(abs(m) for m in step.mu) < 1e-4 and step.sigma_q < 1e-4
    assert stats.settings["sampler"] == type(pipe.scheduler).__name__
    assert _images(pipe, name).tolist() != fp_images.tolist()  # the error is real ...
    pipe.scheduler = PTQDScheduler(pipe.scheduler, stats)
    np.testing.assert_allclose(_images(pipe, name), fp_images, atol=2e-4)  # ... and removed
    report = pipe.scheduler.report()
    assert len(report["steps"]) == steps and all(r["stats"] == "exact" for r in report["steps"])


def test_scheduler_wrapper_keeps_the_signature_and_corrects_by_hand() -> None:
    from diffusers import DDIMScheduler, DDPMScheduler

    inner = DDIMScheduler(num_train_timesteps=1000)
    inner.set_timesteps(10)
    t = int(inner.timesteps[3])
    stats = NoiseStats(settings={"sampler": "DDIMScheduler", "steps": 10, "eta": 0.0, "guidance": 1.0})
    stats.steps[t] = StepStats(t, k=1.0, mu=[0.5, -0.5], sigma_q=0.0, snr_q=1.0, snr_f=1.0, normality_p=1.0,
                               k_raw=1.0, count=1)
    wrapped = PTQDScheduler(copy.deepcopy(inner), stats)
    # pipelines read the step's parameters to decide whether to pass eta and generator
    assert "eta" in inspect.signature(wrapped.step).parameters
    assert "generator" in inspect.signature(wrapped.step).parameters
    assert wrapped.config == inner.config and wrapped.timesteps.tolist() == inner.timesteps.tolist()
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    mu = torch.tensor([0.5, -0.5]).view(1, 2, 1, 1)
    expected = inner.step((out - mu) / 2.0, t, x).prev_sample
    torch.testing.assert_close(wrapped.step(out, t, x).prev_sample, expected)
    torch.testing.assert_close(wrapped.step(out, t, x, return_dict=False)[0], expected)

    # DDPM injects noise: the residual quantization noise is taken out of it, sigma' = sqrt(sigma^2 - (c sq)^2)
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    ddpm.set_timesteps(10)
    t = int(ddpm.timesteps[2])
    stats.steps = {t: StepStats(t, k=0.0, mu=[0.0, 0.0], sigma_q=0.05, snr_q=1.0, snr_f=1.0, normality_p=1.0,
                                k_raw=0.0, count=1)}
    wrapped = PTQDScheduler(ddpm, stats)
    wrapped.step(out, t, x, generator=torch.Generator().manual_seed(2))
    row = wrapped.report()["steps"][0]
    assert row["sigma"] > 0 and row["sigma_new"] == pytest.approx(
        (row["sigma"] ** 2 - (row["c"] * 0.05) ** 2) ** 0.5, rel=1e-6
    )


def test_a_pipeline_combination_that_is_not_guidance_is_refused(tmp_path: Path) -> None:
    """guidance_rescale changes the guided output non-linearly: the measurement says it cannot follow."""
    pipe = tiny_sd(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    fp = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(1.1)
    with pytest.raises(ConfigError, match="cannot tell how this pipeline combines its denoiser outputs"):
        measure_pipeline_noise(pipe, fp, PROMPTS, guidance_rescale=0.7, **CALLS["sd"])


def test_analyze_a_quantized_pipeline_folder_and_load_applies_it(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).parent / "qdiffuse")

    def run(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    tiny_sd(tmp_path).save_pretrained(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("a red cat\na blue dog\n")
    q = tmp_path / "q"
    res = run("quantize", tmp_path / "sd", "--out", q, "--scheme", "w4a8", "--prompts", tmp_path / "prompts.txt",
              "--calib-inference-steps", 3, "--calib-steps", 3, "--guidance", 4, "-q")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ptqd" not in json.loads((q / "qdiffuse_pipeline.json").read_text())
    assert type(qdiffuse.load_pipeline(q).scheduler).__name__ == "DDIMScheduler"
    res = run("analyze", q, "--out", tmp_path / "report", "--prompts", tmp_path / "prompts.txt", "--num", 3,
              "--steps", 4, "--guidance", 4, "-q")
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads((tmp_path / "report" / "noise_stats.json").read_text())
    assert len(stats["steps"]) == 4 and stats["settings"]["sampler"] == "DDIMScheduler"
    assert (tmp_path / "report" / "noise_report.md").is_file()
    marker = json.loads((q / "qdiffuse_pipeline.json").read_text())
    assert marker["ptqd"] == "noise/DDIMScheduler-4-eta0-g4.json" and (q / "unet" / marker["ptqd"]).is_file()
    loaded = qdiffuse.load_pipeline(q)  # verifies the folder's hashes, statistics included
    assert isinstance(loaded.scheduler, PTQDScheduler) and sorted(loaded.scheduler.stats.steps) == sorted(
        s["timestep"] for s in stats["steps"]
    )
    assert type(qdiffuse.load_pipeline(q, ptqd=False).scheduler).__name__ == "DDIMScheduler"
    common = ("--prompts", tmp_path / "prompts.txt", "--num", 2, "--steps", 4, "--guidance", 4, "-q")
    assert run("sample", q, "--out", tmp_path / "q.npz", *common).returncode == 0
    # an FP source that is gone: one line, nothing written
    (tmp_path / "sd").rename(tmp_path / "moved")
    bad = run("analyze", q, "--out", tmp_path / "report2", "--num", 2, "--steps", 2)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "--fp" in lines[0], bad.stderr[-1000:]
    assert not (tmp_path / "report2").exists()
    ok = run("analyze", q, "--out", tmp_path / "report3", "--fp", tmp_path / "moved", "--num", 2, "--steps", 2,
             "--guidance", 4, "-q")
    assert ok.returncode == 0, ok.stderr[-1000:]


def test_a_sampler_swap_keeps_ptqd_and_flow_pipelines_refuse_one(tmp_path: Path) -> None:
    from qdiffuse.pipelines.commands import _use_sampler

    pipe = tiny_sd(tmp_path)
    stats = NoiseStats(settings={"sampler": "DDIMScheduler"})
    pipe.scheduler = PTQDScheduler(pipe.scheduler, stats)
    _use_sampler(pipe, "dpm++2m")
    assert isinstance(pipe.scheduler, PTQDScheduler) and pipe.scheduler.stats is stats
    assert type(pipe.scheduler.scheduler).__name__ == "DPMSolverMultistepScheduler"
    (tmp_path / "flux").mkdir()
    flux = FIXTURES["flux"](tmp_path / "flux")
    with pytest.raises(ConfigError, match="samples by flow matching"):
        _use_sampler(flux, "ddim")
