"""Per-image fidelity of quantized samples to full-precision samples drawn from the same seeds.

Distribution metrics (FID and friends) can stay flat while a quantized model produces different images from
the same noise; paired metrics catch that drift directly. All functions take two uint8 NHWC arrays of the same
shape (image ``i`` of one set pairs with image ``i`` of the other) and work on the [0, 255] pixel scale.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from qdiffuse.errors import DataError
from qdiffuse.eval.features import check_images

DATA_RANGE = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = check_images(a, "reference images")
    b = check_images(b, "compared images")
    if a.shape != b.shape:
        raise DataError(
            f"paired images must have one shape, got {a.shape} and {b.shape}; sample both sets with the same "
            "seeds, count and resolution"
        )
    return a, b


def mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image mean squared error on the [0, 255] scale, shape ``[N]``."""
    a, b = _pair(a, b)
    diff = a.astype(np.float64) - b.astype(np.float64)
    return (diff * diff).reshape(diff.shape[0], -1).mean(axis=1)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB with peak 255, shape ``[N]``; identical images give ``inf``."""
    err = mse(a, b)
    with np.errstate(divide="ignore"):
        return np.where(err > 0, 10.0 * np.log10(DATA_RANGE**2 / np.maximum(err, 1e-300)), np.inf)


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: np.ndarray, b: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Per-image SSIM (Wang et al., 2004), shape ``[N]``, on the [0, 255] scale.

    Gaussian window 11 x 11 with sigma 1.5, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, 'valid' filtering (no
    padding), local statistics averaged over the map and then over channels, as in the reference MATLAB code.
    """
    a, b = _pair(a, b)
    n, h, w, c = a.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise DataError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}")
    window = _gaussian_window().expand(c, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()
    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    out = np.empty(n)
    for start in range(0, n, batch_size):
        x = torch.from_numpy(a[start : start + batch_size]).permute(0, 3, 1, 2).double()
        y = torch.from_numpy(b[start : start + batch_size]).permute(0, 3, 1, 2).double()

        def blur(t: torch.Tensor) -> torch.Tensor:
            return F.conv2d(t, window, groups=c)

        mu_x, mu_y = blur(x), blur(y)
        var_x = blur(x * x) - mu_x**2
        var_y = blur(y * y) - mu_y**2
        cov = blur(x * y) - mu_x * mu_y
        num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
        den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
        out[start : start + batch_size] = (num / den).mean(dim=(1, 2, 3)).numpy()
    return out


def summarize(values: np.ndarray) -> dict[str, float]:
    """``mean``, ``std`` and ``min`` of per-image values.

    Infinite values (PSNR of identical pairs) are counted under ``identical`` and left out of mean and std,
    which would otherwise be infinite as soon as one pair matches exactly.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise DataError("no per-image values to summarize; pass at least one image pair")
    finite = values[np.isfinite(values)]
    summary = {
        "mean": float(finite.mean()) if finite.size else float("inf"),
        "std": float(finite.std()) if finite.size else 0.0,
        "min": float(values.min()),
    }
    if finite.size != values.size:
        summary["identical"] = float(values.size - finite.size)
    return summary


def fidelity(fp_samples: np.ndarray, q_samples: np.ndarray) -> dict[str, dict[str, float]]:
    """Summaries of per-image MSE, PSNR (dB) and SSIM of ``q_samples`` against ``fp_samples``."""
    return {
        "mse": summarize(mse(fp_samples, q_samples)),
        "psnr": summarize(psnr(fp_samples, q_samples)),
        "ssim": summarize(ssim(fp_samples, q_samples)),
    }
