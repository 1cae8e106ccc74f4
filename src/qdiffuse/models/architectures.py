"""Architectures of the built-in Fashion-MNIST diffusion models, expressed as plain diffusers configs.

Keeping them as diffusers classes (not our own modules) means a shipped model folder loads with diffusers
alone, and the quantization passes are exercised on the same module types users bring.

Class conditioning and the null class
-------------------------------------
All three models are class-conditional with 10 Fashion-MNIST classes plus one *null* class, index
:data:`NULL_CLASS` = 10, used for classifier-free guidance (CFG): training replaces a fraction of the labels
by 10, sampling mixes ε(x, t, c) and ε(x, t, 10).

- UNets (``fmnist-tiny``, ``fmnist-ddpm``): ``num_class_embeds=11`` gives an ``nn.Embedding(11, time_dim)``
  whose output is added to the timestep embedding; row 10 is the null class.
- DiT (``fmnist-dit``): diffusers builds one ``CombinedTimestepLabelEmbeddings`` per transformer block (inside
  ``AdaLayerNormZero``) with ``class_dropout_prob=0.1`` hard-coded. ``LabelEmbedding`` then allocates
  ``num_embeds_ada_norm + 1`` rows and its ``token_drop`` maps dropped labels to index ``num_classes``
  (= ``num_embeds_ada_norm`` = 10): the null class is again row 10. In training mode it would also drop
  labels on its own, independently in every block, so the conditioning of one sample would disagree between
  blocks; :func:`prepare_for_training` switches that off and the trainer drops labels once per sample
  instead. In eval mode ``LabelEmbedding`` never drops, so passing label 10 selects the unconditional branch.
- ``out_channels`` of the DiT is 1 (ε only). diffusers also supports ``2 * in_channels`` for a learned
  variance, but our DDPM scheduler uses a fixed variance, so the extra half would be dead weight.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from diffusers.models.modeling_utils import ModelMixin

from qdiffuse.errors import ConfigError

NUM_CLASSES = 10
#: Label index of the unconditional ("null") class used for classifier-free guidance.
NULL_CLASS = 10
IMAGE_SIZE = 32
IN_CHANNELS = 1

_UNET_DOWN = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
_UNET_UP = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")

_CONFIGS: dict[str, tuple[type[ModelMixin], str, dict[str, Any]]] = {
    # Attention at 16×16 and 8×8 (plus the mid block at 8×8), none at 32×32 where it would dominate CPU time.
    "fmnist-tiny": (
        UNet2DModel,
        "unet",
        dict(
            sample_size=IMAGE_SIZE,
            in_channels=IN_CHANNELS,
            out_channels=IN_CHANNELS,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=_UNET_DOWN,
            up_block_types=_UNET_UP,
            attention_head_dim=32,
            norm_num_groups=8,
            num_class_embeds=NUM_CLASSES + 1,
        ),
    ),
    "fmnist-ddpm": (
        UNet2DModel,
        "unet",
        dict(
            sample_size=IMAGE_SIZE,
            in_channels=IN_CHANNELS,
            out_channels=IN_CHANNELS,
            block_out_channels=(64, 128, 128),
            layers_per_block=2,
            down_block_types=_UNET_DOWN,
            up_block_types=_UNET_UP,
            attention_head_dim=32,
            norm_num_groups=32,
            num_class_embeds=NUM_CLASSES + 1,
        ),
    ),
    # Patch 2 → 256 tokens: patch 4 (64 tokens) drew blocky sandals and sneakers, whose thin straps and soles
    # are 1–2 pixels wide. 4 heads × 32 = width 128; 4 blocks keep a step near 1.3 s on one CPU core (batch 32),
    # so the shipped model could be trained on a CPU in three stages (6500 steps, 2.2 h; 3500 steps drew clothes
    # but not yet shoes and bags).
    "fmnist-dit": (
        DiTTransformer2DModel,
        "transformer",
        dict(
            sample_size=IMAGE_SIZE,
            in_channels=IN_CHANNELS,
            out_channels=IN_CHANNELS,
            patch_size=2,
            num_attention_heads=4,
            attention_head_dim=32,
            num_layers=4,
            num_embeds_ada_norm=NUM_CLASSES,
        ),
    ),
}

MODEL_NAMES: tuple[str, ...] = tuple(_CONFIGS)


def _entry(name: str) -> tuple[type[ModelMixin], str, dict[str, Any]]:
    try:
        return _CONFIGS[name]
    except KeyError:
        choices = ", ".join(MODEL_NAMES)
        raise ConfigError(f"unknown built-in model {name!r}; choose one of {choices}") from None


def model_class(name: str) -> type[ModelMixin]:
    """The diffusers class of a built-in model (``UNet2DModel`` or ``DiTTransformer2DModel``)."""
    return _entry(name)[0]


def model_subfolder(name: str) -> str:
    """Subfolder of the denoiser in a pipeline folder: ``unet`` or ``transformer``, as diffusers names it."""
    return _entry(name)[1]


def model_config(name: str) -> dict[str, Any]:
    """Keyword arguments for the diffusers constructor of a built-in model (a fresh copy, safe to modify)."""
    return dict(_entry(name)[2])


def build_model(name: str) -> ModelMixin:
    """A freshly initialised (untrained) built-in model."""
    cls, _, config = _entry(name)
    return cls(**config)


def scheduler_config() -> dict[str, Any]:
    """The DDPM training schedule shared by all built-in models (Ho et al. 2020: 1000 linear steps)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        variance_type="fixed_small",
        clip_sample=False,
    )


def build_scheduler() -> DDPMScheduler:
    """A ``DDPMScheduler`` with :func:`scheduler_config`."""
    return DDPMScheduler(**scheduler_config())


def prepare_for_training(model: ModelMixin, reinitialise: bool = True) -> None:
    """Make a built model ready for training (``reinitialise=False``: continue from its current weights).

    For the DiT this (1) disables diffusers' per-block random label dropout so the trainer controls CFG
    dropout, and (2) applies the DiT paper's adaLN-Zero initialisation (modulations and output projection
    start at zero, so every block starts as the identity), which diffusers leaves at PyTorch defaults;
    training is markedly more stable with it. UNets need nothing. Label dropout must be switched off again
    after every ``from_pretrained``, because it is not part of the saved config.
    """
    if not isinstance(model, DiTTransformer2DModel):
        return
    from diffusers.models.embeddings import LabelEmbedding

    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
            if reinitialise:
                torch.nn.init.normal_(module.embedding_table.weight, std=0.02)
    if not reinitialise:
        return
    with torch.no_grad():
        for block in model.transformer_blocks:
            torch.nn.init.zeros_(block.norm1.linear.weight)
            torch.nn.init.zeros_(block.norm1.linear.bias)
        for layer in (model.proj_out_1, model.proj_out_2):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)


def denoise(
    model: ModelMixin, sample: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """ε prediction of either built-in model family, hiding the UNet/DiT difference in argument names."""
    if isinstance(model, DiTTransformer2DModel):
        return model(sample, timestep=timestep, class_labels=labels).sample
    return model(sample, timestep, class_labels=labels).sample
