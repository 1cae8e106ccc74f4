"""Tiny diffusers models built from configs and saved as pipeline folders, for fast end-to-end tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel


def tiny_unet(num_class_embeds: int | None = 4) -> UNet2DModel:
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    )


def tiny_cond_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=24,
        attention_head_dim=8,
    )


def tiny_dit() -> DiTTransformer2DModel:
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=2,
        num_layers=2,
        sample_size=16,
        patch_size=4,
        num_embeds_ada_norm=4,
        norm_num_groups=8,
    )


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


def save_folder(model: torch.nn.Module, root: Path, meta: dict | None = None) -> Path:
    """Write the layout of DDPMPipeline.save_pretrained: model subfolder + scheduler/."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sub = "transformer" if isinstance(model, DiTTransformer2DModel) else "unet"
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root / sub)
    scheduler().save_pretrained(root / "scheduler")
    if meta:
        (root / "qdiffuse.json").write_text(json.dumps(meta))
    return root
