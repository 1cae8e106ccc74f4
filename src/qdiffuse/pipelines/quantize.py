"""Quantize a diffusers pipeline's denoiser in place, calibrated by the pipeline itself.

The quantized denoiser replaces the FP one in the same pipeline object, so ``pipe(prompt, ...)`` then samples
with it; the text encoders, VAE and scheduler stay FP and untouched. With a PTQD method the pipeline's noise
statistics are measured by running it once more (FP trajectories, quantized outputs on the same inputs) and
the scheduler is wrapped in :class:`~qdiffuse.pipelines.ptqd.PTQDScheduler`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from qdiffuse.config import NOISE_CORRECTING_METHODS, TRAJECTORY_METHODS, QuantConfig
from qdiffuse.errors import ConfigError
from qdiffuse.eval.cost import cost_summary
from qdiffuse.pipelines.calibrate import check_prompts, collect_pipeline_calibration
from qdiffuse.pipelines.store import COST_ATTR
from qdiffuse.pipelines.support import denoiser_component


def quantize_pipeline(
    pipe: Any,
    config: QuantConfig,
    prompts: Sequence[str] | None = None,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    runtime: str = "real",
    batch_size: int = 4,
    text_encoders: str | None = None,
    **call_kwargs: Any,
) -> Any:
    """Quantize ``pipe``'s denoiser in place (calibrated by running ``pipe`` on ``prompts`` with this guidance,
    step count and size) and return ``pipe``. ``call_kwargs`` go to every pipeline call (e.g. FLUX's
    ``max_sequence_length``). ``text_encoders``: a scheme for the text encoders too, in memory only
    (:mod:`qdiffuse.pipelines.text_encoders`; the denoiser is calibrated on the FP text path first)."""
    from qdiffuse.api import quantize
    from qdiffuse.models.denoiser import Denoiser

    component = denoiser_component(pipe)
    if config.method in TRAJECTORY_METHODS:
        raise ConfigError(
            f"--method {config.method} on pipelines is not built yet (its trajectories come from qdiffuse's own "
            "samplers); use qdiffusion, qdiffusion+ptqd, ptqd, gptq, mse or minmax"
        )
    prompts = check_prompts(prompts)
    settings = dict(
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
        batch_size=batch_size, **call_kwargs,
    )
    calib = collect_pipeline_calibration(pipe, prompts, calib_steps=config.calib_steps, seed=config.seed, **settings)
    model = getattr(pipe, component)
    fp_model = copy.deepcopy(model) if config.method in NOISE_CORRECTING_METHODS else None
    denoiser = Denoiser.from_model(model)
    quantize(denoiser, dict(pipe.scheduler.config), config, calib=calib, runtime=runtime, batch_size=8)
    probe = next(calib.subset(torch.tensor([0])).batches(1, denoiser.device))
    setattr(model, COST_ATTR, cost_summary(denoiser, None, probe))
    if fp_model is not None:
        from qdiffuse.pipelines.ptqd import PTQDScheduler, measure_pipeline_noise

        stats = measure_pipeline_noise(pipe, fp_model, prompts, seed=config.seed + 7919, **settings)
        del fp_model
        pipe.scheduler = PTQDScheduler(pipe.scheduler, stats)
    if text_encoders is not None:
        from qdiffuse.pipelines.text_encoders import quantize_text_encoders

        quantize_text_encoders(
            pipe, text_encoders, prompts, runtime=runtime, guidance_scale=guidance_scale, height=height, width=width,
            **call_kwargs,
        )
    state = getattr(model, "qdiffuse_state", None)
    if state is not None:
        state.calibration["pipeline"] = {
            "class": type(pipe).__name__,
            "component": component,
            "prompts": len(prompts),
            "steps": num_inference_steps,
            "guidance": guidance_scale,
            "scheduler": type(getattr(pipe.scheduler, "scheduler", pipe.scheduler)).__name__,
        }
    return pipe


__all__ = ["quantize_pipeline"]
