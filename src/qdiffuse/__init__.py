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
        from qdiffuse.pipelines.quantize import quantize_pipeline

        return quantize_pipeline(model, config, prompts, **kwargs)
    if prompts is not None:
        raise ConfigError("prompts calibrate pipelines; a bare denoiser takes calib= (a CalibrationSet) instead")
    if scheduler_config is None:
        raise ConfigError("a bare denoiser needs scheduler_config= (its scheduler's config dict)")
    from qdiffuse.api import quantize as quantize_module

    return quantize_module(model, scheduler_config, config, **kwargs)


def save(pipe: Any, path: Any, overwrite: bool = False, source: Any = None) -> Any:
    """Save a pipeline whose denoiser :func:`quantize` quantized, with its PTQD statistics if it has them (see
    :func:`load_pipeline`). ``source``: the FP pipeline folder, for ``qdiffuse analyze``."""
    from qdiffuse.pipelines.store import save_pipeline

    return save_pipeline(pipe, path, overwrite, None if source is None else str(source))


def load_pipeline(
    path: Any, device: str = "cpu", runtime: str = "real", verify: bool = True, ptqd: bool = True, dtype: Any = None
) -> Any:
    """A saved quantized pipeline as its diffusers pipeline class, ready for ``pipe(prompt, ...)``; its scheduler
    is a :class:`PTQDScheduler` when the folder holds noise statistics (and ``ptqd``). ``dtype`` (``"bf16"``,
    ``torch.float16``...; None: the one the folder records) is what every component computes in."""
    from qdiffuse.pipelines.store import load_pipeline as load

    return load(path, device, runtime, verify, ptqd, dtype)


def __getattr__(name: str) -> Any:
    if name == "QuantConfig":
        from qdiffuse.config import QuantConfig

        return QuantConfig
    if name == "PTQDScheduler":
        from qdiffuse.pipelines.ptqd import PTQDScheduler

        return PTQDScheduler
    raise AttributeError(f"module 'qdiffuse' has no attribute {name!r}")


__all__ = ["__version__", "quantize", "save", "load_pipeline", "QuantConfig", "PTQDScheduler"]
