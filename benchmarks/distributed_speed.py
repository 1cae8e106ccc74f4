"""Wall time of one sampling command in 1 process against torchrun with N ranks (BENCHMARKS.md, "torchrun").

    OMP_NUM_THREADS=1 python benchmarks/distributed_speed.py fmnist-tiny --ranks 2 --num 400 --batch-size 50

Runs the one-process command, then the torchrun one, then the one-process one again (the machine is shared: the
ratio uses the mean of the two one-process runs), each rank and the single process with one thread, and checks
that every run wrote the same npz bit for bit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--num", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="dpm++2m")
    parser.add_argument("--guidance", type=float, default=2.0)
    args = parser.parse_args()
    common = ["sample", args.model, "--num", str(args.num), "--batch-size", str(args.batch_size), "--steps",
              str(args.steps), "--sampler", args.sampler, "--guidance", str(args.guidance), "-q", "--overwrite"]
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"{n}.npz" for n in ("one_a", "dist", "one_b")]
        single = [str(BIN / "qdiffuse"), *common]
        dist = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={args.ranks}", "--no-python", "--",
                str(BIN / "qdiffuse"), *common]
        t1 = timed([*single, "--out", str(outs[0])])
        tn = timed([*dist, "--out", str(outs[1])])
        t1b = timed([*single, "--out", str(outs[2])])
        arrays = [np.load(o)["arr_0"] for o in outs]
        same = all(np.array_equal(arrays[0], a) for a in arrays[1:])
    one = (t1 + t1b) / 2
    print(f"| {args.model} | {args.sampler} {args.steps} | {args.num} | 1 process: {t1:.1f} s, {t1b:.1f} s | "
          f"{args.ranks} ranks: {tn:.1f} s | speed-up {one / tn:.2f}x | identical npz: {same} |")


if __name__ == "__main__":
    main()
