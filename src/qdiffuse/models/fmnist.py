"""Fashion-MNIST loader for training the built-in models.

The data set is read from the IDX files that Debian's ``dataset-fashion-mnist`` package installs
(gzip-compressed, 28×28 uint8). Only training needs it: the shipped models and everything that samples from
them work without it. Images are padded to 32×32, a power of two, so UNets with any number of down-sampling
levels line up with their skip connections (28 breaks at the third: 7 → 4 → 8 ≠ 7), and scaled to [-1, 1],
the range the DDPM forward process assumes for x_0.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from qdiffuse.errors import ConfigError, DataError

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

FMNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

#: File names of the four IDX files per split: (images, labels).
FMNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

IMAGE_SIZE = 32
_SOURCE_SIZE = 28

_FIX = (
    "run `apt-get install dataset-fashion-mnist` or pass `--data DIR` with the four Fashion-MNIST "
    "IDX .gz files"
)


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """Return the directory to read from: the caller's, else the Debian package's location."""
    return DEFAULT_DATA_DIR if data_dir is None else Path(data_dir).expanduser()


def _open_idx(path: Path) -> bytes:
    """Read an IDX file; a plain (already gunzipped) file next to the missing .gz is accepted too."""
    candidates = [path]
    if path.suffix == ".gz":
        candidates.append(path.with_suffix(""))
    for candidate in candidates:
        if candidate.is_file():
            try:
                if candidate.suffix == ".gz":
                    with gzip.open(candidate, "rb") as fh:
                        return fh.read()
                return candidate.read_bytes()
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise DataError(f"cannot read Fashion-MNIST file {candidate} ({exc}); {_FIX}") from exc
    raise DataError(f"Fashion-MNIST file {path} not found; {_FIX}")


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Parse one IDX file into a uint8 array, checking the magic number and the payload size.

    A truncated download otherwise surfaces much later as a reshape error or, worse, as silently wrong images.
    """
    path = Path(path)
    raw = _open_idx(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"Fashion-MNIST file {path} is truncated (no IDX header); {_FIX}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(
            f"Fashion-MNIST file {path} has IDX magic number 0x{found:08x}, expected 0x{magic:08x}; {_FIX}"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(
            f"Fashion-MNIST file {path} holds {len(raw) - header} data bytes, its header {dims} says "
            f"{expected}; {_FIX}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn uint8 images [N, 28, 28] into float32 [N, 1, 32, 32] in [-1, 1], padded with -1.

    Padding with -1 (black, the Fashion-MNIST background) keeps the border indistinguishable from the data's
    own margin.
    """
    x = torch.tensor(np.asarray(images), dtype=torch.float32)
    if x.ndim != 3:
        raise DataError(
            f"expected uint8 images of shape [N, H, W], got {tuple(x.shape)}; pass Fashion-MNIST images"
        )
    x = x.div(127.5).sub(1.0).unsqueeze(1)
    pad_h, pad_w = IMAGE_SIZE - x.shape[-2], IMAGE_SIZE - x.shape[-1]
    if pad_h < 0 or pad_w < 0:
        size = tuple(x.shape[-2:])
        raise DataError(f"images of size {size} exceed {IMAGE_SIZE}×{IMAGE_SIZE}; use 28×28 images")
    pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    return torch.nn.functional.pad(x, pads, value=-1.0)


def load_fmnist(
    split: str = "train", data_dir: str | Path | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of Fashion-MNIST.

    Returns ``(images, labels)``: float32 [N, 1, 32, 32] in [-1, 1] and int64 [N] in 0…9 (names in
    :data:`FMNIST_CLASSES`). ``limit`` keeps the first ``limit`` examples, for quick runs.
    """
    if split not in FMNIST_FILES:
        raise ConfigError(f"unknown Fashion-MNIST split {split!r}; use one of {sorted(FMNIST_FILES)}")
    root = resolve_data_dir(data_dir)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST directory {root} not found; {_FIX}")
    image_name, label_name = FMNIST_FILES[split]
    images = read_idx(root / image_name, IDX_IMAGES_MAGIC)
    labels = read_idx(root / label_name, IDX_LABELS_MAGIC)
    if images.shape[1:] != (_SOURCE_SIZE, _SOURCE_SIZE):
        raise DataError(
            f"Fashion-MNIST file {root / image_name} holds images of size {images.shape[1:]}, "
            f"expected 28×28; {_FIX}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"Fashion-MNIST files {root / image_name} and {root / label_name} disagree on the number of "
            f"examples ({images.shape[0]} vs {labels.shape[0]}); {_FIX}"
        )
    if images.shape[0] == 0:
        raise DataError(f"Fashion-MNIST file {root / image_name} holds no images; {_FIX}")
    if labels.max() >= len(FMNIST_CLASSES):
        raise DataError(f"Fashion-MNIST file {root / label_name} has labels above 9; {_FIX}")
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be a positive number of examples, got {limit}")
        images, labels = images[:limit], labels[:limit]
    return to_model_range(images), torch.from_numpy(labels.astype(np.int64))
