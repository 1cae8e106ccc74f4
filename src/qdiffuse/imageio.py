"""Writing samples: the ADM-style .npz (uint8 N×H×W×C in ``arr_0``, ``labels``) and PNG grids."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from torch import Tensor

from qdiffuse.fsutil import PNG, SAMPLES, atomic_file


def save_samples(
    path: Path,
    images: np.ndarray,
    labels: Tensor | np.ndarray | None,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
) -> None:
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    with atomic_file(path, overwrite, SAMPLES, inputs) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile N×H×W×C uint8 images into one H'×W'×C image with ``pad`` black pixels between."""
    n, h, w, c = images.shape
    ncol = ncol or min(n, max(1, math.ceil(math.sqrt(n))))
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_grid(
    path: Path, images: np.ndarray, overwrite: bool = False, ncol: int | None = None, inputs: Iterable[str | Path] = ()
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = make_grid(images, ncol)
    with atomic_file(path, overwrite, PNG, inputs) as tmp:
        if grid.shape[-1] == 1:
            plt.imsave(tmp, grid[..., 0], cmap="gray", vmin=0, vmax=255, format="png")
        else:
            plt.imsave(tmp, grid, format="png")


__all__ = ["save_samples", "save_grid", "make_grid"]
