"""The text path's sensitivity on fmnist-t2i, per layer: the UNet's cross-attention K/V projections (which read the
text states) and each layer of the text encoder, at 8 against 4 bits, everything else FP.

Each row quantizes one layer (or one BERT layer's six Linear layers) with qdiffuse's real path
(``QuantConfig`` rules keep every other layer FP; the text encoder through
:func:`qdiffuse.pipelines.text_encoders.quantize_text_encoders`), then generates one image per held-apart
caption with the seeds of the FP run and reports the PSNR of the images to the FP ones and the text alignment.
A self-attention K/V pair of the same block is measured beside the cross-attention ones for comparison.

    OMP_NUM_THREADS=1 python benchmarks/t2i_text_sensitivity.py --steps 20
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from qdiffuse.config import QuantConfig
from qdiffuse.models.captions import class_named
from qdiffuse.pipelines.bench import calibration_prompts, evaluation_prompts
from qdiffuse.pipelines.commands import generate, load_fp_pipeline, quiet_libraries
from qdiffuse.pipelines.quantize import quantize_pipeline
from qdiffuse.pipelines.text_encoders import quantize_text_encoders
from qdiffuse.progress import set_progress_enabled


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def alignment(images: np.ndarray, which: np.ndarray, prompts: list[str]) -> float:
    from qdiffuse.eval.evaluate import evaluate_samples

    classes = np.asarray([class_named(p) for p in prompts])[which]
    return float(evaluate_samples(images, "fmnist", labels=classes)["label_accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fmnist-t2i")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--per-caption", type=int, default=2)
    args = parser.parse_args()
    set_progress_enabled(False)
    quiet_libraries()
    torch.set_num_threads(1)
    prompts = evaluation_prompts()
    num = len(prompts) * args.per_caption
    base = load_fp_pipeline(args.model, "cpu")
    base.set_progress_bar_config(disable=True)

    def draw(pipe: object) -> tuple[np.ndarray, np.ndarray]:
        return generate(pipe, prompts, num=num, steps=args.steps, guidance=args.guidance, seed=0, batch_size=60,
                        height=None, width=None)

    fp, which = draw(base)
    print(f"FP: text alignment {alignment(fp, which, prompts):.3f} ({num} images, DDIM {args.steps})")
    print()
    print("| quantized alone | bits (W/A) | layers | PSNR to FP (dB) | text alignment | s |")
    print("|---|---|---|---|---|---|")
    calib = calibration_prompts(32)
    attn = [n for n, _ in base.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v", "attn1.to_k",
                                                                   "attn1.to_v"))]
    pairs = sorted({n.rsplit(".", 2)[0] + "." + n.rsplit(".", 2)[1] for n in attn})
    for pair in pairs:
        for scheme in ("w8a8", "w4a8"):
            start = time.perf_counter()
            pipe = copy.deepcopy(base)
            others = [n for n, m in pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                      and n not in (f"{pair}.to_k", f"{pair}.to_v")]
            config = QuantConfig.from_scheme(scheme, method="mse", keep_fp=tuple(others), keep_8bit=None,
                                             quantize_attention=False, guard_db=0, outliers="off", calib_steps=10)
            quantize_pipeline(pipe, config, calib, num_inference_steps=args.steps, guidance_scale=args.guidance)
            images, _ = draw(pipe)
            kind = "cross-attention (text) K/V" if pair.endswith("attn2") else "self-attention K/V"
            print(f"| `{pair}` {kind} | {scheme[1]}/{scheme[3]} | 2 | {psnr(images, fp):.2f} | "
                  f"{alignment(images, which, prompts):.3f} | {time.perf_counter() - start:.0f} |", flush=True)
    layers = sorted({".".join(n.split(".")[:3]) for n, _ in base.text_encoder.named_modules()
                     if n.startswith("encoder.layer.") and n.count(".") >= 2})
    for scope, patterns in [*((layer, [f"{layer}.*"]) for layer in layers), ("whole text encoder", None)]:
        for scheme in ("w8a8", "w4a8"):
            start = time.perf_counter()
            pipe = copy.deepcopy(base)
            counts = quantize_text_encoders(pipe, scheme, calib, layers=patterns, guidance_scale=args.guidance)
            images, _ = draw(pipe)
            print(f"| text encoder `{scope}` | {scheme[1]}/{scheme[3]} | {sum(counts.values())} | "
                  f"{psnr(images, fp):.2f} | {alignment(images, which, prompts):.3f} | "
                  f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
