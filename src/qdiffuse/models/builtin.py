"""Registry of the built-in diffusion models shipped inside the package.

Model weights cannot be downloaded at run time in the environments qdiffuse targets, so the built-ins are
trained by ``qdiffuse train`` and shipped as diffusers folders under ``qdiffuse/models/builtin/<name>/``.
A model can be registered before its folder is shipped; asking for it then says how to train it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qdiffuse.errors import ModelLoadError

#: Where the shipped folders live; ``Path(__file__)`` works both from a source tree and an installed wheel.
BUILTIN_ROOT = Path(__file__).resolve().parent / "builtin"


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in model: its folder name under :data:`BUILTIN_ROOT`, a one-line description, and where its
    denoiser lives inside the folder (``unet`` or ``transformer``)."""

    name: str
    folder: str
    description: str
    subfolder: str
    pipeline: bool = False
    """A whole diffusers pipeline (text encoder, VAE): the commands treat it as a pipeline folder."""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            "fmnist-tiny",
            "fmnist-tiny",
            "class-conditional UNet2DModel, ~1.2M parameters, Fashion-MNIST 32×32 (CPU-trainable)",
            "unet",
        ),
        BuiltinModel(
            "fmnist-ddpm",
            "fmnist-ddpm",
            "class-conditional UNet2DModel, ~6.8M parameters, Fashion-MNIST 32×32 (GPU recipe)",
            "unet",
        ),
        BuiltinModel(
            "fmnist-dit",
            "fmnist-dit",
            "class-conditional DiTTransformer2DModel, patch 2, ~1.4M parameters, Fashion-MNIST 32×32 (CPU recipe)",
            "transformer",
        ),
        BuiltinModel(
            "fmnist-t2i",
            "fmnist-t2i",
            "latent text-to-image StableDiffusionPipeline: VAE 1x32x32 -> 4x8x8, UNet2DConditionModel with "
            "cross-attention on all-MiniLM-L6-v2 (CPU recipe)",
            "unet",
            pipeline=True,
        ),
    )
}


def _is_shipped(model: BuiltinModel) -> bool:
    folder = BUILTIN_ROOT / model.folder
    sub = folder / model.subfolder
    return (
        (folder / "model_index.json").is_file()
        and (sub / "config.json").is_file()
        and any(sub.glob("*.safetensors"))
        and (folder / "scheduler" / "scheduler_config.json").is_file()
    )


def builtin_path(name: str) -> Path:
    """The folder of built-in model ``name``, ready for ``from_pretrained``.

    Raises :class:`ModelLoadError` for an unknown name (listing the built-ins) and for a registered model
    whose folder is not shipped in this installation (saying how to train it).
    """
    model = BUILTIN_MODELS.get(name)
    if model is None:
        raise ModelLoadError(
            f"unknown built-in model {name!r}; the built-ins are {', '.join(BUILTIN_MODELS)}"
        )
    if not _is_shipped(model):
        raise ModelLoadError(
            f"built-in model {name!r} is not shipped with this installation; run `qdiffuse train {name}` "
            "and pass the output folder instead"
        )
    return BUILTIN_ROOT / model.folder


def list_builtin() -> list[str]:
    """Names of the built-in models whose folders are shipped (loadable without training)."""
    return [name for name, model in BUILTIN_MODELS.items() if _is_shipped(model)]


__all__ = ["BUILTIN_MODELS", "BUILTIN_ROOT", "BuiltinModel", "builtin_path", "list_builtin"]
