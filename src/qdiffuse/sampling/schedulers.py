"""Sampler names -> diffusers schedulers built from the model's own training schedule.

Every sampler reuses the model's scheduler config (betas, timestep count, prediction type), so switching the
sampler never changes the noise schedule the network was trained for.
"""

from __future__ import annotations

from typing import Any

from qdiffuse.errors import ConfigError

SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
}

_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
)


def make_scheduler(name: str, model_scheduler_config: dict[str, Any]) -> Any:
    """A fresh scheduler of kind ``name`` with the model's noise schedule."""
    import diffusers

    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
    class_name, extra = SAMPLERS[name]
    cls = getattr(diffusers, class_name)
    schedule = {k: model_scheduler_config[k] for k in _SCHEDULE_KEYS if k in model_scheduler_config}
    if name in ("ddpm", "ddim"):
        schedule["clip_sample"] = model_scheduler_config.get("clip_sample", False)
    if name == "ddim":
        schedule["set_alpha_to_one"] = model_scheduler_config.get("set_alpha_to_one", False)
    if name == "euler":
        schedule["timestep_spacing"] = "trailing"
    try:
        return cls(**schedule, **extra)
    except (NotImplementedError, ValueError, TypeError, KeyError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(
            f"the model's scheduler settings cannot build {class_name} ({reason[:200]}); fix "
            "scheduler/scheduler_config.json (beta_schedule: linear, scaled_linear or squaredcos_cap_v2)"
        ) from None


def check_schedule(model_scheduler_config: dict[str, Any]) -> None:
    """Fail when a model folder is read, not after calibration, if its schedule cannot make a sampler."""
    if not isinstance(model_scheduler_config, dict):
        raise ConfigError("scheduler/scheduler_config.json must hold a JSON object; re-save the model folder")
    make_scheduler("ddpm", model_scheduler_config)


def validate_steps(scheduler: Any, steps: int) -> None:
    total = scheduler.config.num_train_timesteps
    if not 1 <= steps <= total:
        raise ConfigError(f"--steps {steps} is out of range; use 1 to {total} (the model's training timesteps)")


__all__ = ["SAMPLERS", "make_scheduler", "check_schedule", "validate_steps"]
