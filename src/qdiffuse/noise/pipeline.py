"""PTQD end to end on folders: measure statistics for a quantized folder, and build the sampling corrector."""

from __future__ import annotations

import sys
from pathlib import Path

from torch import Tensor

from qdiffuse.errors import ModelLoadError
from qdiffuse.io import QUANT_JSON
from qdiffuse.models.loading import load_model_folder, read_json
from qdiffuse.noise.analyze import measure_noise
from qdiffuse.noise.correction import PTQDCorrector, PTQDOptions
from qdiffuse.noise.precision import load_plan
from qdiffuse.noise.stats import NoiseStats
from qdiffuse.noise.store import find_stats, save_stats
from qdiffuse.sampling.loop import SampleRequest


def fp_source(qdir: Path, override: str | None = None) -> str:
    """The FP model a quantized folder was made from (a built-in name or an absolute folder path)."""
    if override:
        return override
    source = read_json(Path(qdir) / QUANT_JSON, "quantization manifest").get("source")
    if not source:
        raise ModelLoadError(f"{qdir} does not record its FP model; pass --fp MODEL")
    return source


def analyze_quantized(
    qdir: Path,
    request: SampleRequest,
    fp_model: str | None = None,
    cond: Tensor | None = None,
    device: str = "cpu",
    verify: bool = True,
) -> NoiseStats:
    from qdiffuse.io import load_quantized

    quantized = load_quantized(qdir, device, verify=verify)
    try:
        fp = load_model_folder(fp_source(qdir, fp_model), device)
    except ModelLoadError as exc:
        raise ModelLoadError(f"cannot load the FP model for the analysis ({exc}); pass --fp MODEL") from None
    plan = load_plan(qdir)
    variant_for = plan.variant_for if plan is not None else None
    return measure_noise(fp.denoiser, quantized.denoiser, quantized.scheduler_config, request, cond, variant_for)


def corrector_for(
    qdir: Path,
    request: SampleRequest,
    options: PTQDOptions,
    fp_model: str | None = None,
    cond: Tensor | None = None,
    device: str = "cpu",
    analysis_num: int = 32,
) -> PTQDCorrector:
    """Stats for ``request`` from the folder (exact or interpolated), or measured now and stored (recomputed)."""
    stats, how = find_stats(qdir, request)
    if stats is None:
        print(
            f"note: no noise statistics for this sampling setting; measuring them now on {analysis_num} "
            "trajectories (run qdiffuse analyze to choose the count)",
            file=sys.stderr,
        )
        analysis = SampleRequest(
            num=analysis_num,
            steps=request.steps,
            sampler=request.sampler,
            eta=request.eta,
            seed=request.seed + 7919,
            labels=request.labels,
            guidance=request.guidance,
            batch_size=request.batch_size,
        )
        stats = analyze_quantized(qdir, analysis, fp_model, cond, device)
        save_stats(qdir, stats)
    elif how == "interpolated":
        s = stats.settings
        print(
            f"note: noise statistics measured for {s['sampler']} {s['steps']} steps are interpolated over "
            "timesteps for this sampling setting; run qdiffuse analyze with it for exact ones",
            file=sys.stderr,
        )
    return PTQDCorrector(stats, options)


__all__ = ["analyze_quantized", "corrector_for", "fp_source"]
