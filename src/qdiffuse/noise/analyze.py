"""Measure PTQD statistics: FP and quantized denoisers on the same inputs along FP trajectories."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from qdiffuse.models.denoiser import Denoiser
from qdiffuse.nn.quantizer import set_activation_variant
from qdiffuse.noise.stats import NoiseStats, StepAccumulator, forward_snr
from qdiffuse.sampling.loop import SampleRequest, sample
from qdiffuse.sampling.schedulers import make_scheduler


def request_settings(request: SampleRequest) -> dict[str, Any]:
    """The sampling settings statistics are valid for (they are keyed by timestep within them)."""
    return {
        "sampler": request.sampler,
        "steps": request.steps,
        "eta": request.eta,
        "guidance": request.guidance,
        "num": request.num,
        "seed": request.seed,
        "labels": list(request.labels) if request.labels else None,
    }


@torch.no_grad()
def measure_noise(
    fp: Denoiser,
    quantized: Denoiser,
    scheduler_config: dict[str, Any],
    request: SampleRequest,
    cond: Tensor | None = None,
    variant_for: Callable[[int], str] | None = None,
) -> NoiseStats:
    """Single-step quantization-noise statistics for every timestep ``request`` samples.

    ``variant_for(t)`` selects the quantized model's activation variant per step (a mixed-precision plan).
    """
    alphas_cumprod = make_scheduler("ddpm", scheduler_config).alphas_cumprod
    accumulators: dict[int, StepAccumulator] = {}
    stash: dict[str, Any] = {}

    def on_step(i: int, t: Tensor, x: Tensor, labels: Tensor | None, c: Tensor | None) -> None:
        stash.update(t=t, x=x, labels=labels, cond=c)

    def eps_hook(i: int, t: Tensor, eps_fp: Tensor) -> Tensor:
        if variant_for is not None:
            set_activation_variant(quantized.model, variant_for(int(t)))
        raw = quantized.forward_raw(stash["x"], stash["t"], stash["labels"], stash["cond"])
        eps_q = Denoiser.combine_guidance(raw, request.guidance)
        key = int(t)
        if key not in accumulators:
            accumulators[key] = StepAccumulator(eps_fp.shape[1], seed=key)
        accumulators[key].update(eps_fp, eps_q)
        return eps_fp

    sample(fp, scheduler_config, request, cond=cond, on_step=on_step, eps_hook=eps_hook, description="noise analysis")
    stats = NoiseStats(settings=request_settings(request))
    for t, acc in accumulators.items():
        step, resid = acc.finish(t, forward_snr(alphas_cumprod, min(max(t, 0), len(alphas_cumprod) - 1)))
        stats.steps[t] = step
        stats.residual_samples[t] = resid
    return stats


__all__ = ["measure_noise", "request_settings"]
