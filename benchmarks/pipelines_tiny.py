"""One row per pipeline family: the whole path on the tiny random pipelines of the test suite.

For SD, SDXL, PixArt-Sigma, SD3 and FLUX: calibrate by running the pipeline on N prompts, quantize its denoiser,
optionally measure PTQD statistics through the pipeline, save, load, generate. Reports the seconds of calibration
per calibration image (the pipeline run that records the denoiser's inputs), the seconds of the whole quantization,
the PSNR of the quantized images to the FP ones (same prompts and seeds) and that the loaded folder gives the
images of the pipeline that was saved. The weights are random, so PSNR says that the path runs the quantized model,
not how good a real model's images are.

    OMP_NUM_THREADS=1 python benchmarks/pipelines_tiny.py --scheme w8a8 --method mse --prompts 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny pipelines live with the tests

from pipeline_fixtures import CALLS, FIXTURES  # noqa: E402

import qdiffuse  # noqa: E402
from qdiffuse.config import QuantConfig  # noqa: E402
from qdiffuse.pipelines.calibrate import collect_pipeline_calibration  # noqa: E402
from qdiffuse.progress import set_progress_enabled  # noqa: E402

SUBJECTS = ["cat", "dog", "tree", "house", "boat", "bird", "car", "flower", "horse", "lamp", "chair", "cup"]
COLOURS = ["red", "blue", "green", "yellow"]


def prompts(n: int, offset: int = 0) -> list[str]:
    return [f"a {COLOURS[(i + offset) % 4]} {SUBJECTS[(i + offset) % len(SUBJECTS)]}" for i in range(n)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def row(name: str, scheme: str, method: str, n_prompts: int, steps: int, root: Path) -> dict[str, object]:
    call = {**CALLS[name], "num_inference_steps": steps}
    pipe = FIXTURES[name](root)
    pipe.set_progress_bar_config(disable=True)
    eval_prompts = prompts(4, offset=5)

    def images(p: object) -> np.ndarray:
        return p(eval_prompts, generator=torch.Generator().manual_seed(11), output_type="np", **call).images

    fp = images(pipe)
    calib_prompts = prompts(n_prompts)
    config = QuantConfig.from_scheme(scheme, method=method, calib_steps=steps)
    start = time.perf_counter()
    collect_pipeline_calibration(pipe, calib_prompts, calib_steps=config.calib_steps, **call)
    collect_s = time.perf_counter() - start
    start = time.perf_counter()
    qdiffuse.quantize(pipe, config, prompts=calib_prompts, **call)
    quantize_s = time.perf_counter() - start
    q = images(pipe)
    folder = qdiffuse.save(pipe, root / "q")
    loaded = qdiffuse.load_pipeline(folder)
    loaded.set_progress_bar_config(disable=True)
    same = bool(np.array_equal(images(loaded), q))
    return {
        "pipeline": type(pipe).__name__,
        "denoiser": type(getattr(pipe, "unet", None) or pipe.transformer).__name__,
        "calib_s_per_image": collect_s / n_prompts,
        "quantize_s": quantize_s,
        "psnr_db": psnr(q, fp),
        "reloaded_equal": same,
        "scheduler": type(loaded.scheduler).__name__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", default="w8a8")
    parser.add_argument("--method", default="mse")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--families", nargs="*", default=list(FIXTURES))
    args = parser.parse_args()
    set_progress_enabled(False)
    torch.set_num_threads(1)
    print(f"| pipeline | denoiser | {args.scheme} {args.method}: calibration s / image | quantize s | "
          "PSNR to FP (dB) | loaded = saved | scheduler |")
    print("|---|---|---|---|---|---|---|")
    for name in args.families:
        with tempfile.TemporaryDirectory() as tmp:
            r = row(name, args.scheme, args.method, args.prompts, args.steps, Path(tmp))
        print(f"| {r['pipeline']} | {r['denoiser']} | {r['calib_s_per_image']:.3f} | {r['quantize_s']:.1f} | "
              f"{r['psnr_db']:.1f} | {'yes' if r['reloaded_equal'] else 'NO'} | {r['scheduler']} |", flush=True)


if __name__ == "__main__":
    main()
