"""Quantizing SD-1.5-size and SDXL-size pipelines in bf16 on a CPU: wall time and peak resident memory per stage.

The UNets are built from the published SD-1.5 and SDXL UNet configs with random weights, directly in bf16 (the
default dtype is bf16 while they are built, so no float32 copy ever exists); text encoders and the VAE are tiny,
with the widths the UNet expects. Each stage's peak RSS is the process's high-water mark reset at the stage's
start (``/proc/self/clear_refs``), beside the bf16 model's own bytes and the calibration set's.

    OMP_NUM_THREADS=1 python benchmarks/big_models.py --model sd15 --method minmax --out runs/big/sd15-w8a8.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def rss_peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class Stages:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, fn: Any) -> Any:
        reset_peak()
        start = time.perf_counter()
        out = fn()
        self.rows.append({"stage": name, "seconds": round(time.perf_counter() - start, 1),
                          "peak_rss_mib": round(rss_peak_mib(), 1)})
        print(self.rows[-1], flush=True)
        return out


def tokenizer(root: Path) -> Any:
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=16)


def build(model: str, root: Path) -> Any:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = tokenizer(root)

    def clip(hidden: int, projection: int | None = None) -> Any:
        extra = {} if projection is None else {"projection_dim": projection}
        config = CLIPTextConfig(vocab_size=len(tok.get_vocab()), hidden_size=hidden, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16,
                                bos_token_id=0, eos_token_id=1, pad_token_id=1, **extra)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        unet = UNet2DConditionModel(**(SD15_UNET if model == "sd15" else SDXL_UNET)).eval()
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
            norm_num_groups=8, sample_size=64,
        ).eval()
        scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        if model == "sd15":
            return StableDiffusionPipeline(
                vae=vae, text_encoder=clip(768), tokenizer=tok, unet=unet, scheduler=scheduler, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False,
            )
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=clip(768), text_encoder_2=clip(1280, 1280), tokenizer=tok, tokenizer_2=tok,
            unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
        )
    finally:
        torch.set_default_dtype(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--scheme", default="w8a8")
    parser.add_argument("--method", default=None, help="default: the scheme's (minmax for w8a8/w4a8)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (the VAE factor is 2)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from qdiffuse.api import quantize
    from qdiffuse.config import QuantConfig
    from qdiffuse.kernels import runtime_report
    from qdiffuse.models.denoiser import Denoiser
    from qdiffuse.pipelines.calibrate import collect_pipeline_calibration
    from qdiffuse.progress import set_progress_enabled

    set_progress_enabled(False)
    stages = Stages()
    root = Path(tempfile.mkdtemp())
    pipe = stages.run("build (bf16)", lambda: build(args.model, root))
    pipe.set_progress_bar_config(disable=True)
    unet_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    prompts = ["a red car", "a blue house", "a green tree", "a cat"][: args.prompts]
    call = dict(num_inference_steps=args.steps, guidance_scale=5.0, height=args.size, width=args.size)
    calib = stages.run("calibrate (pipeline run)", lambda: collect_pipeline_calibration(
        pipe, prompts, calib_steps=args.steps, **call))
    calib_bytes = calib.x.numel() * calib.x.element_size() + sum(
        t.numel() * t.element_size() for t in calib.cond.tensors())
    config = QuantConfig.from_scheme(args.scheme, method=args.method, calib_steps=args.steps)
    denoiser = Denoiser.from_model(pipe.unet)
    stages.run(f"quantize ({config.scheme} {config.method})", lambda: quantize(
        denoiser, dict(pipe.scheduler.config), config, calib=calib, batch_size=2))
    report = runtime_report(pipe.unet)
    images = stages.run("sample (1 image)", lambda: pipe(
        prompts[0], generator=torch.Generator().manual_seed(0), output_type="np", **call).images)
    result = {
        "model": args.model, "scheme": config.scheme, "method": config.method, "size": args.size,
        "prompts": len(prompts), "steps": args.steps, "calibration_rows": len(calib),
        "unet_params": unet_params,
        "bf16_unet_mib": round(unet_bytes / 2**20, 1), "calibration_mib": round(calib_bytes / 2**20, 1),
        "packed_weights_mib": round(report.packed_bytes / 2**20, 1), "runtime": report.summary(),
        "finite": bool(torch.isfinite(torch.as_tensor(images)).all()), "stages": stages.rows,
    }
    budget = 1.5 * (unet_bytes + calib_bytes) / 2**20
    result["peak_rss_mib"] = max(r["peak_rss_mib"] for r in stages.rows[1:])
    result["target_mib"] = round(budget, 1)
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
