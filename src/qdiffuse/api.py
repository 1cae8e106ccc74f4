"""The public entry point: ``qdiffuse.quantize(model, scheduler_config, config, calib=...)``.

Like torchao's ``quantize_``, it rewrites the model in place and returns it: the result is the same
``nn.Module`` class, callable by diffusers pipelines, with the quantization state attached for saving.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from qdiffuse.calibration.bias import correct_bias, fp_weights
from qdiffuse.calibration.collect import CalibrationSet, collect_calibration
from qdiffuse.calibration.ptq import calibrate_ptq
from qdiffuse.config import STANDARD_CALIB_SAMPLER, STANDARD_CALIB_STEPS, QuantConfig
from qdiffuse.errors import ConfigError
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.nn.rewrite import LayerPlan, quant_layers, quantize_model

STATE_ATTR = "qdiffuse_state"


@dataclass
class QuantState:
    """What a quantized module remembers about how it was made (saved next to its weights)."""

    config: QuantConfig
    plan: list[LayerPlan]
    calibration: dict[str, Any] = field(default_factory=dict)


def quantize(
    model: nn.Module | Denoiser,
    scheduler_config: dict[str, Any],
    config: QuantConfig,
    calib: CalibrationSet | None = None,
    guidance: float = 1.0,
    labels: tuple[int, ...] | None = None,
    cond: Tensor | None = None,
    batch_size: int = 64,
    runtime: str = "real",
) -> nn.Module:
    """Quantize ``model`` in place and return it.

    ``runtime="real"`` (the default) ends by freezing the calibrated layers onto packed weights and integer/FP8
    kernels (``qdiffuse.kernels.runtime_report(model)`` says what runs where); ``"simulated"`` keeps the float
    weights and fake quantization, for research code that inspects or keeps training the quantized layers.

    ``mse+bias`` adds empirical bias correction after round-to-nearest PTQ. Reconstructing methods
    (``qdiffusion``, ``qdiffusion+ptqd``) add block reconstruction after round-to-nearest PTQ (against an FP copy
    of the model taken first). Without ``calib``, calibration inputs are collected from the
    FP model's own sampler (time-step aware, ``config.calib_steps`` × ``config.calib_per_step``), with the guidance
    and labels you will sample with.
    """
    from qdiffuse.kernels import check_runtime, freeze

    check_runtime(runtime)
    denoiser = model if isinstance(model, Denoiser) else Denoiser.from_model(model)
    if getattr(denoiser.model, STATE_ATTR, None) is not None:
        raise ConfigError("this model is already quantized; load the FP model again to quantize it differently")
    trajectory = None
    if config.aligns_trajectory:
        from qdiffuse.calibration.trajectory import collect_trajectory

        if calib is not None:
            raise ConfigError(
                f"--method {config.method} collects its own calibration data on the FP trajectories of "
                f"{config.calib_sampler}; drop the calibration set or use --method qdiffusion"
            )
        trajectory = collect_trajectory(
            denoiser,
            scheduler_config,
            sampler=config.calib_sampler,
            num_inference_steps=config.calib_num_inference_steps,
            n_per_step=config.calib_per_step,
            guidance=guidance,
            labels=labels,
            seed=config.seed,
            batch_size=batch_size,
            cond=cond,
            include_intermediate=config.mota_intermediate,
        )
        if config.mota_plan_data == "trajectory":
            calib = trajectory.calib
    if calib is None:
        # trajectory methods plan on the schedule-wide set qdiffusion uses (QuantConfig's default sampler/steps)
        plan_sampler, plan_steps = (
            (STANDARD_CALIB_SAMPLER, STANDARD_CALIB_STEPS)
            if trajectory is not None
            else (config.calib_sampler, config.calib_num_inference_steps)
        )
        calib = collect_calibration(
            denoiser,
            scheduler_config,
            n_steps=config.calib_steps,
            n_per_step=config.calib_per_step,
            sampler=plan_sampler,
            num_inference_steps=plan_steps,
            guidance=guidance,
            labels=labels,
            seed=config.seed,
            batch_size=batch_size,
            cond=cond,
        )
    fp_model = copy.deepcopy(denoiser.model) if config.reconstructs else None
    guard_probe = guard_reference = None
    if config.guard_db > 0 and config.activation is not None:
        from qdiffuse.outliers.guard import fp_reference, guard_rows

        guard_probe = guard_rows(calib)
        guard_reference = fp_reference(denoiser, guard_probe, batch_size)
    treatments = None
    if config.outliers == "auto":
        from qdiffuse.outliers.auto import plan_treatments

        treatments = plan_treatments(denoiser, config, calib, batch_size)
        config = treatments.config
    plan = quantize_model(denoiser.model, config)
    if treatments is not None or config.lowrank_rank:
        from qdiffuse.outliers.auto import install_treatments

        install_treatments(denoiser.model, treatments, config.lowrank_rank)
    weights = fp_weights(denoiser.model) if config.corrects_bias else None
    calibrate_ptq(denoiser, calib, batch_size, gptq=config.uses_gptq)
    info: dict[str, Any] = {
        "inputs": len(calib),
        "guidance": guidance,
        "timesteps": sorted({int(t) for t in calib.t.tolist()}),
    }
    if treatments is not None and treatments.decisions:
        info["outliers"] = treatments.summary()
    if guard_probe is not None and guard_reference is not None:
        from qdiffuse.outliers.guard import run_guard

        guard = run_guard(denoiser, guard_probe, guard_reference, config.guard_db, batch_size=batch_size)
        moved = tuple(entry["layer"] for entry in guard.fp_input_layers)
        if moved:
            config = replace(config, fp_inputs=config.fp_inputs + moved)
            labels = {n: m.bits_label() for n, m in quant_layers(denoiser.model) if n in moved}
            plan = [replace(p, label=labels.get(p.name, p.label)) for p in plan]
        info["guard"] = guard.to_dict()
    if weights is not None:
        corrections = correct_bias(denoiser, calib, weights, batch_size)
        del weights
        info["bias_correction"] = {"layers": len(corrections), "max_abs": max(corrections.values(), default=0.0)}
    if fp_model is not None:
        from qdiffuse.calibration.reconstruct import ReconstructionSettings, reconstruct

        settings = ReconstructionSettings(
            iters=config.recon_iters,
            act_iters=config.recon_act_iters,
            batch_size=config.recon_batch_size,
            max_samples=config.recon_max_samples,
            lr_round=config.recon_lr_round,
            lr_act=config.recon_lr_act,
            round_reg=config.recon_round_reg,
            beta_start=config.recon_beta[0],
            beta_end=config.recon_beta[1],
            warmup=config.recon_warmup,
            blocks=config.recon_blocks,
            seed=config.seed,
            checkpoint_dir=Path(config.recon_checkpoint_dir) if config.recon_checkpoint_dir else None,
            **_mota_terms(config, trajectory is not None, "blocks"),
        )
        if trajectory is not None:
            from qdiffuse.calibration.trajectory import aligned_error

            fp_denoiser = replace(denoiser, model=fp_model)
            alignment = {"fp": aligned_error(fp_denoiser, trajectory, batch_size)}
            alignment["round_to_nearest"] = aligned_error(denoiser, trajectory, batch_size)
        recon_calib = trajectory.calib if trajectory is not None else calib
        results = reconstruct(fp_model, denoiser, recon_calib, settings, trajectory.aligned if trajectory else None)
        info["reconstruction"] = {"units": len(results), "iters": settings.iters, "act_iters": settings.act_iters}
        if config.recon_output_iters > 0:
            from qdiffuse.calibration.output_align import OutputAlignSettings, align_outputs

            stage = OutputAlignSettings(
                iters=config.recon_output_iters,
                lr=config.recon_output_lr,
                batch_size=config.recon_batch_size,
                max_samples=config.recon_max_samples,
                seed=config.seed,
            )
            objective = ReconstructionSettings(**_mota_terms(config, trajectory is not None, "output"))
            output = align_outputs(
                denoiser, replace(denoiser, model=fp_model), recon_calib, objective, stage,
                trajectory.aligned if trajectory else None,
            )
            info["reconstruction"]["output_alignment"] = output.to_dict()
        del fp_model
        if trajectory is not None:
            alignment["reconstructed"] = aligned_error(denoiser, trajectory, batch_size)
            info["mota"] = {
                "sampler": config.calib_sampler,
                "steps": config.calib_num_inference_steps,
                "rows": len(recon_calib),
                "plan_data": config.mota_plan_data,
                "weights": {"block": config.mota_block, "align": config.mota_align, "cos": config.mota_cos},
                "intermediate_rows": config.mota_intermediate,
                "align_at": config.mota_align_at,
                "aligned_error": alignment,
            }
    setattr(denoiser.model, STATE_ATTR, QuantState(config, plan, info))
    if runtime == "real":
        freeze(denoiser.model)
    return denoiser.model


def _mota_terms(config: QuantConfig, aligns: bool, stage: str) -> dict[str, float]:
    """The objective weights of one reconstruction stage: ``mota``'s where its higher-order terms act
    (``config.mota_align_at``), the plain target (the settings' defaults) everywhere else."""
    if not aligns or config.mota_align_at not in (stage, "both"):
        return {}
    return {"block_weight": config.mota_block, "align_weight": config.mota_align, "cos_weight": config.mota_cos}


def quant_state(model: nn.Module) -> QuantState | None:
    return getattr(model, STATE_ATTR, None)


__all__ = ["quantize", "quant_state", "QuantState"]
