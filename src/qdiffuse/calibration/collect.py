"""Time-step-aware calibration data (Q-Diffusion).

Activation ranges of a diffusion network drift strongly with the timestep, so calibration inputs must come from
the whole trajectory: run the full-precision sampler and keep the exact network inputs (x_t, t, labels,
condition, both halves of a guided batch) at evenly spaced steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from qdiffuse.calibration.call_inputs import CallInputs
from qdiffuse.errors import DataError
from qdiffuse.formats import check_finite
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.progress import progress_bar
from qdiffuse.sampling.loop import SampleRequest, sample


@dataclass
class CalibrationSet:
    """Recorded network inputs; row i of every tensor belongs to the same call.

    ``cond`` is a text condition tensor, or for a pipeline's denoiser every keyword input of its calls
    (:class:`~qdiffuse.calibration.call_inputs.CallInputs`).
    """

    x: Tensor
    t: Tensor
    labels: Tensor | None = None
    cond: Tensor | CallInputs | None = None

    def __post_init__(self) -> None:
        if self.x.shape[0] == 0:
            raise DataError("the calibration set is empty; raise --calib-steps/--calib-per-step")
        check_finite(self.x, "calibration data")
        if isinstance(self.cond, CallInputs):
            lengths = {value.shape[0] for value in self.cond.rows.values()}
            if lengths - {len(self)}:
                raise DataError(f"the calibration set has {len(self)} inputs but recorded calls of {sorted(lengths)}")
            for value in self.cond.rows.values():
                if value.is_floating_point():
                    check_finite(value, "calibration condition")
        elif self.cond is not None:
            check_finite(self.cond, "calibration condition")

    def __len__(self) -> int:
        return self.x.shape[0]

    def batches(self, batch_size: int, device: torch.device | str = "cpu") -> Iterator[tuple[Tensor, ...]]:
        for lo in range(0, len(self), batch_size):
            hi = lo + batch_size
            yield (
                self.x[lo:hi].to(device),
                self.t[lo:hi].to(device),
                None if self.labels is None else self.labels[lo:hi].to(device),
                None if self.cond is None else _select(self.cond, slice(lo, hi)).to(device),
            )

    def subset(self, rows: Tensor) -> CalibrationSet:
        """The calls at row indices ``rows``, every tensor indexed alike."""
        return CalibrationSet(
            self.x[rows],
            self.t[rows],
            None if self.labels is None else self.labels[rows],
            None if self.cond is None else _select(self.cond, rows),
        )

    @torch.no_grad()
    def run_through(self, denoiser: Denoiser, batch_size: int, description: str) -> None:
        """Call ``denoiser`` on every recorded input, in batches, with a progress bar: the pass that hooks and
        observers on the model measure from."""
        n_batches = (len(self) + batch_size - 1) // batch_size
        with progress_bar(description, n_batches) as bar:
            for x, t, labels, cond in self.batches(batch_size, denoiser.device):
                denoiser.forward_raw(x, t, labels, cond)
                bar.advance()

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"x": self.x.contiguous(), "t": self.t.contiguous()}
        metadata: dict[str, str] = {}
        if self.labels is not None:
            tensors["labels"] = self.labels.contiguous()
        if isinstance(self.cond, CallInputs):
            more, metadata = self.cond.to_safetensors(CALL_PREFIX)
            tensors |= more
        elif self.cond is not None:
            tensors["cond"] = self.cond.contiguous()
        save_file(tensors, str(path), metadata=metadata or None)

    @classmethod
    def load(cls, path: Path) -> CalibrationSet:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError) as exc:
            raise DataError(f"calibration file {path} is not readable safetensors ({exc})") from None
        if "x" not in tensors or "t" not in tensors:
            raise DataError(f"calibration file {path} needs tensors 'x' and 't'")
        cond: Tensor | CallInputs | None = tensors.get("cond")
        if any(k.startswith(CALL_PREFIX) for k in tensors) or f"{CALL_PREFIX}constants" in metadata:
            cond = CallInputs.from_safetensors(tensors, metadata, CALL_PREFIX)
        return cls(tensors["x"], tensors["t"], tensors.get("labels"), cond)

    def digest(self, rows: Tensor) -> str:
        """A content hash of the calls at ``rows`` (reconstruction checkpoints are bound to it)."""
        import hashlib

        h = hashlib.sha256()
        for t in (self.x, self.t, self.labels, self.cond):
            if isinstance(t, CallInputs):
                h.update(t.digest(rows).encode())
            elif t is not None:
                h.update(t[rows].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]


CALL_PREFIX = "call."
"""Key prefix of recorded pipeline call inputs in a calibration file."""


def _select(cond: Tensor | CallInputs, index: slice | Tensor) -> Tensor | CallInputs:
    return cond.select(index) if isinstance(cond, CallInputs) else cond[index]


def calibration_step_indices(num_inference_steps: int, n_steps: int) -> list[int]:
    """``n_steps`` sampler step indices spread evenly from the first (noisiest) to the last."""
    n = min(n_steps, num_inference_steps)
    return sorted({round(i * (num_inference_steps - 1) / max(n - 1, 1)) for i in range(n)})


def collect_calibration(
    denoiser: Denoiser,
    scheduler_config: dict,
    n_steps: int = 20,
    n_per_step: int = 32,
    sampler: str = "ddim",
    num_inference_steps: int = 50,
    guidance: float = 1.0,
    labels: tuple[int, ...] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    cond: Tensor | None = None,
) -> CalibrationSet:
    """Run the FP sampler on ``n_per_step`` trajectories and keep the inputs at ``n_steps`` spaced steps."""
    keep = set(calibration_step_indices(num_inference_steps, n_steps))
    records: dict[str, list[Tensor]] = {"x": [], "t": [], "labels": [], "cond": []}

    def record(i: int, t: Tensor, x: Tensor, lab: Tensor | None, c: Tensor | None) -> None:
        if i not in keep:
            return
        records["x"].append(x.detach().cpu())
        records["t"].append(t.detach().cpu())
        if lab is not None:
            records["labels"].append(lab.detach().cpu())
        if c is not None:
            records["cond"].append(c.detach().cpu())

    request = SampleRequest(
        num=n_per_step,
        steps=num_inference_steps,
        sampler=sampler,
        seed=seed,
        labels=labels,
        guidance=guidance,
        batch_size=batch_size,
    )
    sample(denoiser, scheduler_config, request, cond=cond, on_step=record, description="calibration data")
    return CalibrationSet(
        x=torch.cat(records["x"]),
        t=torch.cat(records["t"]),
        labels=torch.cat(records["labels"]) if records["labels"] else None,
        cond=torch.cat(records["cond"]) if records["cond"] else None,
    )


__all__ = ["CalibrationSet", "collect_calibration", "calibration_step_indices"]
