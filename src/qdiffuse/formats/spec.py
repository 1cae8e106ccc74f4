"""The description of one number format, shared by weights and activations.

A :class:`FormatSpec` is a plain, hashable value: it round-trips through JSON (``to_dict``/``from_dict``) so
a saved model says exactly how every tensor was quantized.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from qdiffuse.errors import ConfigError
from qdiffuse.formats.quartz import FLAG_BITS, check_quartz_groups

FORMAT_KINDS = ("int", "fp8_e4m3", "fp8_e5m2", "nvfp4", "mxfp4", "quartz")
GRANULARITIES = ("tensor", "channel", "group")
BLOCK_SIZES = {"nvfp4": 16, "mxfp4": 32}


@dataclass(frozen=True)
class FormatSpec:
    """How to quantize one tensor.

    kind: ``int`` (uniform integer), ``fp8_e4m3``/``fp8_e5m2``, ``nvfp4`` (e2m1 values, 16-value blocks with
    e4m3 scales under one fp32 tensor scale) or ``mxfp4`` (e2m1 values, 32-value blocks with power-of-two
    scales) or ``quartz`` (QuaRTZ: INT8 per ``group_size`` values, then leading-zero suppression to 4-bit codes
    with a flag per ``lzs_group`` values, ``rounding`` ``truncate`` or ``nearest``; see :mod:`.quartz`).
    bits: integer bit-width, 2..8 (ignored by the float kinds, which have fixed widths).
    symmetric: integer grid centred on zero (no zero point) or an asymmetric grid with a zero point.
    unsigned: integer grid [0, 2^bits - 1] with zero point 0, for non-negative tensors (softmax outputs).
    granularity: one range per ``tensor``, per output ``channel`` (axis 0) or per ``group`` of ``group_size``
    consecutive values along the flattened input dimension. nvfp4/mxfp4 are always blockwise; quartz is always
    per group (its stage-1 scales) and ``unsigned`` selects its variant for non-negative tensors.
    lzs_group, rounding: QuaRTZ only (0 and "" for every other kind). fit_lzs: QuaRTZ's stage-1 scale maps a
    group's largest value to the largest code LZS keeps exactly (112); False is plain min–max to 127 (an ablation,
    see :func:`qdiffuse.formats.quartz.scale_code`).
    """

    kind: str = "int"
    bits: int = 8
    symmetric: bool = True
    unsigned: bool = False
    granularity: str = "tensor"
    group_size: int = 0
    lzs_group: int = 0
    rounding: str = ""
    fit_lzs: bool = True

    def __post_init__(self) -> None:
        if self.kind not in FORMAT_KINDS:
            raise ConfigError(f"unknown number format {self.kind!r}; use one of {', '.join(FORMAT_KINDS)}")
        if self.kind == "int" and not 2 <= self.bits <= 8:
            raise ConfigError(f"integer bit-width {self.bits} is out of range; use 2 to 8 bits")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"unknown granularity {self.granularity!r}; use one of {', '.join(GRANULARITIES)}"
            )
        if self.granularity == "group" and self.kind == "int" and self.group_size < 1:
            raise ConfigError("granularity 'group' needs a positive group_size, e.g. group_size=64")
        if self.kind == "quartz":
            if self.granularity != "group":
                raise ConfigError("QuaRTZ is per group; use granularity 'group' with group_size=64")
            check_quartz_groups(self.group_size, self.lzs_group, self.rounding)
        elif self.lzs_group or self.rounding or not self.fit_lzs:
            raise ConfigError(f"lzs_group, rounding and fit_lzs belong to the quartz format, not {self.kind}")

    @property
    def value_bits(self) -> int:
        """Bits stored per value, scales not counted."""
        if self.kind == "int":
            return self.bits
        if self.kind.startswith("fp8"):
            return 8
        return 4

    @property
    def overhead_bits(self) -> float:
        """Bits per value spent on scales and flags that vary along the reduction dimension (block scales,
        group scales, QuaRTZ flags; float32 where this package stores float32). Per-tensor and per-channel
        scales, a handful per row, are not counted."""
        if self.kind == "nvfp4":
            return 8 / 16
        if self.kind == "mxfp4":
            return 8 / 32
        if self.kind == "quartz":
            return FLAG_BITS / self.lzs_group + 32 / self.group_size
        if self.granularity == "group":
            return 32 / self.group_size * (1 if self.symmetric and not self.unsigned else 2)
        return 0.0

    @property
    def effective_bits(self) -> float:
        """Bits per value as stored: the value's own bits plus :attr:`overhead_bits`."""
        return self.value_bits + self.overhead_bits

    @property
    def block_size(self) -> int:
        """Values sharing one scale along the flattened input dimension (0: not blockwise)."""
        if self.kind in BLOCK_SIZES:
            return BLOCK_SIZES[self.kind]
        return self.group_size if self.granularity == "group" else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FormatSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"unknown format fields {sorted(unknown)}; this file may come from a newer qdiffuse"
            )
        return cls(**data)

    def describe(self) -> str:
        """Short human label: ``int4-sym-channel``, ``fp8_e4m3-tensor``, ``nvfp4``, ``quartz-g64-l16-nearest``."""
        if self.kind in BLOCK_SIZES:
            return self.kind
        if self.kind == "quartz":
            plain = "" if self.fit_lzs else "-mm127"
            return f"quartz{'-u' if self.unsigned else ''}-g{self.group_size}-l{self.lzs_group}-{self.rounding}{plain}"
        if self.kind == "int":
            sign = "u" if self.unsigned else ("sym" if self.symmetric else "asym")
            gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
            return f"int{self.bits}-{sign}-{gran}"
        return f"{self.kind}-{self.granularity}"
