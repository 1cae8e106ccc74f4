"""The compute dtype of a model: float32, bf16 or fp16, named on the command line and stored in folders.

Users load real pipelines in bf16 or fp16 and checkpoints are saved in fp16, so a model runs in the dtype it
was given: calibration runs the FP model in it, quantized layers return it, folders record it. ``auto`` means the
dtype the model's weights are stored in (fp16 on a CPU excepted, see :func:`auto_dtype`). Whatever the compute
dtype, quantizer arithmetic (scales, rounding, statistics, Hessians, losses) is done in float32.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from qdiffuse.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
AUTO = "auto"
DTYPE_HELP = "Compute dtype: auto (the dtype the weights are stored in), fp32, bf16 or fp16."


def parse_dtype(value: str | torch.dtype | None, what: str = "--dtype") -> torch.dtype | None:
    """A dtype name (or a torch dtype) as the torch dtype; ``None``/``auto`` as None (the stored dtype)."""
    if value is None or isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str):
        name = ALIASES.get(value.strip().lower(), value.strip().lower())
        if name == AUTO:
            return None
        if name in DTYPES:
            return DTYPES[name]
    raise ConfigError(f"{what} {str(value)[:40]!r} is not a compute dtype; use {AUTO}, {', '.join(DTYPES)}")


def auto_dtype(stored: torch.dtype, device: torch.device | str) -> torch.dtype:
    """What ``auto`` computes in for weights stored in ``stored``: that dtype, except fp16 on a CPU, which runs in
    float32. CPUs have no native fp16 GEMMs (on the development CPU an fp16 3×3 conv runs 47× and a matmul 33×
    slower than float32, while bf16 runs 2.5–3× faster), and checkpoints are saved in fp16 for their size (the
    built-ins too): every fp16 value is exact in float32, so it is the same model, computed more precisely.
    ``--dtype fp16`` still runs fp16 anywhere; ``--dtype bf16`` is the CPU's half precision."""
    if stored == torch.float16 and torch.device(device).type == "cpu":
        return torch.float32
    return stored


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (the name folders record and ``--dtype`` takes)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError(f"{dtype} is not a compute dtype; use {', '.join(DTYPES)}")


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(files: list[Path]) -> torch.dtype:
    """The dtype most of the float weights in these safetensors files are stored in (read from their headers,
    nothing loaded); float32 when none is a compute dtype (e.g. float64)."""
    import json
    import struct

    counts: dict[torch.dtype, int] = {}
    for path in files:
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(min(size, 100_000_000)))
        except (OSError, ValueError, struct.error):
            continue  # the loader reports an unreadable file with its own message
        for key, entry in header.items():
            if key == "__metadata__" or not isinstance(entry, dict):
                continue
            dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
            shape = entry.get("shape") or []
            if dtype is not None:
                n = 1
                for d in shape:
                    n *= int(d)
                counts[dtype] = counts.get(dtype, 0) + n
    return max(counts, key=counts.__getitem__) if counts else torch.float32


@functools.cache
def _probe(dtype: torch.dtype, device_type: str) -> str | None:
    """What fails when a diffusion network's ops run in ``dtype`` on this device (None: nothing)."""
    device = torch.device(device_type)
    try:
        x = torch.randn(1, 8, 8, 8, device=device).to(dtype)
        w = torch.randn(8, 8, 3, 3, device=device).to(dtype)
        y = F.silu(F.group_norm(F.conv2d(x, w, padding=1), 4))
        y = F.linear(y.flatten(1), torch.randn(4, 512, device=device).to(dtype))
        seq = x.flatten(2)
        F.scaled_dot_product_attention(seq, seq, seq)
        F.layer_norm(seq, (64,))
    except (RuntimeError, NotImplementedError) as exc:
        return " ".join(str(exc).split())[:120]
    return None


def check_dtype_supported(dtype: torch.dtype, device: torch.device | str) -> None:
    """One line naming the fix when this device cannot run a diffusion network in ``dtype``."""
    device_type = torch.device(device).type
    if dtype == torch.float32:
        return
    problem = _probe(dtype, device_type)
    if problem is not None:
        others = [n for n, d in DTYPES.items() if d != dtype]
        raise ConfigError(
            f"this {device_type} has no {dtype_name(dtype)} kernels for convolution, normalisation or attention "
            f"({problem}); use --dtype {' or '.join(others)}"
        )


__all__ = ["DTYPES", "DTYPE_HELP", "parse_dtype", "auto_dtype", "dtype_name", "stored_dtype", "check_dtype_supported"]
