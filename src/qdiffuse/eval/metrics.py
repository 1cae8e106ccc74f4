"""Distribution metrics on feature arrays: FID/sFID, KID, Inception Score, improved precision/recall.

All functions are pure: they take features (numpy arrays or torch tensors, one row per image) and return
Python floats. Statistics that suffer from cancellation (means, covariances, matrix square roots, KL
divergences) are computed in float64; the nearest-neighbour searches of precision/recall run in float32
batches because they are dominated by matrix products over 10k x 10k pairs.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy import linalg
from scipy.special import rel_entr

from qdiffuse.errors import ConfigError, DataError

ArrayLike = np.ndarray | torch.Tensor


def _as_float64(x: ArrayLike, what: str, ndim: int) -> np.ndarray:
    """Convert to a float64 numpy array of the given rank, rejecting NaN/inf values."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise DataError(f"{what} has shape {arr.shape}, expected a {ndim}-D array")
    if not np.isfinite(arr).all():
        raise DataError(f"{what} contains NaN or inf values; check the samples and the feature network")
    return arr


def _as_features(x: ArrayLike, what: str, min_rows: int = 2) -> np.ndarray:
    arr = _as_float64(x, what, 2)
    if arr.shape[0] < min_rows:
        raise DataError(f"{what} has {arr.shape[0]} rows; at least {min_rows} samples are needed")
    return arr


def feature_stats(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[d]`` and unbiased covariance ``[d, d]`` of ``[N, d]`` features, in float64 (N >= 2)."""
    f = _as_features(feats, "features")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


FRECHET_METHODS = ("sqrtm", "eigh")


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    """``tr((s1 s2)^(1/2))`` the way the reference TensorFlow and pytorch-fid code computes it."""
    with warnings.catch_warnings():
        # a singular product is expected (dead feature channels, N < d) and handled just below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            worst = float(np.max(np.abs(covmean.imag)))
            raise DataError(
                f"the covariance square root has an imaginary component {worst:.3g}; the statistics are "
                "degenerate, use more samples"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """``tr((s1 s2)^(1/2))`` from symmetric eigendecompositions.

    ``s1 s2`` has the eigenvalues of the symmetric PSD matrix ``s1^(1/2) s2 s1^(1/2)``, so the trace is the sum
    of their square roots: no complex arithmetic, no eps offset for singular covariances. It runs in torch,
    which honours ``torch.set_num_threads``; on a busy machine scipy's multi-threaded BLAS can make the
    ``sqrtm`` path a hundred times slower for 448-d or 2048-d covariances.
    """
    a = torch.from_numpy((s1 + s1.T) / 2.0)
    b = torch.from_numpy((s2 + s2.T) / 2.0)
    w, v = torch.linalg.eigh(a)
    root = (v * w.clamp_min(0.0).sqrt()) @ v.T
    m = root @ b @ root
    return float(torch.linalg.eigvalsh((m + m.T) / 2.0).clamp_min(0.0).sqrt().sum())


def frechet_distance(
    mu1: ArrayLike,
    sigma1: ArrayLike,
    mu2: ArrayLike,
    sigma2: ArrayLike,
    eps: float = 1e-6,
    method: str = "sqrtm",
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), the quantity behind FID and sFID.

    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``.

    ``method="sqrtm"`` is the reference computation (TensorFlow FID, pytorch-fid): ``scipy.linalg.sqrtm`` of
    the product; when the product is singular (fewer samples than dimensions, dead feature channels) the root
    is not finite, so both covariances get ``eps`` added to their diagonals; a root with a large imaginary
    part means the covariances are numerically broken and raises DataError. ``method="eigh"`` computes the
    same trace from symmetric eigendecompositions (exact for covariance matrices, agreeing to ~1e-8
    relative), which is faster and immune to BLAS thread contention.
    """
    if method not in FRECHET_METHODS:
        raise ConfigError(f"unknown Fréchet distance method {method!r}; use one of {', '.join(FRECHET_METHODS)}")
    m1, m2 = _as_float64(mu1, "mu1", 1), _as_float64(mu2, "mu2", 1)
    s1, s2 = _as_float64(sigma1, "sigma1", 2), _as_float64(sigma2, "sigma2", 2)
    d = m1.shape[0]
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise DataError(
            f"Fréchet distance needs statistics of one feature space, got mu {m1.shape}/{m2.shape} and sigma "
            f"{s1.shape}/{s2.shape}; compute both with the same feature extractor"
        )
    diff = m1 - m2
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(s1, s2, eps)
    else:
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    # the distance is non-negative; rounding can leave identical statistics a hair below zero
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean))


def _kernel_sum(x: torch.Tensor, y: torch.Tensor, degree: int, gamma: float, coef0: float) -> tuple[float, float]:
    """Sum and trace of the polynomial kernel matrix ``(gamma x.y + coef0)^degree``, in float64."""
    base = torch.addmm(torch.full((x.shape[0], y.shape[0]), coef0, dtype=x.dtype), x, y.T, alpha=gamma)
    k = base.clone()
    for _ in range(degree - 1):
        k.mul_(base)
    return float(k.sum()), float(k.diagonal().sum())


def kernel_inception_distance(
    f1: ArrayLike,
    f2: ArrayLike,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: unbiased MMD² with the cubic polynomial kernel ``(x.y / d + 1)^3``, as mean and std over subsets.

    Unlike FID it is unbiased, so values from different sample counts compare; ``subset_size`` is capped at
    the smaller set. Subsets are drawn without replacement from a fixed ``seed`` so results are reproducible.
    """
    x, y = _as_features(f1, "f1"), _as_features(f2, "f2")
    if x.shape[1] != y.shape[1]:
        raise DataError(
            f"KID needs features of one space, got dimensions {x.shape[1]} and {y.shape[1]}; "
            "use one extractor for both sets"
        )
    if subsets < 1 or subset_size < 2:
        raise DataError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    if degree < 1:
        raise DataError(f"KID needs a polynomial kernel degree >= 1, got {degree}")
    m = min(subset_size, x.shape[0], y.shape[0])
    g = 1.0 / x.shape[1] if gamma is None else gamma
    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    values = np.empty(subsets)
    for i in range(subsets):
        xs = xt[torch.from_numpy(rng.choice(x.shape[0], m, replace=False))]
        ys = yt[torch.from_numpy(rng.choice(y.shape[0], m, replace=False))]
        sxx, txx = _kernel_sum(xs, xs, degree, g, coef0)
        syy, tyy = _kernel_sum(ys, ys, degree, g, coef0)
        sxy, _ = _kernel_sum(xs, ys, degree, g, coef0)
        values[i] = (sxx - txx) / (m * (m - 1)) + (syy - tyy) / (m * (m - 1)) - 2.0 * sxy / (m * m)
    return float(values.mean()), float(values.std())


def inception_score(logits_or_probs: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``, as mean and std over ``splits`` equal chunks.

    Rows that are non-negative and sum to 1 are taken as probabilities; anything else as logits (softmaxed
    here). The score ranges from 1 to the number of classes: it rewards confident, evenly spread predictions.
    """
    arr = _as_features(logits_or_probs, "logits_or_probs", min_rows=1)
    if splits < 1 or arr.shape[0] < splits:
        raise DataError(f"Inception Score with {splits} splits needs at least {splits} samples, got {arr.shape[0]}")
    if (arr >= 0).all() and np.allclose(arr.sum(axis=1), 1.0, atol=1e-3):
        probs = arr / arr.sum(axis=1, keepdims=True)
    else:
        shifted = arr - arr.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        probs = e / e.sum(axis=1, keepdims=True)
    scores = []
    for part in np.array_split(probs, splits):
        py = part.mean(axis=0, keepdims=True)
        kl = rel_entr(part, py).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between rows of ``a`` and ``b`` (``b_sq``: squared norms of ``b``)."""
    d = a @ b.T
    d.mul_(-2.0).add_((a * a).sum(dim=1, keepdim=True)).add_(b_sq[None, :])
    return d.clamp_min_(0.0)


def _knn_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance from each row to its k-th nearest other row (the row itself is the 0-th)."""
    x_sq = (x * x).sum(dim=1)
    radii = torch.empty(x.shape[0], dtype=x.dtype)
    for start in range(0, x.shape[0], batch_size):
        d = _sq_dists(x[start : start + batch_size], x, x_sq)
        # topk of a few smallest is an order of magnitude faster than kthvalue on CPU
        radii[start : start + batch_size] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def _fraction_covered(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of ``query`` rows inside any ball (centre ``ref[i]``, squared radius ``radii[i]``)."""
    ref_sq = (ref * ref).sum(dim=1)
    inside = 0
    for start in range(0, query.shape[0], batch_size):
        d = _sq_dists(query[start : start + batch_size], ref, ref_sq)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / query.shape[0]


@torch.no_grad()
def precision_recall(
    real_feats: ArrayLike, fake_feats: ArrayLike, k: int = 3, batch_size: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-nearest-neighbour manifolds.

    Each set's manifold is the union of balls around its points with radius the distance to the k-th nearest
    neighbour. Precision is the fraction of fake samples inside the real manifold (fidelity); recall the
    fraction of real samples inside the fake manifold (coverage). Distances are computed ``batch_size`` rows
    at a time, so 10k x 10k sets need about 40 MB rather than 400 MB.
    """
    real = torch.from_numpy(_as_features(real_feats, "real_feats", min_rows=k + 1)).float()
    fake = torch.from_numpy(_as_features(fake_feats, "fake_feats", min_rows=k + 1)).float()
    if real.shape[1] != fake.shape[1]:
        raise DataError(
            f"precision/recall need features of one space, got dimensions {real.shape[1]} and {fake.shape[1]}"
        )
    if k < 1:
        raise DataError(f"precision/recall need k >= 1 nearest neighbours, got k={k}")
    batch_size = max(1, int(batch_size))
    real_radii = _knn_radii(real, k, batch_size)
    fake_radii = _knn_radii(fake, k, batch_size)
    precision = _fraction_covered(fake, real, real_radii, batch_size)
    recall = _fraction_covered(real, fake, fake_radii, batch_size)
    return precision, recall
