"""Which diffusers pipelines qdiffuse quantizes, and which of their components is the denoiser.

The layer policy of each denoiser (the layers kept at 8 bits below 8-bit schemes, and those whose input stays in
floating point) lives with the other defaults in :data:`qdiffuse.config.KEEP_8BIT_BY_ARCHITECTURE` and
:data:`qdiffuse.config.DEFAULT_FP_INPUT`; the patterns only match their own architecture's layer names.
"""

from __future__ import annotations

from typing import Any

from qdiffuse.errors import ConfigError

SUPPORTED: dict[str, tuple[str, str]] = {
    "StableDiffusionPipeline": ("unet", "UNet2DConditionModel"),
    "StableDiffusionXLPipeline": ("unet", "UNet2DConditionModel"),
    "PixArtAlphaPipeline": ("transformer", "PixArtTransformer2DModel"),
    "PixArtSigmaPipeline": ("transformer", "PixArtTransformer2DModel"),
    "StableDiffusion3Pipeline": ("transformer", "SD3Transformer2DModel"),
    "FluxPipeline": ("transformer", "FluxTransformer2DModel"),
}
"""Pipeline class -> (the component quantized, the class it must be)."""

DENOISER_COMPONENTS = frozenset(component for component, _ in SUPPORTED.values())


def unsupported_message(name: str) -> str:
    return (
        f"{name} is not supported yet; qdiffuse quantizes {', '.join(SUPPORTED)} pipelines (and bare "
        "UNet2DModel, UNet2DConditionModel and DiT denoisers)"
    )


def denoiser_component(pipe: Any) -> str:
    """The component that is quantized, or a one-line error for a pipeline not supported (yet)."""
    name = type(pipe).__name__
    if name not in SUPPORTED:
        raise ConfigError(unsupported_message(name))
    component, expected = SUPPORTED[name]
    model = getattr(pipe, component, None)
    if type(model).__name__ != expected:
        raise ConfigError(f"{name}.{component} is a {type(model).__name__}, not a {expected}")
    return component


def component_names(pipe: Any) -> list[str]:
    """The pipeline's registered components that are present (not None), in model_index order."""
    return [name for name, value in pipe.components.items() if value is not None]


__all__ = ["SUPPORTED", "DENOISER_COMPONENTS", "denoiser_component", "component_names", "unsupported_message"]
