"""``sample`` and ``eval`` when launched by torchrun: the command-line steps around the sharded core.

Every rank checks the command against the others first (:func:`~qdiffuse.distributed.world.agree`), loads the
model itself, and shares each step's failure with the others; rank 0 alone checks and writes the output and
prints. Other ranks print nothing but their errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qdiffuse.distributed.sampling import remove_shards, sample_sharded
from qdiffuse.distributed.world import World, agree, join, leave, on_every_rank


def model_identity(model: str) -> str:
    """A built-in name as given, a folder by its resolved path and its weights' sizes and times."""
    path = Path(model)
    if not path.exists():
        return model
    files = sorted(p for p in path.rglob("*") if p.is_file())
    stamp = [(str(p.relative_to(path)), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    digest = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
    return f"{path.resolve()}:{digest}"


def sample_launched(
    world: World,
    *,
    model: str,
    out: Path,
    request: Any,
    device: str,
    command: dict[str, Any],
    check_outputs: Callable[[], None],
    load: Callable[[str], tuple[Any, Callable[[list[int]], tuple[Any, Any]]]],
    write: Callable[[np.ndarray, np.ndarray | None], None],
) -> None:
    """One rank's part of ``torchrun … qdiffuse sample``.

    ``check_outputs`` validates the output paths (rank 0), ``load(device)`` returns (the loaded model, a function
    that samples the given batch indices as uint8 images and labels), ``write`` writes the assembled result."""
    device = join(world, device)
    agree(world, command)
    on_every_rank(world, check_outputs, main_only=True)
    # rank 0 loads first: a quantized folder without the PTQD statistics this request needs gets them measured
    # and saved once, and the other ranks then find them
    first = on_every_rank(world, lambda: load(device), main_only=True)
    rest = on_every_rank(world, lambda: None if world.is_main else load(device))
    loaded, sample_batches = first if world.is_main else rest  # type: ignore[misc]

    def one_batch(b: int) -> tuple[np.ndarray, np.ndarray | None]:
        images, labels = sample_batches([b])
        return images, labels

    kept = {k: v for k, v in command.items() if k not in ("out", "overwrite", "world_size", "grid")}
    identity = {"model": model_identity(model), "request": dataclasses.asdict(request), **kept}
    stats: dict[str, int] = {}
    result = sample_sharded(world, request, out, identity, one_batch, stats)
    on_every_rank(world, lambda: write(*result) if result is not None else None, main_only=True)
    remove_shards(world, out)
    leave(world)
    if world.is_main and stats.get("resumed"):
        print(f"resumed {stats['resumed']} of {stats['batches']} batches from an earlier run")


__all__ = ["sample_launched", "model_identity"]
