"""qdiffuse: noise-aware post-training quantization of diffusion models.

The top-level API takes what users have: a diffusers pipeline (calibrated by running it on prompts) or a bare
denoiser with its scheduler config and a calibration set. Imports are lazy, so ``import qdiffuse`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def quantize(
    model: Any, config: Any, *, prompts: Any = None, scheduler_config: dict | None = None, **kwargs: Any
) -> Any:
    """Quantize a diffusers pipeline (its denoiser, calibrated by running the pipeline on ``prompts``) or a bare
    denoiser (``scheduler_config`` and optionally ``calib``/``guidance``/``labels``; see
    :func:`qdiffuse.api.quantize`). Returns the pipeline or the quantized module."""
    from qdiffuse.errors import ConfigError

    if hasattr(model, "components") and hasattr(model, "scheduler"):
        from qdiffuse.pipelines.stable_diffusion import quantize_pipeline

        return quantize_pipeline(model, config, prompts, **kwargs)
    if prompts is not None:
        raise ConfigError("prompts calibrate pipelines; a bare denoiser takes calib= (a CalibrationSet) instead")
    if scheduler_config is None:
        raise ConfigError("a bare denoiser needs scheduler_config= (its scheduler's config dict)")
    from qdiffuse.api import quantize as quantize_module

    return quantize_module(model, scheduler_config, config, **kwargs)


def save(pipe: Any, path: Any, overwrite: bool = False) -> Any:
    """Save a pipeline whose denoiser :func:`quantize` quantized (see :func:`load_pipeline`)."""
    from qdiffuse.pipelines.stable_diffusion import save_pipeline

    return save_pipeline(pipe, path, overwrite)


def load_pipeline(path: Any, device: str = "cpu", runtime: str = "real", verify: bool = True) -> Any:
    """A saved quantized pipeline as its diffusers pipeline class, ready for ``pipe(prompt, ...)``."""
    from qdiffuse.pipelines.stable_diffusion import load_pipeline as load

    return load(path, device, runtime, verify)


def __getattr__(name: str) -> Any:
    if name == "QuantConfig":
        from qdiffuse.config import QuantConfig

        return QuantConfig
    raise AttributeError(f"module 'qdiffuse' has no attribute {name!r}")


__all__ = ["__version__", "quantize", "save", "load_pipeline", "QuantConfig"]
