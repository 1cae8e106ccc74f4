"""FID of real Fashion-MNIST training images against the shipped test statistics, at a benchmark's N.

A generated set can score no better than real data drawn at the same N, and the spread over disjoint draws says
how far apart two rows must be before the difference means anything. Needs the dataset (training only).

    python benchmarks/real_data_floor.py --num 200 --draws 5
"""

from __future__ import annotations

import argparse

import numpy as np

from qdiffuse.eval.classifier import pad_to_32, read_fmnist_split
from qdiffuse.eval.evaluate import evaluate_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--data", default=None, help="Folder with the Fashion-MNIST IDX .gz files.")
    args = parser.parse_args()
    images, labels = read_fmnist_split(args.data, "train")
    order = np.random.default_rng(0).permutation(len(images))
    fids, kids = [], []
    for d in range(args.draws):
        idx = order[d * args.num : (d + 1) * args.num]
        metrics = evaluate_samples(pad_to_32(images[idx]), "fmnist", labels=labels[idx])
        fids.append(metrics["fid"])
        kids.append(metrics["kid_mean"])
        print(f"draw {d}: FID {metrics['fid']:.2f}  KID {metrics['kid_mean']:.3f}")
    print(f"N={args.num}, {args.draws} disjoint draws: FID {np.mean(fids):.2f} ± {np.std(fids, ddof=1):.2f}, "
          f"KID {np.mean(kids):.3f} ± {np.std(kids, ddof=1):.3f}")


if __name__ == "__main__":
    main()
