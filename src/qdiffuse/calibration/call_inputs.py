"""A denoiser's keyword inputs as its pipeline passes them, recorded so that calibration can replay them.

Pipeline denoisers take more than ``(x_t, t, text)``: SDXL's UNet gets pooled text embeddings and size/crop ids
(``added_cond_kwargs``), PixArt gets resolution and aspect ratio, SD3 pooled projections, FLUX positional ids of
every image and text token and a guidance value. Rather than teach qdiffuse each convention, calibration records
the keyword arguments of every real call and replays them verbatim. Tensors whose first dimension is the batch are
kept per row (so calibration sets can be subset, batched and concatenated like the other inputs); everything else
(FLUX's 2-D token ids, flags, ``None`` entries) must be the same in every call and is kept once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from qdiffuse.errors import DataError

SEPARATOR = "."
"""Joins a nested dictionary's keys (``added_cond_kwargs.text_embeds``) in the flat record."""

DROPPED = frozenset({"return_dict"})
"""Arguments the replay sets itself: it always asks for the plain tuple output."""


@dataclass
class CallInputs:
    """Keyword inputs of a batch of denoiser calls: ``rows`` are batch-first tensors, ``constants`` the rest."""

    rows: dict[str, Tensor]
    constants: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_call(cls, kwargs: Mapping[str, Any], batch: int) -> CallInputs:
        """Split one call's keyword arguments (sample and timestep already removed) for a batch of ``batch``."""
        rows: dict[str, Tensor] = {}
        constants: dict[str, Any] = {}
        for key, value in _flatten(kwargs):
            if key.split(SEPARATOR)[0] in DROPPED:
                continue
            if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch:
                rows[key] = value.detach().cpu()
            elif isinstance(value, Tensor):
                constants[key] = value.detach().cpu()
            elif value is None or isinstance(value, (bool, int, float, str)) or value == {}:
                constants[key] = value
            else:
                raise DataError(
                    f"the denoiser was called with {key} of type {type(value).__name__}, which calibration cannot "
                    "record; pass tensors, numbers or None"
                )
        return cls(rows, constants)

    @classmethod
    def cat(cls, parts: Iterable[CallInputs]) -> CallInputs:
        """The calls of ``parts`` one after the other; their constants must agree."""
        parts = list(parts)
        first = parts[0]
        for other in parts[1:]:
            if other.rows.keys() != first.rows.keys():
                raise DataError(
                    "the denoiser's calls differ in their inputs "
                    f"({sorted(first.rows)} against {sorted(other.rows)}); calibrate with one call setting"
                )
            for key in first.constants.keys() | other.constants.keys():
                if not _same(first.constants.get(key), other.constants.get(key)):
                    raise DataError(
                        f"the denoiser's input {key} changes between calls; calibrate at one image size and "
                        "sequence length"
                    )
        rows = {k: torch.cat([p.rows[k] for p in parts]) for k in first.rows}
        return cls(rows, dict(first.constants))

    def __len__(self) -> int:
        return next(iter(self.rows.values())).shape[0] if self.rows else 0

    def select(self, index: slice | Tensor) -> CallInputs:
        return CallInputs({k: v[index] for k, v in self.rows.items()}, self.constants)

    def to(self, device: torch.device | str) -> CallInputs:
        return CallInputs(
            {k: v.to(device) for k, v in self.rows.items()},
            {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.constants.items()},
        )

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments to call the denoiser with, nested again."""
        out: dict[str, Any] = {}
        for key, value in (*self.rows.items(), *self.constants.items()):
            *parents, leaf = key.split(SEPARATOR)
            node = out
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
        return out

    def tensors(self) -> list[Tensor]:
        return [*self.rows.values(), *(v for v in self.constants.values() if isinstance(v, Tensor))]

    def digest(self, rows: Tensor | None = None) -> str:
        """A content hash (of ``rows`` only, when given): identifies a calibration set in checkpoints."""
        h = hashlib.sha256()
        for key in sorted(self.rows):
            value = self.rows[key] if rows is None else self.rows[key][rows]
            h.update(key.encode())
            h.update(_bytes(value))
        for key in sorted(self.constants):
            value = self.constants[key]
            h.update(key.encode())
            h.update(_bytes(value) if isinstance(value, Tensor) else repr(value).encode())
        return h.hexdigest()[:16]

    def to_safetensors(self, prefix: str) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Tensors and string metadata that :meth:`from_safetensors` reads back."""
        tensors = {f"{prefix}rows.{k}": v.contiguous() for k, v in self.rows.items()}
        tensors |= {f"{prefix}const.{k}": v.contiguous() for k, v in self.constants.items() if isinstance(v, Tensor)}
        plain = {k: v for k, v in self.constants.items() if not isinstance(v, Tensor)}
        return tensors, {f"{prefix}constants": json.dumps(plain)}

    @classmethod
    def from_safetensors(cls, tensors: Mapping[str, Tensor], metadata: Mapping[str, str], prefix: str) -> CallInputs:
        rows = {k[len(prefix) + 5 :]: v for k, v in tensors.items() if k.startswith(f"{prefix}rows.")}
        constants: dict[str, Any] = {
            k[len(prefix) + 6 :]: v for k, v in tensors.items() if k.startswith(f"{prefix}const.")
        }
        try:
            plain = json.loads(metadata.get(f"{prefix}constants", "{}"))
        except json.JSONDecodeError:
            plain = None
        if not isinstance(plain, dict):
            raise DataError("the calibration file's recorded call constants are not a JSON object; record it again")
        constants |= plain
        return cls(rows, constants)


def _bytes(value: Tensor) -> bytes:
    """A tensor's raw bytes whatever its dtype (numpy has no bfloat16)."""
    return value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _flatten(kwargs: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in kwargs.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if not value:
                yield name, {}
            yield from _flatten(value, name + SEPARATOR)
        else:
            yield name, value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return type(a) is type(b) and a == b


__all__ = ["CallInputs"]
