"""Tiny diffusers models built from configs and saved as pipeline folders, for fast end-to-end tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


def tiny_dit(attention_bias: bool = True) -> DiTTransformer2DModel:
    return DiTTransformer2DModel(
        attention_bias=attention_bias,
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


def calibrate_layer(layer: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Calibrate one quantized layer on ``x`` alone (weight ranges, then input ranges); returns it."""
    layer.calibrate_weight()
    for q in layer.input_quantizers:
        q.start_calibration()
    layer(x)
    for q in layer.input_quantizers:
        q.finish_calibration()
    return layer


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


# ------------------------------------------------------------------------------------- shared session folders

TINY_KINDS = ("unet", "cond", "dit")
"""Folder kinds :func:`tiny_folder` builds: a class-conditional UNet with a null class (classes 0-2, null 3),
a text-conditional UNet with cross-attention, and a DiT (classes 0-3, null 4)."""

_FOLDER_CACHE: dict[tuple, Path] = {}


def _build(kind: str) -> tuple[torch.nn.Module, dict | None]:
    """The same weights whichever test builds the shared folder first (not whatever the global RNG holds then)."""
    torch.manual_seed(0)
    if kind == "unet":
        return tiny_unet(4), {"num_classes": 3, "null_class": 3}
    if kind == "cond":
        return tiny_cond_unet(), None
    if kind == "dit":
        return tiny_dit(), None
    raise ValueError(f"unknown tiny model kind {kind!r}; use one of {TINY_KINDS}")


def tiny_folder(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved FP pipeline folder of ``kind``, built once per test session; never modify it (copy it first)."""
    key = ("fp", kind)
    if key not in _FOLDER_CACHE:
        model, meta = _build(kind)
        _FOLDER_CACHE[key] = save_folder(model, tmp_path_factory.mktemp(f"tiny-{kind}"), meta)
    return _FOLDER_CACHE[key]


def tiny_quantized_folder(
    kind: str, scheme: str, tmp_path_factory: pytest.TempPathFactory, guidance: float = 1.0
) -> Path:
    """``tiny_folder(kind)`` quantized with ``scheme`` (3 × 4 calibration inputs over a 4-step DDIM), built once."""
    key = ("q", kind, scheme, guidance)
    if key not in _FOLDER_CACHE:
        from qdiffuse.api import quantize
        from qdiffuse.config import QuantConfig
        from qdiffuse.io import save_quantized
        from qdiffuse.models.loading import load_model_folder
        from qdiffuse.progress import set_progress_enabled

        set_progress_enabled(False)
        loaded = load_model_folder(tiny_folder(kind, tmp_path_factory))
        # outlier handling off: these folders are fixtures for formats, kernels and loading (the untrained tiny
        # models amplify any one-code difference); tests/test_outliers.py covers the handling itself
        config = QuantConfig.from_scheme(
            scheme, calib_steps=3, calib_per_step=4, calib_num_inference_steps=4, outliers="off", guard_db=0
        )
        quantize(loaded.denoiser, loaded.scheduler_config, config, guidance=guidance)
        out = tmp_path_factory.mktemp(f"tiny-{kind}-{scheme}") / "q"
        _FOLDER_CACHE[key] = save_quantized(loaded, out)
    return _FOLDER_CACHE[key]


def probe_inputs(loaded: object, seed: int = 5) -> tuple:
    """Two fixed network inputs (x_t, t, labels, text condition) for comparing a model's outputs before and after
    saving, loading or damaging its folder."""
    d = loaded.denoiser  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *d.sample_shape, generator=gen)
    t = torch.tensor([700, 20])
    labels = torch.tensor([1, d.null_class]) if d.num_classes else None
    cond = torch.randn(2, 4, d.cross_attention_dim, generator=gen) if d.kind == "unet_cond" else None
    return x, t, labels, cond


def denoiser_outputs(loaded: object, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return loaded.denoiser.forward_raw(*inputs)  # type: ignore[attr-defined]
