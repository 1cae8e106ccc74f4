"""The process group a command runs in: one process alone, or one rank of a ``torchrun`` launch.

``torchrun`` (and SLURM ``srun`` + ``torchrun``) describe a launch in the environment: ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``. A command reads them once (:func:`detect`), joins the group
(:func:`join`: NCCL on GPUs, gloo on CPUs) and checks that every rank was given the same command
(:func:`agree`), so a mismatched launch fails on every rank with the same one-line error instead of hanging in a
collective or writing a mixture.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from qdiffuse.errors import ConfigError

T = TypeVar("T")

TIMEOUT_ENV = "QDIFFUSE_DIST_TIMEOUT"
"""Seconds a rank waits for the others (rendezvous and every collective); default 1800."""


@dataclass(frozen=True)
class World:
    """This process's place in the launch; ``launched`` is False for a plain one-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def joined(self) -> bool:
        return self.launched and torch.distributed.is_available() and torch.distributed.is_initialized()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def detect() -> World:
    """The launch this process belongs to, from torchrun's environment (nothing joined yet)."""
    rank, size, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank is None and size is None:
        return World()
    if rank is None or size is None:
        missing = "RANK" if rank is None else "WORLD_SIZE"
        raise ConfigError(f"{missing} is not set beside the other launch variables; launch with torchrun")
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} does not fit WORLD_SIZE={size}; launch with torchrun")
    return World(rank=rank, size=size, local_rank=local if local is not None else rank, launched=True)


def timeout() -> timedelta:
    seconds = _env_int(TIMEOUT_ENV)
    return timedelta(seconds=seconds if seconds and seconds > 0 else 1800)


def join(world: World, device: str) -> str:
    """Join the process group (once); returns the device this rank computes on (``cuda:LOCAL_RANK`` on GPUs)."""
    if not world.launched:
        return device
    import torch.distributed as dist

    if device.startswith("cuda"):
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ConfigError("MASTER_ADDR/MASTER_PORT are not set; launch with torchrun (it sets them)")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    try:
        dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=timeout())
    except (RuntimeError, ValueError, TimeoutError, OSError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ConfigError(
            f"rank {world.rank} could not join the {world.size}-process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({reason}); start every rank with the same "
            "torchrun --nnodes/--rdzv-endpoint, or raise QDIFFUSE_DIST_TIMEOUT"
        ) from None
    return device


def leave(world: World) -> None:
    if world.joined:
        torch.distributed.destroy_process_group()


def _collective_error(world: World, exc: BaseException) -> ConfigError:
    reason = " ".join(str(exc).split())[:160] or type(exc).__name__
    return ConfigError(
        f"rank {world.rank}: another rank of the launch failed or stopped answering ({reason}); see the first "
        "rank's error, fix it and rerun (finished batches are kept)"
    )


def gather_objects(world: World, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (one process: ``[obj]``)."""
    if not world.joined:
        return [obj]
    out: list[Any] = [None] * world.size
    try:
        torch.distributed.all_gather_object(out, obj)
    except (RuntimeError, ValueError, TimeoutError, OSError) as exc:
        raise _collective_error(world, exc) from None
    return out


def gather_to_main(world: World, obj: Any) -> list[Any] | None:
    """``obj`` of every rank on rank 0 (in rank order); None on the others."""
    if not world.joined:
        return [obj]
    out: list[Any] | None = [None] * world.size if world.is_main else None
    try:
        torch.distributed.gather_object(obj, out, dst=0)
    except (RuntimeError, ValueError, TimeoutError, OSError) as exc:
        raise _collective_error(world, exc) from None
    return out


def barrier(world: World) -> None:
    gather_objects(world, None)  # an object collective: works on gloo and NCCL alike, and fails like the others


def run_and_share(
    world: World,
    step: Callable[[], T],
    *,
    run_here: bool = True,
    share_results: bool = False,
    runtime_errors: bool = False,
) -> tuple[T | None, list[Any] | None]:
    """Run ``step`` on this rank (if ``run_here``), then one collective carrying every rank's user error (and,
    with ``runtime_errors``, a ``RuntimeError`` such as running out of GPU memory, as one line): an error on any
    rank is raised on every rank, so none waits forever in a later collective for one that already gave up.
    Returns this rank's result and, with ``share_results``, every rank's result in rank order."""
    from qdiffuse import errors as error_types
    from qdiffuse.errors import QDiffuseError

    result: T | None = None
    error: tuple[str, str] | None = None
    if run_here:
        try:
            result = step()
        except QDiffuseError as exc:
            if not world.joined:
                raise
            error = (type(exc).__name__, str(exc))
        except RuntimeError as exc:
            if not (world.joined and runtime_errors):
                raise
            error = ("DataError", f"rank {world.rank} failed: {' '.join(str(exc).split())[:200]}")
    reports = gather_objects(world, (result if share_results else None, error))
    failed = [e for _, e in reports if e is not None]
    if failed:
        kind, message = failed[0]
        raise getattr(error_types, kind, ConfigError)(message)
    return result, [r for r, _ in reports] if share_results else None


def on_every_rank(world: World, step: Callable[[], T], main_only: bool = False) -> T | None:
    """Run ``step`` (on rank 0 alone with ``main_only``) and share its user errors with every rank."""
    return run_and_share(world, step, run_here=world.is_main or not main_only)[0]


def agree(world: World, command: dict[str, Any]) -> None:
    """Every rank must run the same command: compare a digest of ``command`` across ranks, fail on all of them."""
    digest = hashlib.sha256(json.dumps(command, sort_keys=True, default=str).encode()).hexdigest()[:16]
    every = gather_objects(world, (digest, command))
    if len({d for d, _ in every}) == 1:
        return
    first = every[0][1]
    for rank, (_, other) in enumerate(every):
        differing = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if differing:
            key = differing[0]
            raise ConfigError(
                f"the ranks were given different commands: {key} is {first.get(key)!r} on rank 0 and "
                f"{other.get(key)!r} on rank {rank}; launch every rank with the same arguments"
            )


__all__ = [
    "World",
    "TIMEOUT_ENV",
    "detect",
    "join",
    "leave",
    "agree",
    "on_every_rank",
    "run_and_share",
    "barrier",
    "gather_objects",
    "gather_to_main",
]
