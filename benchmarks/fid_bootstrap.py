"""How much of an FID difference between two recipes of a bench grid is sampling noise: a paired bootstrap.

    python benchmarks/fid_bootstrap.py runs/cpu-mota-n1000 fmnist-tiny dpm++2m10-eta0 \
        --reference w4a8-qdiffusion-r200 [--draws 300]

Every cell of one model and sampler setting is drawn from the same initial noise, image i of every recipe from the
same seed. Resampling the image indices (the same indices for every recipe) and recomputing each recipe's FID
against the shipped reference statistics gives, per recipe, the spread of its FID over sample sets of this size,
and the spread of its *difference* to the reference recipe, which is much smaller than either FID's because the
pairs share their noise. The difference's central 90% interval says whether a gap between two recipes is resolved
at this N; it does not cover the other draw, the calibration's own randomness (repeat the recipe under another
calibration seed for that).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from qdiffuse.eval.classifier import load_classifier, load_reference_stats
from qdiffuse.eval.evaluate import load_samples
from qdiffuse.eval.features import extract_features
from qdiffuse.eval.metrics import feature_stats, frechet_distance


def _fid(feats: np.ndarray, ref: dict[str, np.ndarray]) -> float:
    mu, sigma = feature_stats(feats)
    return frechet_distance(mu, sigma, ref["mu"], ref["sigma"], method="eigh")


def paired(
    run: Path, model: str, setting: str, reference: str, draws: int, seed: int = 0
) -> tuple[int, dict[str, float], dict[str, np.ndarray]]:
    """The cells' image count, each recipe's FID and its bootstrap draws (the same image indices for every recipe)."""
    samples = sorted((run / "samples").glob(f"{Path(model).name}__{setting}__*.npz"))
    if not samples:
        raise SystemExit(f"no samples for {model} {setting} in {run / 'samples'}")
    net = load_classifier()
    ref = load_reference_stats()
    feats = {p.stem.split("__")[-1]: extract_features(net, load_samples(p)[0]).pool.astype(np.float64) for p in samples}
    n = {f.shape[0] for f in feats.values()}
    if len(n) != 1:
        raise SystemExit(f"the cells hold different numbers of images ({sorted(n)}); pass one grid's run folder")
    size = n.pop()
    gen = np.random.default_rng(seed)
    draws_idx = [gen.integers(0, size, size) for _ in range(draws)]
    boot = {key: np.array([_fid(f[idx], ref) for idx in draws_idx]) for key, f in feats.items()}
    full = {key: _fid(f, ref) for key, f in feats.items()}
    return size, full, boot


def interval(boot: dict[str, np.ndarray], key: str, reference: str) -> tuple[float, float]:
    """The central 90% interval of FID(key) − FID(reference) over the paired draws."""
    lo, hi = np.quantile(boot[key] - boot[reference], [0.05, 0.95])
    return float(lo), float(hi)


def bootstrap(run: Path, model: str, setting: str, reference: str, draws: int, seed: int) -> list[str]:
    size, full, boot = paired(run, model, setting, reference, draws, seed)
    rows = [
        f"{model}, {setting}, N = {size}, {draws} paired draws; Δ = recipe − {reference}",
        "",
        "| recipe | FID | FID std (bootstrap) | Δ FID | Δ 90% interval |",
        "|---|---|---|---|---|",
    ]
    for key in sorted(full, key=lambda k: (k != "fp", k)):
        if reference in boot and key != reference:
            lo, hi = interval(boot, key, reference)
            diff = f"{full[key] - full[reference]:+.2f} | [{lo:+.2f}, {hi:+.2f}]"
        else:
            diff = "– | –"
        rows.append(f"| {key} | {full[key]:.2f} | {boot[key].std():.2f} | {diff} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("model")
    parser.add_argument("setting", help="the sampler setting's key in the cell names, e.g. dpm++2m10-eta0")
    parser.add_argument("--reference", default="w4a8-qdiffusion-r200")
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("\n".join(bootstrap(args.run, args.model, args.setting, args.reference, args.draws, args.seed)))


if __name__ == "__main__":
    main()
