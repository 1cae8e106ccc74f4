"""bf16 beside float32 on the built-ins: quality of the quantized models against the FP32 model, and forward
speed on the real runtime with bf16 activations, all measured side by side in one process.

For each built-in and scheme the FP model is loaded in float32 and in bf16 and quantized in each; every model
samples the same noise (DDIM), and its images are compared with the FP32 model's (PSNR, dB). Speed: the
forward pass at one batch size, every model timed in interleaved rounds with FP32 timed first and last, the
median per model reported as a ratio to FP32's.

    OMP_NUM_THREADS=1 python benchmarks/half_precision.py --out runs/half-precision.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from qdiffuse.api import quantize
from qdiffuse.config import QuantConfig
from qdiffuse.models.loading import LoadedModel, load_model_folder
from qdiffuse.progress import set_progress_enabled
from qdiffuse.sampling.loop import SampleRequest, sample


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float((images.clamp(-1, 1) - reference.clamp(-1, 1)).pow(2).mean())
    return 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-20))).item()


def images_of(loaded: LoadedModel, num: int, steps: int) -> torch.Tensor:
    labels = tuple(range(10)) if loaded.denoiser.num_classes else None
    request = SampleRequest(num=num, steps=steps, seed=11, labels=labels, batch_size=32)
    return sample(loaded.denoiser, loaded.scheduler_config, request)[0]


def time_forwards(models: dict[str, LoadedModel], batch: int, rounds: int) -> dict[str, float]:
    """Median seconds per forward, models interleaved round by round; FP32 runs first and last in each round."""
    shape = next(iter(models.values())).denoiser.sample_shape
    x = torch.randn(batch, *shape)
    t = torch.full((batch,), 500)
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    order = [names[0], *names[1:], names[0]]
    with torch.no_grad():
        for loaded in models.values():  # warm-up
            d = loaded.denoiser
            d.forward_raw(x, t, torch.zeros(batch, dtype=torch.long) if d.num_classes else None)
        for _ in range(rounds):
            for name in order:
                d = models[name].denoiser
                labels = torch.zeros(batch, dtype=torch.long) if d.num_classes else None
                start = time.perf_counter()
                d.forward_raw(x, t, labels)
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["fmnist-tiny", "fmnist-dit"])
    parser.add_argument("--schemes", nargs="+", default=["w8a8", "w4a8"])
    parser.add_argument("--num", type=int, default=64, help="images per model")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--calib-per-step", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="batch of the timed forward")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    set_progress_enabled(False)
    results: dict[str, dict] = {}
    for model in args.models:
        fp = {name: load_model_folder(model, dtype=name) for name in ("fp32", "bf16")}
        reference = images_of(fp["fp32"], args.num, args.steps)
        rows = {"fp-bf16": {"psnr_db": psnr(images_of(fp["bf16"], args.num, args.steps), reference)}}
        timed: dict[str, LoadedModel] = {"fp-fp32": fp["fp32"], "fp-bf16": fp["bf16"]}
        for scheme in args.schemes:
            for dtype in ("fp32", "bf16"):
                loaded = load_model_folder(model, dtype=dtype)
                config = QuantConfig.from_scheme(scheme, calib_per_step=args.calib_per_step)
                start = time.perf_counter()
                quantize(loaded.denoiser, loaded.scheduler_config, config)
                seconds = time.perf_counter() - start
                name = f"{scheme}-{dtype}"
                rows[name] = {"psnr_db": psnr(images_of(loaded, args.num, args.steps), reference),
                              "quantize_s": seconds}
                timed[name] = loaded
                print(model, name, rows[name], flush=True)
        speed = time_forwards(timed, args.batch, args.rounds)
        for name, seconds in speed.items():
            rows.setdefault(name, {})
            rows[name]["forward_ms"] = seconds * 1e3
            rows[name]["speedup_vs_fp32"] = speed["fp-fp32"] / seconds
        results[model] = rows
        print(json.dumps({model: rows}, indent=1), flush=True)
    meta = {"num": args.num, "steps": args.steps, "calib_per_step": args.calib_per_step, "batch": args.batch,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
