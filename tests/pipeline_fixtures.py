"""Tiny random-weight diffusers pipelines built from configs, entirely offline, for end-to-end pipeline tests.

Every builder seeds torch itself (so two calls give the same weights), writes its tokenizers as files under `root`
from a small character vocabulary (no hub download, no sentencepiece), and returns the pipeline with its models in
eval mode. `CALLS[name]` holds the keyword arguments that make `pipe(prompts, generator=..., output_type="np",
**CALLS[name])` run in well under a second on a CPU. Images are 16 x 16: 8 is the smallest every pipeline accepts
(SD, SDXL and PixArt want multiples of 8; SD3 and FLUX multiples of 4 with this factor-2 VAE) but 16 keeps an 8 x 8
latent, so the transformers see 16 image tokens rather than 4. The T5 sequence length is cut to the tokenizers' 16.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

MAX_LENGTH = 16  # every tokenizer's model_max_length and the T5 max_sequence_length the calls pass
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_tokenizer(root: Path) -> CLIPTokenizer:
    """A CLIP tokenizer from a character vocabulary written here (no download)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(root / "vocab.json"), str(root / "merges.txt"), pad_token="<|endoftext|>", model_max_length=MAX_LENGTH
    )


def tiny_t5_tokenizer(root: Path) -> T5Tokenizer:
    """A T5 tokenizer (a `tokenizers` Unigram over single letters) saved under root/t5_tokenizer and loaded back from
    there, so what the fixtures hand out is exactly what `from_pretrained` of a saved pipeline builds (sentencepiece
    is not needed: transformers 5 keeps T5's vocabulary in tokenizer.json). Ids: <pad> 0, </s> 1, <unk> 2."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in LETTERS]
    folder = root / "t5_tokenizer"
    T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_LENGTH).save_pretrained(folder)
    return T5Tokenizer.from_pretrained(folder)


def tiny_clip_config(tokenizer: CLIPTokenizer, hidden_size: int, projection_dim: int | None = None) -> CLIPTextConfig:
    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        **extra,
    )


def tiny_t5_encoder(tokenizer: T5Tokenizer, d_model: int = 32) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))


def tiny_vae(latent_channels: int = 4, **config: Any) -> AutoencoderKL:
    """In eval mode; two blocks, so the VAE factor (2 ** (blocks - 1)) is 2 and a 16-pixel image is an 8 x 8 latent."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
        latent_channels=latent_channels, norm_num_groups=8, sample_size=16, **config,
    ).eval()


def tiny_sd(root: Path) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(root)
    text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, 32))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
    )
    vae = tiny_vae()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl(root: Path) -> StableDiffusionXLPipeline:
    """SDXL's layout: the UNet's context is both CLIPs' penultimate hidden states side by side (16 + 16) and its
    "text_time" added embedding takes the second CLIP's projection (16) plus 6 size/crop ids x 8."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(root)
    text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, 16))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(tokenizer, 16, projection_dim=16))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
    )
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading", steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(scaling_factor=0.13025), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(root), unet=unet.eval(), scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def tiny_pixart(root: Path) -> PixArtSigmaPipeline:
    """PixArt-Sigma's layout: a T5 encoder (d_model 32) projected by the transformer's caption projection, a
    learned-sigma output (8 = 2 x 4 latent channels), DPM-Solver++ like the released pipeline."""
    torch.manual_seed(0)
    tokenizer = tiny_t5_tokenizer(root)
    text_encoder = tiny_t5_encoder(tokenizer)
    transformer = PixArtTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, caption_channels=32, norm_num_groups=8,
    )
    return PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=tiny_vae(), transformer=transformer.eval(),
        scheduler=DPMSolverMultistepScheduler(),
    )


def tiny_sd3(root: Path) -> StableDiffusion3Pipeline:
    """SD3's layout: two projecting CLIPs (hidden 16 each, concatenated to 32 = the T5 width, projections 16 + 16 =
    the pooled width) and a T5 whose tokens follow the CLIP tokens in the context; 16 latent channels and the
    released VAE's shift/scale, a flow-matching Euler scheduler with shift 3."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(root)
    text_encoder = CLIPTextModelWithProjection(tiny_clip_config(tokenizer, 16, projection_dim=16))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(tokenizer, 16, projection_dim=16))
    tokenizer_3 = tiny_t5_tokenizer(root)
    text_encoder_3 = tiny_t5_encoder(tokenizer_3)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=8,
    )
    vae = tiny_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tiny_tokenizer(root), text_encoder_3=text_encoder_3.eval(), tokenizer_3=tokenizer_3,
    )


def tiny_flux(root: Path) -> FluxPipeline:
    """FLUX.1-dev's layout: CLIP's pooled output (32) and T5's tokens (32) condition a transformer on 2 x 2-packed
    16-channel latents (64 in); guidance-distilled (guidance_embeds) so guidance_scale reaches the transformer as an
    embedding and there is no second, unconditional pass; dynamic shifting like the released scheduler."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(root)
    text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, 32))
    tokenizer_2 = tiny_t5_tokenizer(root)
    text_encoder_2 = tiny_t5_encoder(tokenizer_2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae = tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2, transformer=transformer.eval(),
    )


FIXTURES: dict[str, Callable[[Path], DiffusionPipeline]] = {
    "sd": tiny_sd,
    "sdxl": tiny_sdxl,
    "pixart": tiny_pixart,
    "sd3": tiny_sd3,
    "flux": tiny_flux,
}

_BASE = {"num_inference_steps": 2, "height": 16, "width": 16, "guidance_scale": 4.0}
CALLS: dict[str, dict[str, Any]] = {
    "sd": dict(_BASE),
    "sdxl": dict(_BASE),
    # resolution binning snaps sizes to PixArt's 256+ px aspect-ratio table; clean_caption wants bs4 and ftfy
    "pixart": {**_BASE, "max_sequence_length": MAX_LENGTH, "use_resolution_binning": False, "clean_caption": False},
    "sd3": {**_BASE, "max_sequence_length": MAX_LENGTH},
    "flux": {**_BASE, "max_sequence_length": MAX_LENGTH},
}
