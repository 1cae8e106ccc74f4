"""diffusers pipelines in, pipelines out: calibration by running the pipeline itself on prompts.

A pipeline's denoiser is only ever called by the pipeline (text encoding, classifier-free guidance, the
scheduler's own scaling), so calibration records the denoiser's exact inputs while the FP pipeline generates
from the user's prompts with the guidance and sampler they will use. The quantized denoiser then replaces the FP
one in the same pipeline object; the other components stay FP and untouched.

On disk a quantized pipeline is the ``save_pretrained`` layout with the denoiser's subfolder holding a qdiffuse
quantized folder (codes, manifest, integrity hashes) instead of diffusers weights, and ``qdiffuse_pipeline.json``
naming it; :func:`load_pipeline` rebuilds it with diffusers' own ``from_pretrained`` for everything else.

Built so far: pipelines whose denoiser is a ``UNet2DConditionModel`` without added conditions (Stable Diffusion
1.x/2.x and their fine-tunes). Other pipeline classes are refused with a line that says so.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdiffuse.calibration.collect import CalibrationSet, calibration_step_indices
from qdiffuse.config import NOISE_CORRECTING_METHODS, TRAJECTORY_METHODS, QuantConfig
from qdiffuse.errors import ConfigError, DataError, ModelLoadError

PIPELINE_FILE = "qdiffuse_pipeline.json"
SUPPORTED = {"StableDiffusionPipeline": "unet"}
"""Pipeline class -> the denoiser component quantized."""

DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn",
    "a close-up portrait of an old man with a beard, studio lighting",
    "a bowl of fruit on a wooden table, oil painting",
    "a futuristic city skyline at night, neon lights",
    "a red sports car on a mountain road",
    "a cat sleeping on a windowsill in the sun",
    "an isometric illustration of a cozy library",
)
"""Prompts that calibrate when the user gives none: varied subjects, styles and lighting."""


def denoiser_component(pipe: Any) -> str:
    """The component that is quantized, or a one-line error for a pipeline not supported yet."""
    name = type(pipe).__name__
    if name not in SUPPORTED:
        raise ConfigError(
            f"{name} is not supported yet; qdiffuse quantizes {', '.join(SUPPORTED)} pipelines (and bare "
            "UNet2DModel, UNet2DConditionModel and DiT denoisers)"
        )
    component = SUPPORTED[name]
    unet = getattr(pipe, component, None)
    if type(unet).__name__ != "UNet2DConditionModel":
        raise ConfigError(f"{name}.{component} is a {type(unet).__name__}, not a UNet2DConditionModel")
    if getattr(unet.config, "addition_embed_type", None) is not None:
        raise ConfigError("UNets with added text/time conditions (SDXL) are not supported yet")
    return component


def check_prompts(prompts: Sequence[str] | None) -> list[str]:
    if prompts is None:
        return list(DEFAULT_PROMPTS)
    prompts = [p for p in (str(x).strip() for x in prompts) if p]
    if not prompts:
        raise DataError("the prompt list is empty; give at least one non-empty prompt, one per line")
    return prompts


@torch.no_grad()
def collect_pipeline_calibration(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    calib_steps: int = 10,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    batch_size: int = 4,
) -> CalibrationSet:
    """Run the FP pipeline on ``prompts`` (latents only, no decoding) and keep the denoiser's inputs at
    ``calib_steps`` evenly spaced steps: both halves of every guided call, with the real text embeddings."""
    component = denoiser_component(pipe)
    prompts = check_prompts(prompts)
    unet: nn.Module = getattr(pipe, component)
    keep = set(calibration_step_indices(num_inference_steps, calib_steps))
    records: dict[str, list[torch.Tensor]] = {"x": [], "t": [], "cond": []}
    calls = [0]

    def record(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        cond = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if calls[0] % num_inference_steps in keep:
            t = torch.as_tensor(timestep).reshape(-1).to(torch.long).cpu()
            records["x"].append(sample.detach().float().cpu())
            records["t"].append(t.expand(sample.shape[0]).clone() if t.numel() == 1 else t)
            records["cond"].append(cond.detach().float().cpu())
        calls[0] += 1

    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for lo in range(0, len(prompts), batch_size):
            calls[0] = 0
            try:
                pipe(
                    list(prompts[lo : lo + batch_size]),
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    height=height,
                    width=width,
                    generator=torch.Generator().manual_seed(seed + lo),
                    output_type="latent",
                )
            except ValueError as exc:
                reason = " ".join(str(exc).split())[:200]
                raise ConfigError(f"the pipeline refused the calibration call ({reason})") from None
    finally:
        handle.remove()
    if not records["x"]:
        raise DataError("the pipeline never called its denoiser; check num_inference_steps")
    return CalibrationSet(torch.cat(records["x"]), torch.cat(records["t"]), None, torch.cat(records["cond"]))


def quantize_pipeline(
    pipe: Any,
    config: QuantConfig,
    prompts: Sequence[str] | None = None,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    runtime: str = "real",
    batch_size: int = 4,
) -> Any:
    """Quantize ``pipe``'s denoiser in place (calibrated by running ``pipe`` on ``prompts``) and return ``pipe``."""
    from qdiffuse.api import quantize
    from qdiffuse.models.denoiser import Denoiser

    component = denoiser_component(pipe)
    if config.method in NOISE_CORRECTING_METHODS or config.method in TRAJECTORY_METHODS:
        raise ConfigError(
            f"--method {config.method} on pipelines is not built yet (its statistics come from qdiffuse's own "
            "sampling loop); use minmax, mse, mse+bias, gptq or qdiffusion"
        )
    calib = collect_pipeline_calibration(
        pipe, prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        calib_steps=config.calib_steps, height=height, width=width, seed=config.seed, batch_size=batch_size,
    )
    unet = getattr(pipe, component)
    denoiser = Denoiser.from_model(unet)
    quantize(denoiser, dict(pipe.scheduler.config), config, calib=calib, runtime=runtime, batch_size=8)
    return pipe


def save_pipeline(pipe: Any, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``pipe`` with its quantized denoiser: diffusers' layout for the FP components, a qdiffuse quantized
    folder for the denoiser (atomically, like every qdiffuse output)."""
    from qdiffuse.api import quant_state
    from qdiffuse.fsutil import QUANTIZED_FOLDER, atomic_dir
    from qdiffuse.io import save_quantized
    from qdiffuse.models.denoiser import Denoiser
    from qdiffuse.models.loading import LoadedModel

    component = denoiser_component(pipe)
    unet = getattr(pipe, component)
    if quant_state(unet) is None:
        raise ModelLoadError("this pipeline's denoiser is not quantized; run qdiffuse.quantize(pipe, config) first")
    path = Path(path)
    with atomic_dir(path, overwrite, QUANTIZED_FOLDER) as tmp:
        pipe.register_modules(**{component: None})
        try:
            pipe.save_pretrained(tmp)
        finally:
            pipe.register_modules(**{component: unet})
        index = json.loads((tmp / "model_index.json").read_text())
        index[component] = ["diffusers", type(unet).__name__]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        loaded = LoadedModel(Denoiser.from_model(unet), dict(pipe.scheduler.config), None, component, {})
        save_quantized(loaded, tmp / component)
        (tmp / PIPELINE_FILE).write_text(json.dumps({"denoiser": component, "pipeline": type(pipe).__name__}))
    return path


def is_quantized_pipeline(path: str | Path) -> bool:
    return (Path(path) / PIPELINE_FILE).is_file()


def load_pipeline(path: str | Path, device: str = "cpu", runtime: str = "real", verify: bool = True) -> Any:
    """A quantized pipeline folder back as the diffusers pipeline it was, its denoiser on ``runtime``."""
    import diffusers

    from qdiffuse.io import load_quantized
    from qdiffuse.models.loading import read_json

    path = Path(path)
    if not is_quantized_pipeline(path):
        raise ModelLoadError(
            f"{path} is not a quantized pipeline folder (no {PIPELINE_FILE}); save one with qdiffuse.save"
        )
    marker = read_json(path / PIPELINE_FILE, "pipeline marker")
    component = marker.get("denoiser")
    if component not in SUPPORTED.values():
        raise ModelLoadError(f"{path / PIPELINE_FILE} names denoiser {component!r}; re-save the pipeline")
    unet = load_quantized(path / component, device, runtime, verify=verify).denoiser.model
    index = read_json(path / "model_index.json", "model_index.json")
    cls = getattr(diffusers, str(index.get("_class_name")), None)
    if cls is None:
        raise ModelLoadError(
            f"{path / 'model_index.json'} names {index.get('_class_name')!r}, not a diffusers pipeline"
        )
    try:
        pipe = cls.from_pretrained(path, **{component: unet})
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot load the pipeline in {path} ({' '.join(str(exc).split())[:200]})") from None
    return pipe.to(device)


__all__ = [
    "SUPPORTED",
    "DEFAULT_PROMPTS",
    "collect_pipeline_calibration",
    "quantize_pipeline",
    "save_pipeline",
    "load_pipeline",
    "is_quantized_pipeline",
    "denoiser_component",
]
