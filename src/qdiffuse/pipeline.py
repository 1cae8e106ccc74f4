"""Folder-to-folder workflows behind the CLI: quantize a model folder, and build the hooks sampling needs.

Kept apart from the command line so scripts and benchmarks run exactly what the commands run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from qdiffuse.api import quant_state, quantize
from qdiffuse.config import QuantConfig
from qdiffuse.errors import ConfigError
from qdiffuse.fsutil import QUANTIZED_FOLDER, check_output_path
from qdiffuse.io import COST_FILE, is_quantized_folder, load_quantized, save_quantized
from qdiffuse.models.loading import LoadedModel, load_model_folder
from qdiffuse.sampling.loop import SampleRequest
from qdiffuse.validate import check_number


def load_any(
    model: str | Path, device: str = "cpu", runtime: str = "real", verify: bool = True, dtype: Any = None
) -> LoadedModel:
    """A quantized folder (on the ``runtime`` asked for; content hashes checked unless ``verify`` is False), a
    diffusers folder or a built-in name, in compute ``dtype`` (None/``auto``: the folder's own)."""
    if is_quantized_folder(model):
        return load_quantized(model, device, runtime, verify=verify, dtype=dtype)
    return load_model_folder(model, device, dtype)


def quantize_folder(
    model: str | Path,
    out: Path,
    config: QuantConfig,
    *,
    guidance: float = 1.0,
    labels: tuple[int, ...] | None = None,
    cond: Tensor | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    overwrite: bool = False,
    analysis: SampleRequest | None = None,
    snr_margin: float = 1.0,
    dtype: Any = None,
) -> LoadedModel:
    """Quantize ``model`` and save it to ``out``.

    Mixed-precision schemes get their per-step plan, and ``--method ptqd`` its noise statistics, both measured
    on ``analysis`` (the sampling setting the user will use) against a fresh FP copy of the model. The model
    is loaded, calibrated and saved in compute ``dtype`` (None/``auto``: the dtype its weights are stored in).
    """
    check_number(snr_margin, "--snr-margin", 0.0, 1e6, low_open=True)
    check_output_path(Path(out), overwrite, QUANTIZED_FOLDER, inputs=[model] if Path(model).exists() else [])
    loaded = load_model_folder(model, device, dtype)
    quantize(loaded.denoiser, loaded.scheduler_config, config, guidance=guidance, labels=labels, cond=cond,
             batch_size=batch_size)
    extra: dict[str, str] = {}
    plan = None
    needs_fp = bool(config.mixed_activation_bits) or config.corrects_noise
    if needs_fp:
        if analysis is None:
            raise ConfigError("mixed precision and ptqd need an analysis sampling setting")
        from qdiffuse.noise.analyze import measure_noise
        from qdiffuse.noise.precision import PLAN_FILE, choose_precision
        from qdiffuse.noise.store import stats_json, stats_relpath

        fp = load_model_folder(model, device, dtype)
        variant_for = None
        if config.mixed_activation_bits:
            plan = choose_precision(fp.denoiser, loaded.denoiser, loaded.scheduler_config, analysis, snr_margin, cond)
            extra[PLAN_FILE] = plan.to_json()
            variant_for = plan.variant_for
        if config.corrects_noise:
            stats = measure_noise(fp.denoiser, loaded.denoiser, loaded.scheduler_config, analysis, cond, variant_for)
            extra[stats_relpath(stats)] = stats_json(stats)
    from qdiffuse.eval.cost import cost_summary

    extra[COST_FILE] = json.dumps(cost_summary(loaded.denoiser, plan), indent=2)
    save_quantized(loaded, out, overwrite, extra_files=extra)
    return loaded


def sampling_hooks(
    model: str | Path,
    loaded: LoadedModel,
    request: SampleRequest,
    *,
    ptqd: bool | None = None,
    options: Any = None,
    fp_model: str | None = None,
    cond: Tensor | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Hooks for ``sample``: the per-step precision plan and PTQD corrections of a quantized folder.

    ``ptqd=None`` applies PTQD when the folder was made with a noise-correcting method (``ptqd``,
    ``qdiffusion+ptqd``).
    """
    from qdiffuse.noise.correction import PTQDOptions
    from qdiffuse.noise.pipeline import corrector_for
    from qdiffuse.noise.precision import PlanSwitcher, load_plan

    state = quant_state(loaded.denoiser.model)
    hooks: dict[str, Any] = {}
    if state is not None:
        plan = load_plan(Path(model))
        if plan is not None:
            hooks["on_step"] = PlanSwitcher(plan, loaded.denoiser.model).on_step
    if ptqd is None:
        ptqd = state is not None and state.config.corrects_noise
    if ptqd:
        if state is None:
            raise ConfigError("--ptqd needs a quantized model folder; run qdiffuse quantize first")
        corrector = corrector_for(Path(model), request, options or PTQDOptions(), fp_model, cond, device)
        hooks.update(corrector.hooks())
    return hooks


__all__ = ["load_any", "quantize_folder", "sampling_hooks"]
