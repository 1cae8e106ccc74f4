"""Sampler names -> diffusers schedulers built from the model's own scheduler config.

Every sampler is made with ``from_config`` on the model's saved scheduler config, as diffusers' pipelines do: the
betas, timestep count and prediction type, and also the timestep spacing, offset, clipping and final-step settings
the model was saved with. Building a sampler from a few schedule keys and diffusers' defaults for the rest is
wrong on cosine (``squaredcos_cap_v2``) schedules: the default spacings start at t = T − 1, where ᾱ_t ≈ 2·10⁻⁹,
and the x₀ estimate of an ε-prediction there multiplies the network's error by σ/α ≈ 2·10⁴.

On top of the model's config, only what a sampler *is* (its algorithm and order) and two documented knobs:

- ``lambda_min_clipped = -5.1`` for the DPM-Solver family on cosine schedules (diffusers' own recommendation for
  that schedule: λ = log(α/σ) below −5.1 is where the ε → x₀ conversion becomes ill-conditioned), unless the
  config sets it;
- DDIM's ``set_alpha_to_one`` stays False and x₀ clipping (``clip_sample``, on by default in diffusers' DDPM and
  DDIM) stays off when the config does not say: a hand-written config for a latent model would otherwise be
  clipped to [−1, 1], and DDIM's last step lands on the model's t = 0 estimate (what the built-ins' numbers were
  measured with).
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from qdiffuse.errors import ConfigError, QDiffuseWarning

SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpm++2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++3s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
}
"""``dpm++2s``/``dpm++3s`` are singlestep DPM-Solver++ (their steps count network calls, intermediate points
included); ``dpm++2m``/``dpm++3m`` multistep; ``pndm`` is PLMS."""

HIGHER_ORDER_SAMPLERS = ("dpm++2m", "dpm++3m", "dpm++2s", "dpm++3s", "unipc", "pndm")
"""Samplers whose update combines several network evaluations or evaluates intermediate points."""

SAMPLER_HELP = (
    "ddpm, ddim, dpm++2m, dpm++3m (multistep DPM-Solver++), dpm++2s, dpm++3s (singlestep DPM-Solver++), "
    "unipc, pndm (PLMS), euler."
)

_DPM_CLASSES = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler")
COSINE_LAMBDA_MIN = -5.1


def sampler_settings(name: str, model_scheduler_config: dict[str, Any]) -> dict[str, Any]:
    """What ``make_scheduler`` passes to ``from_config`` on top of the model's config: the sampler's own
    algorithm settings and the knobs above. A reference scheduler built ``cls.from_config(config,
    **sampler_settings(...))`` is the same scheduler."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
    class_name, extra = SAMPLERS[name]
    settings = dict(extra)
    cfg = model_scheduler_config
    if class_name in _DPM_CLASSES and cfg.get("beta_schedule") == "squaredcos_cap_v2":
        if cfg.get("lambda_min_clipped") is None:
            settings["lambda_min_clipped"] = COSINE_LAMBDA_MIN
    if name == "ddim" and "set_alpha_to_one" not in cfg:
        settings["set_alpha_to_one"] = False
    if name in ("ddpm", "ddim") and "clip_sample" not in cfg:
        settings["clip_sample"] = False
    return settings


def make_scheduler(name: str, model_scheduler_config: dict[str, Any]) -> Any:
    """A fresh scheduler of kind ``name`` with the model's noise schedule and saved sampling settings."""
    import diffusers

    settings = sampler_settings(name, model_scheduler_config)
    class_name = SAMPLERS[name][0]
    cls = getattr(diffusers, class_name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    config = {k: v for k, v in model_scheduler_config.items() if k in accepted}
    config.update(settings)
    try:
        with _quiet_diffusers():
            return cls.from_config(config)
    except (NotImplementedError, ValueError, TypeError, KeyError, AttributeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(
            f"the model's scheduler settings cannot build {class_name} ({reason[:200]}); fix "
            "scheduler/scheduler_config.json (beta_schedule: linear, scaled_linear or squaredcos_cap_v2)"
        ) from None


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers logs its own fix-ups of incompatible final-step settings (singlestep DPM-Solver forces
    ``lower_order_final``) at every construction and ``set_timesteps``: expected here, not news to the user."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def set_timesteps(scheduler: Any, steps: int) -> None:
    with _quiet_diffusers():
        scheduler.set_timesteps(steps)


def check_conditioning(name: str, scheduler: Any) -> None:
    """Warn when a sampler without a λ clip starts where ᾱ ≈ 0 (cosine schedules with ``linspace``/``trailing``
    spacing): the x₀ estimate there multiplies the network's ε error by σ/α, e.g. 2·10⁴ at t = 999 of
    ``squaredcos_cap_v2``, and the samples come out saturated. Call after ``set_timesteps``."""
    first = int(round(float(scheduler.timesteps[0])))
    alpha_bar = float(scheduler.alphas_cumprod[first])
    lam = 0.5 * (math.log(max(alpha_bar, 1e-38)) - math.log(max(1.0 - alpha_bar, 1e-38)))
    if lam >= COSINE_LAMBDA_MIN or getattr(scheduler.config, "lambda_min_clipped", -math.inf) > -math.inf:
        return
    if getattr(scheduler.config, "clip_sample", False) or getattr(scheduler.config, "thresholding", False):
        return
    warnings.warn(
        f"sampler {name} starts at t = {first} where alpha_bar = {alpha_bar:.1e} (lambda = {lam:.1f}): the network's "
        f"error is amplified {math.exp(-lam):.0e}x there and samples may saturate; use a dpm++ sampler (lambda "
        "clipped at -5.1) or timestep_spacing \"leading\" in scheduler/scheduler_config.json",
        QDiffuseWarning,
        stacklevel=2,
    )


def check_schedule(model_scheduler_config: dict[str, Any]) -> None:
    """Fail when a model folder is read, not after calibration, if its schedule cannot make a sampler."""
    if not isinstance(model_scheduler_config, dict):
        raise ConfigError("scheduler/scheduler_config.json must hold a JSON object; re-save the model folder")
    make_scheduler("ddpm", model_scheduler_config)


def validate_steps(scheduler: Any, steps: int) -> None:
    total = scheduler.config.num_train_timesteps
    if not 1 <= steps <= total:
        raise ConfigError(f"--steps {steps} is out of range; use 1 to {total} (the model's training timesteps)")


__all__ = [
    "SAMPLERS",
    "SAMPLER_HELP",
    "HIGHER_ORDER_SAMPLERS",
    "sampler_settings",
    "make_scheduler",
    "check_conditioning",
    "set_timesteps",
    "check_schedule",
    "validate_steps",
]
