"""The shared contract between feature networks and the metrics.

Every metric in :mod:`qdiffuse.eval.metrics` works on three views of an image batch, so any network that can
produce them can serve as the evaluation feature space:

* ``pool``: a global feature vector per image (Inception's 2048-d pool3; the classifier's penultimate layer),
  used by FID, KID and precision/recall;
* ``logits``: class scores, used by the Inception Score;
* ``spatial``: a few channels of a mid-level convolution map, flattened, used by sFID, which is sensitive to
  spatial structure that global pooling averages away.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from qdiffuse.errors import DataError


@dataclass(frozen=True)
class Features:
    """Per-image features of one sample set, all float32 numpy arrays with N rows."""

    pool: np.ndarray
    logits: np.ndarray
    spatial: np.ndarray

    def __len__(self) -> int:
        return int(self.pool.shape[0])


class FeatureNetwork(Protocol):
    """A network that turns uint8 NHWC image batches into the three feature views."""

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Map a uint8 ``[B, H, W, C]`` tensor to the network's float input layout and range."""
        ...

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(pool [B, d], logits [B, K], spatial [B, s])`` for a preprocessed batch."""
        ...


def check_images(images: np.ndarray, what: str = "samples") -> np.ndarray:
    """Validate an image array and return it as uint8 ``[N, H, W, C]``.

    A 3-D ``[N, H, W]`` array is taken as grayscale, so that arrays saved without the channel axis still work.
    """
    if not isinstance(images, np.ndarray):
        raise DataError(f"{what} must be a numpy array of uint8 images, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise DataError(
            f"{what} have dtype {images.dtype}, expected uint8 in [0, 255]; convert with "
            "np.clip(x, 0, 255).astype(np.uint8)"
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"{what} have shape {tuple(images.shape)}, expected N x H x W x C with C = 1 or 3 "
            "(NHWC, the ADM sample layout)"
        )
    if images.shape[0] == 0:
        raise DataError(f"{what} hold no images; pass at least 2 images")
    return images


_SHARED: ContextVar[Any] = ContextVar("qdiffuse_feature_world", default=None)


@contextmanager
def shared_extraction(world: Any) -> Iterator[None]:
    """Inside this block, :func:`extract_features` splits its images over the ranks of ``world``
    (:class:`qdiffuse.distributed.world.World`): each rank runs the network on one contiguous share and the
    features (not the images) are all-gathered, in order, so every metric sees the one-process feature array."""
    token = _SHARED.set(world)
    try:
        yield
    finally:
        _SHARED.reset(token)


def extract_features(
    net: FeatureNetwork | torch.nn.Module,
    images: np.ndarray,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> Features:
    """Run ``net`` over ``images`` (uint8 NHWC) in batches and gather its three feature views.

    Batching bounds peak memory: Inception at 299 x 299 needs about 100 MB of activations per image.
    """
    images = check_images(images)
    if batch_size < 1:
        raise DataError(f"batch size {batch_size} is not positive; pass a batch size of at least 1")
    world = _SHARED.get()
    if world is not None and world.joined and world.size > 1:

        from qdiffuse.distributed.sampling import shared_step

        bounds = np.linspace(0, images.shape[0], world.size + 1).round().astype(int)
        lo, hi = int(bounds[world.rank]), int(bounds[world.rank + 1])
        every = shared_step(world, lambda: _extract(net, images[lo:hi], batch_size, device) if hi > lo else None)
        parts = [p for p in every if p is not None]
        return Features(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("pool", "logits", "spatial")))
    return _extract(net, images, batch_size, device)


@torch.no_grad()
def _extract(
    net: FeatureNetwork | torch.nn.Module, images: np.ndarray, batch_size: int, device: str | torch.device
) -> Features:
    pools: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    spatials: list[np.ndarray] = []
    for start in range(0, images.shape[0], batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
        x = net.preprocess(batch)
        pool, logit, spatial = net.features(x)
        pools.append(pool.float().cpu().numpy())
        logits.append(logit.float().cpu().numpy())
        spatials.append(spatial.float().cpu().numpy())
    return Features(np.concatenate(pools), np.concatenate(logits), np.concatenate(spatials))
