"""Aligned error of any quantized folders on one target solver's FP trajectories (BENCHMARKS.md, MOTA).

    python benchmarks/aligned_error.py fmnist-tiny runs/cpu-mota-w4a8/models/fmnist-tiny__w4a8-* \\
        --sampler dpm++2m --steps 10 --guidance 2

How far each model's first-order ε at the step points of ``--per-step`` FP trajectories of the solver is from the
FP solver's own higher-order direction (mean squared error and mean 1 − cos), for folders made by any method:
``mota`` records it in its manifest, this measures it for the others on the same trajectories (the same seed as
calibration's unless ``--seed`` says otherwise).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qdiffuse.calibration.trajectory import aligned_error, collect_trajectory
from qdiffuse.pipeline import load_any
from qdiffuse.progress import set_progress_enabled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the FP model (built-in name or folder)")
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--sampler", default="dpm++2m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--per-step", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    set_progress_enabled(False)
    fp = load_any(args.model, "cpu")
    traj = collect_trajectory(
        fp.denoiser, fp.scheduler_config, args.sampler, args.steps, n_per_step=args.per_step,
        guidance=args.guidance, seed=args.seed,
    )
    print("| model | aligned MSE | 1 − cos |")
    print("|---|---|---|")
    err = aligned_error(fp.denoiser, traj)
    print(f"| FP | {err['mse']:.5f} | {err['cosine_distance']:.5f} |")
    for folder in args.folders:
        if not folder.is_dir():
            continue
        err = aligned_error(load_any(str(folder), "cpu").denoiser, traj)
        print(f"| {folder.name} | {err['mse']:.5f} | {err['cosine_distance']:.5f} |")


if __name__ == "__main__":
    main()
