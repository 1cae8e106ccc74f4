"""Sampling spread over the ranks of a launch, kept as per-batch shards so that a rerun finishes what is missing.

A request's batch b is sampled from its own generator (``batch_generator(seed, b)``), so it is the same images
whichever process samples it and whenever. Rank r of R takes the batches b ≡ r (mod R), writes each finished
batch as a shard (an ``.npz`` written atomically) into a hidden folder beside the output, and rank 0 assembles the
batches in order into the ADM-style ``.npz``, written atomically, then removes the shards. The result is
bit-identical to a one-process run of the same command (same batch size, same thread count: float reductions
follow them).

Resuming: a shard folder is bound to its request (``shards.json``); a rerun of the same command, with any world
size, keeps every shard it finds and samples only the missing batches. Assembly gathers the batches over the
process group (not through the file system), so ranks on other machines need no shared disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qdiffuse.distributed.world import World, barrier, gather_to_main, run_and_share
from qdiffuse.errors import OutputError
from qdiffuse.progress import progress_bar
from qdiffuse.sampling.loop import SampleRequest, num_batches

MANIFEST = "shards.json"
logger = logging.getLogger(__name__)

BatchSampler = Callable[[int], tuple[np.ndarray, np.ndarray | None]]
"""batch index -> (uint8 NHWC images, labels or None) of that batch."""


def shard_folder(out: Path) -> Path:
    return out.with_name(f".{out.name}.shards")


def _shard_path(folder: Path, batch: int) -> Path:
    return folder / f"batch_{batch:07d}.npz"


def _written(path: Path, exc: OSError) -> OutputError:
    """An OS failure while writing shards, as the one-line error the command line prints."""
    from qdiffuse.fsutil import _disk_full

    return _disk_full(exc, path) or OutputError(
        f"cannot write {path} ({exc.strerror or exc}); check the output folder's permissions and space"
    )


def _open(folder: Path, identity: dict[str, Any]) -> None:
    """Create the shard folder for ``identity`` or check that an existing one was made for it."""
    try:
        _open_folder(folder, identity)
    except OSError as exc:
        raise _written(folder, exc) from None


def _open_folder(folder: Path, identity: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != identity:
            raise OutputError(
                f"{folder} holds batches of another sampling command; rerun that command to finish it, or delete "
                "the folder to start over"
            )
        return
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(identity, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _load_shard(path: Path) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A finished shard, or None when it is missing or unreadable (a torn write is resampled, never trusted)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            images = data["arr_0"]
            labels = data["labels"] if "labels" in data else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or (labels is not None and labels.shape != images.shape[:1]):
        return None
    return images, labels


def _save_shard(path: Path, images: np.ndarray, labels: np.ndarray | None) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    arrays = {"arr_0": images, **({"labels": labels} if labels is not None else {})}
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())  # a shard that exists is complete, even after a power cut
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _written(path, exc) from None


def shared_step(world: World, action: Callable[[], Any]) -> list[Any]:
    """``action`` on this rank, then every rank's result in rank order; a user error or runtime failure on any
    rank is raised on all of them (:func:`~qdiffuse.distributed.world.run_and_share`)."""
    return run_and_share(world, action, share_results=True, runtime_errors=True)[1] or []


def sample_sharded(
    world: World,
    request: SampleRequest,
    out: Path,
    identity: dict[str, Any],
    sample_batch: BatchSampler,
    stats: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Sample ``request`` across the ranks of ``world``; rank 0 gets (images, labels) of the whole request in
    batch order, the other ranks None. ``identity`` (the model and the request) binds the shard folder. A user
    error on any rank (a foreign shard folder, NaN samples) ends every rank with it."""
    stats = {} if stats is None else stats
    identity = json.loads(json.dumps(identity, sort_keys=True, default=str))  # as the manifest reads back
    folder = shard_folder(out)
    shared_step(world, lambda: _open(folder, identity) if world.is_main else None)  # a foreign folder fails all first
    shared_step(world, lambda: None if world.is_main else _open(folder, identity))  # other machines' disks
    total = num_batches(request)
    mine = list(range(world.rank, total, world.size))
    rounds = (total + world.size - 1) // world.size

    def one_round(j: int) -> tuple[int, int]:
        """(batches sampled, batches found finished) in round ``j`` on this rank."""
        if j >= len(mine):
            return 0, 0
        path = _shard_path(folder, mine[j])
        if _load_shard(path) is not None:
            return 0, 1
        _save_shard(path, *sample_batch(mine[j]))
        return 1, 0

    resumed = 0
    with progress_bar(f"sampling (all {world.size} ranks)" if world.size > 1 else "sampling", total) as bar:
        for j in range(rounds):
            counts = shared_step(world, lambda j=j: one_round(j))
            resumed += sum(r for _, r in counts)
            if world.is_main:
                bar.advance(sum(a + r for a, r in counts))
    if world.is_main and resumed:
        logger.info("resumed %d of %d batches from %s", resumed, total, folder)
    stats["resumed"], stats["batches"] = resumed, total
    parts: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    for j in range(rounds):
        payload = None
        if j < len(mine):
            payload = (mine[j], _load_shard(_shard_path(folder, mine[j])))
        gathered = gather_to_main(world, payload)
        for item in gathered or []:
            if item is not None:
                parts[item[0]] = item[1]
    missing = [b for b in range(total) if parts.get(b) is None] if world.is_main else []
    shared_step(world, lambda: _raise_missing(folder, missing))
    if not world.is_main:
        return None
    images = np.concatenate([parts[b][0] for b in range(total)])
    labels = None if parts[0][1] is None else np.concatenate([parts[b][1] for b in range(total)])
    return images, labels


def _raise_missing(folder: Path, missing: list[int]) -> None:
    if missing:
        raise OutputError(f"batches {missing[:5]} vanished from {folder} while sampling; rerun the command")


def remove_shards(world: World, out: Path) -> None:
    """After the output is written: every rank removes its shard folder (one folder or one per machine)."""
    barrier(world)
    shutil.rmtree(shard_folder(out), ignore_errors=True)


__all__ = ["sample_sharded", "shared_step", "remove_shards", "shard_folder", "MANIFEST"]
