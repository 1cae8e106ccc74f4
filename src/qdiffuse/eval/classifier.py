"""A small Fashion-MNIST classifier that stands in for Inception-v3 as the evaluation feature space.

Inception-v3 was trained on natural RGB photographs; on 32 x 32 grayscale clothing its features mostly encode
upsampling artefacts, and its weights cannot be downloaded here anyway. A classifier trained on the dataset
itself gives a feature space in which distances reflect the garments' shapes, so FID, precision/recall and KID
respond to what a quantized diffusion model actually gets wrong.

The network mirrors the three views Inception provides (see :mod:`qdiffuse.eval.features`):

* ``pool``: the globally averaged last convolution map (128-d), the analogue of Inception's pool3;
* ``logits``: 10 class scores, for an Inception-Score-style diversity/confidence score (at most 10);
* ``spatial``: the first 7 channels of the 8 x 8 mid-level map, flattened (448-d), the analogue of ADM's
  ``mixed_6/conv`` first-7-channel features used by sFID.

Inputs are 32 x 32 in [-1, 1]; the 28 x 28 dataset images are zero-padded (black) by 2 pixels on each side,
the same convention the diffusion models are trained with.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qdiffuse.errors import ConfigError, DataError, ModelLoadError
from qdiffuse.fsutil import CLASSIFIER_FOLDER, atomic_dir, check_output_path
from qdiffuse.models.fmnist import (
    DEFAULT_DATA_DIR,
    FMNIST_CLASSES,
    FMNIST_FILES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    load_fmnist,
    read_idx,
    resolve_data_dir,
)

logger = logging.getLogger(__name__)

ARCHITECTURE = "qdiffuse-fmnist-cnn"
WEIGHTS_NAME = "classifier.safetensors"
CONFIG_NAME = "config.json"
STATS_NAME = "reference_stats.safetensors"


class _ConvBlock(nn.Sequential):
    """3x3 convolution, batch norm, ReLU: batch norm keeps a few CPU epochs enough to converge."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class FMNISTClassifier(nn.Module):
    """Four conv blocks at 32, 16, 8 and 4 pixels, global average pooling, a linear head.

    ``channels`` sets the widths of the four blocks; the last one is the FID feature dimension.
    ``spatial_channels`` is how many channels of the 8 x 8 block-3 map form the sFID features.
    """

    def __init__(
        self,
        channels: tuple[int, int, int, int] = (32, 64, 128, 128),
        num_classes: int = 10,
        spatial_channels: int = 7,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if len(channels) != 4 or min(channels) < 1:
            raise ConfigError(f"classifier channels {channels} are invalid; pass four positive widths")
        if not 1 <= spatial_channels <= channels[2]:
            raise ConfigError(
                f"spatial_channels={spatial_channels} is out of range; use 1 to {channels[2]} (block-3 width)"
            )
        self.channels = tuple(int(c) for c in channels)
        self.num_classes = int(num_classes)
        self.spatial_channels = int(spatial_channels)
        self.block1 = _ConvBlock(1, channels[0])
        self.block2 = _ConvBlock(channels[0], channels[1])
        self.block3 = _ConvBlock(channels[1], channels[2])
        self.block4 = _ConvBlock(channels[2], channels[3])
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels[3], num_classes)

    @property
    def feature_dim(self) -> int:
        return self.channels[3]

    def config(self) -> dict:
        """The constructor arguments, for ``config.json``."""
        return {
            "architecture": ARCHITECTURE,
            "channels": list(self.channels),
            "num_classes": self.num_classes,
            "spatial_channels": self.spatial_channels,
            "dropout": float(self.dropout.p),
            "image_size": 32,
            "in_channels": 1,
            "input_range": [-1.0, 1.0],
        }

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(pool [B, 128], logits [B, 10], spatial [B, 7 * 8 * 8])`` for inputs in [-1, 1]."""
        h = F.max_pool2d(self.block1(x), 2)
        h = F.max_pool2d(self.block2(h), 2)
        mid = self.block3(h)
        h = self.block4(F.max_pool2d(mid, 2))
        pool = h.mean(dim=(2, 3))
        logits = self.fc(self.dropout(pool))
        spatial = mid[:, : self.spatial_channels].flatten(1)
        return pool, logits, spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[1]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W, 1]`` (32 x 32, or 28 x 28 then padded) to float ``[B, 1, 32, 32]`` in [-1, 1]."""
        if images.ndim == 3:
            images = images.unsqueeze(-1)
        if images.ndim != 4 or images.shape[-1] != 1 or tuple(images.shape[1:3]) not in ((32, 32), (28, 28)):
            raise DataError(
                f"the Fashion-MNIST classifier takes 32x32 (or 28x28) grayscale images, got shape "
                f"{tuple(images.shape)}; use extractor='inception' for other data"
            )
        x = images.permute(0, 3, 1, 2).float()
        if x.shape[-1] == 28:
            x = F.pad(x, (2, 2, 2, 2), value=0.0)
        device = next(self.parameters()).device
        return (x / 127.5 - 1.0).to(device)


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST files


def read_fmnist_split(data_dir: str | Path | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N, 28, 28], labels int64 [N])`` for ``split`` 'train' or 'test'.

    The raw uint8 images are what samples look like after decoding, so evaluation code can treat real
    and generated images alike; :func:`qdiffuse.models.fmnist.load_fmnist` gives the training tensors.
    """
    if split not in FMNIST_FILES:
        raise ConfigError(f"unknown Fashion-MNIST split {split!r}; use one of {sorted(FMNIST_FILES)}")
    root = resolve_data_dir(data_dir)
    image_name, label_name = FMNIST_FILES[split]
    images = read_idx(root / image_name, IDX_IMAGES_MAGIC)
    labels = read_idx(root / label_name, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise DataError(
            f"{root / image_name} and {root / label_name} do not match as Fashion-MNIST data; re-install them"
        )
    return images.copy(), labels.astype(np.int64)


def pad_to_32(images: np.ndarray) -> np.ndarray:
    """Zero-pad uint8 ``[N, 28, 28]`` images to ``[N, 32, 32, 1]`` (NHWC, ADM sample layout)."""
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]


# ----------------------------------------------------------------------------------------------------------
# Loading


def builtin_classifier_dir() -> Path:
    """The folder of the classifier shipped inside the package."""
    return Path(str(resources.files("qdiffuse").joinpath("models/builtin/fmnist-classifier")))


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> FMNISTClassifier:
    """Load a classifier folder (``config.json`` + ``classifier.safetensors``); ``None``: the shipped one."""
    folder = Path(path) if path is not None else builtin_classifier_dir()
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelLoadError(
            f"{folder} is not a classifier folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
            "train one with train_classifier or omit the path to use the shipped one"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON ({exc}); re-train or restore it") from exc
    if not isinstance(config, dict) or config.get("architecture") != ARCHITECTURE:
        raise ModelLoadError(
            f"{config_path} does not describe a {ARCHITECTURE} classifier; point to a folder written by "
            "train_classifier"
        )
    try:
        model = FMNISTClassifier(
            channels=tuple(config["channels"]),
            num_classes=int(config["num_classes"]),
            spatial_channels=int(config["spatial_channels"]),
            dropout=float(config.get("dropout", 0.0)),
        )
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise ModelLoadError(f"{config_path} has invalid settings ({exc}); re-train the classifier") from exc
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{weights_path} is not a valid safetensors file ({exc}); re-train it") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise ModelLoadError(
            f"{weights_path} does not match {config_path}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}; re-train the classifier"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.to(device).eval().requires_grad_(False)


def load_reference_stats(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """Load ``reference_stats.safetensors`` (a file or the folder holding it; ``None``: the shipped one).

    Keys: ``mu``/``sigma`` (pool features), ``spatial_mu``/``spatial_sigma`` (sFID), ``features`` (a fixed
    subset of pool features for precision/recall and KID), all returned as numpy arrays.
    """
    target = Path(path) if path is not None else builtin_classifier_dir()
    if target.is_dir():
        target = target / STATS_NAME
    if not target.is_file():
        raise DataError(f"reference statistics {target} do not exist; train the classifier or pass a file")
    try:
        tensors = load_file(str(target))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{target} is not a readable safetensors file ({exc}); regenerate it") from exc
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in tensors.items()}


# ----------------------------------------------------------------------------------------------------------
# Training


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and small shifts, so features do not key on exact pixel positions."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    out = torch.empty_like(x)
    chunks = torch.arange(x.shape[0]).chunk(4)
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    for idx in chunks:
        dy, dx = (int(v) for v in torch.randint(0, 5, (2,), generator=gen))
        out[idx] = padded[idx, :, dy : dy + 32, dx : dx + 32]
    return out


@torch.no_grad()
def _evaluate(
    model: FMNISTClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: str
) -> tuple[float, np.ndarray, np.ndarray]:
    """Test accuracy plus pool and spatial features of every image."""
    model.eval()
    correct = 0
    pools: list[np.ndarray] = []
    spatials: list[np.ndarray] = []
    for start in range(0, x.shape[0], batch_size):
        pool, logits, spatial = model.features(x[start : start + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == y[start : start + batch_size]).sum())
        pools.append(pool.cpu().numpy())
        spatials.append(spatial.cpu().numpy())
    return correct / x.shape[0], np.concatenate(pools), np.concatenate(spatials)


def _stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = feats.astype(np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def train_classifier(
    data_dir: str | Path | None = DEFAULT_DATA_DIR,
    out_dir: str | Path = "fmnist-classifier",
    epochs: int = 8,
    batch_size: int = 128,
    device: str = "cpu",
    seed: int = 0,
    *,
    lr: float = 3e-3,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Train the Fashion-MNIST classifier and write it with the test set's reference statistics.

    ``out_dir`` receives ``classifier.safetensors``, ``config.json`` (architecture, test accuracy, training
    settings) and ``reference_stats.safetensors`` (test-set pool mean/covariance, spatial mean/covariance and
    all 10k test pool features as fp16). Everything is written to a temporary folder next to ``out_dir`` and
    renamed into place at the end. Returns ``out_dir``.
    """
    say = progress or logger.info
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs={epochs} and batch_size={batch_size} must be positive; pass values >= 1")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_output_path(out_dir, overwrite, CLASSIFIER_FOLDER)  # fail before training, not after

    x_train, y_train = load_fmnist("train", data_dir)
    x_test, y_test = load_fmnist("test", data_dir)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = FMNISTClassifier().to(device)
    steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2)
    for epoch in range(epochs):
        model.train()
        start_time = time.monotonic()
        order = torch.randperm(x_train.shape[0], generator=gen)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            xb = _augment(x_train[idx], gen).to(device)
            loss = F.cross_entropy(model(xb), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * idx.numel()
        acc, _, _ = _evaluate(model, x_test, y_test, 1000, device)
        say(
            f"epoch {epoch + 1}/{epochs}: train loss {total_loss / x_train.shape[0]:.4f}, "
            f"test accuracy {acc:.4f} ({time.monotonic() - start_time:.0f} s)"
        )

    accuracy, pool, spatial = _evaluate(model, x_test, y_test, 1000, device)
    say(f"final test accuracy {accuracy:.4f}")
    mu, sigma = _stats(pool)
    smu, ssigma = _stats(spatial)
    stats = {
        "mu": torch.from_numpy(mu).float(),
        "sigma": torch.from_numpy(sigma).float(),
        "spatial_mu": torch.from_numpy(smu).float(),
        "spatial_sigma": torch.from_numpy(ssigma).float(),
        "features": torch.from_numpy(pool).half(),
    }
    config = model.config() | {
        "classes": list(FMNIST_CLASSES),
        "test_accuracy": round(accuracy, 4),
        "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed},
        "reference": {"split": "test", "num_images": int(x_test.shape[0]), "features_dtype": "float16"},
    }

    with atomic_dir(out_dir, overwrite=overwrite, kind=CLASSIFIER_FOLDER) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"architecture": ARCHITECTURE})
        save_file(
            stats,
            str(tmp / STATS_NAME),
            metadata={"source": "fashion-mnist test split", "num_images": str(int(x_test.shape[0]))},
        )
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
