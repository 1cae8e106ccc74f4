"""Network-level alignment: the reconstruction stage that sees the denoiser's own output.

Block reconstruction fits each unit to the FP unit's output, one unit at a time. Two things stay out of its
reach: the error that builds up across units (each unit is fitted on its own), and, for ``mota``, the
higher-order direction itself, which exists only at the network output (a block has no ε to align; the block
stage carries it by the FP block outputs on the interval's intermediate point, whose time embedding and input
differ from the step point's). This stage trains on the network output directly, after the block stage:

    loss = block · ‖ε̂_q(x_i, t_i) − ε_fp(x_i, t_i)‖² + align · ‖ε̂_q(x_i, t_i) − ε_fp(u_i, s_i)‖²
           + cos · ‖ε_fp(u_i, s_i)‖²·(1 − cos(ε̂_q(x_i, t_i), ε_fp(u_i, s_i)))

with the ``mota`` weights (plain reconstruction: the first term only). What it may change keeps the saved codes
valid: the static integer activation step sizes, and a gain per output channel of each layer whose weight formats
are all per-channel or per-group integers. A gain multiplies both the (on-grid) weight and its scales, so the
integer codes are exactly those the block stage chose. Both are learned in log space (one learning rate fits step
sizes of any magnitude). The stage is kept only when it lowers the loss on all its rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qdiffuse.calibration.collect import CalibrationSet
from qdiffuse.calibration.reconstruct import ReconstructionSettings, _act_quantizers, unit_objective
from qdiffuse.errors import ConfigError, DataError
from qdiffuse.formats.integer import SCALE_MIN
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.nn.layers import QuantLayer
from qdiffuse.progress import progress_bar


@dataclass(frozen=True)
class OutputAlignSettings:
    """iters: Adam steps on the network output (0: no stage); lr: their learning rate in log space;
    batch_size / max_samples / seed: as in block reconstruction (the same seeded row subset)."""

    iters: int = 0
    lr: float = 1e-3
    batch_size: int = 32
    max_samples: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iters < 0 or self.batch_size < 1 or self.max_samples < 1:
            raise ConfigError("output alignment needs iterations >= 0 and positive batch and sample counts")
        if not self.lr > 0:
            raise ConfigError(f"output alignment learning rate {self.lr} must be > 0; use e.g. --recon-output-lr 1e-3")


@dataclass
class OutputAlignResult:
    """Loss (mean over batches) before and after, whether the stage was kept, and what it trained."""

    loss_before: float
    loss_after: float
    kept: bool
    act_scales: int
    gained_layers: int
    iters: int = 0
    max_gain_change: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "iters": self.iters,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "kept": self.kept,
            "act_scales": self.act_scales,
            "gained_layers": self.gained_layers,
            "max_gain_change": self.max_gain_change,
        }


def gain_eligible(layer: QuantLayer) -> bool:
    """A per-output-channel gain keeps the layer's codes: every weight split is an integer format whose scales
    are per channel or per group (their first axis is the output channel)."""
    out = layer.weight.shape[0]
    for q in layer.weight_quantizers:
        if q.spec.kind != "int" or q.scale is None or q.scale.dim() == 0 or q.scale.shape[0] != out:
            return False
        if q.spec.granularity not in ("channel", "group"):
            return False
    return True


class _Gain:
    """A learnable per-output-channel gain on one layer's current (on-grid) weight."""

    def __init__(self, layer: QuantLayer) -> None:
        self.layer = layer
        with torch.no_grad():
            self.base = layer.effective_weight().detach().clone()
        self.log_gain = torch.zeros(self.base.shape[0], dtype=torch.float32, requires_grad=True)

    def _shaped(self, like: Tensor) -> Tensor:
        return torch.exp(self.log_gain).view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def install(self) -> None:
        self.layer.effective_weight = lambda: self.base * self._shaped(self.base)  # type: ignore[method-assign]

    def remove(self) -> None:
        self.layer.__dict__.pop("effective_weight", None)

    @torch.no_grad()
    def commit(self) -> None:
        """Write the gain into the weight and every split's scales: the codes stay what they were."""
        for q in self.layer.weight_quantizers:
            q.scale = q.scale * self._shaped(q.scale)
        # quantizing the scaled weight with the scaled scales gives back its codes; the stored weight is then
        # exactly on the new grid (the product alone may sit an ulp off it)
        self.layer.weight.copy_(self.base * self._shaped(self.base))
        self.layer.weight.copy_(self.layer.quantized_weight())


def _forward(denoiser: Denoiser, batch: tuple[Tensor | None, ...]) -> Tensor:
    return denoiser.forward_raw(*batch)


def align_outputs(
    denoiser: Denoiser,
    fp: Denoiser,
    calib: CalibrationSet,
    objective: ReconstructionSettings,
    settings: OutputAlignSettings,
    aligned: CalibrationSet | None = None,
) -> OutputAlignResult:
    """Train ``denoiser``'s activation step sizes and per-channel weight gains on its output (see the module
    docstring); ``fp`` is the FP denoiser, ``objective`` carries the weights of the three terms."""
    s = settings
    if aligned is not None and len(aligned) != len(calib):
        raise DataError(f"aligned calibration inputs hold {len(aligned)} rows for {len(calib)} calibration rows")
    model = denoiser.model
    device = denoiser.device
    n = min(len(calib), s.max_samples)
    rows = torch.randperm(len(calib), generator=torch.Generator().manual_seed(s.seed))[:n].sort().values
    uses_aligned = aligned is not None and (objective.align_weight > 0 or objective.cos_weight > 0)
    batches, targets, aligned_targets = [], [], []
    modes = [(m, m.training) for net in (model, fp.model) for m in net.modules()]
    model.eval()
    fp.model.eval()
    try:
        with torch.no_grad():
            for lo in range(0, n, s.batch_size):
                idx = rows[lo : lo + s.batch_size]
                batch = next(calib.subset(idx).batches(len(idx), device))
                batches.append(batch)
                targets.append(_forward(fp, batch).detach())
                if uses_aligned:
                    assert aligned is not None
                    aligned_targets.append(_forward(fp, next(aligned.subset(idx).batches(len(idx), device))).detach())
        act_qs = _act_quantizers(model)
        gains = [_Gain(m) for m in model.modules() if isinstance(m, QuantLayer) and gain_eligible(m)]

        def loss_of(j: int) -> Tensor:
            out = _forward(denoiser, batches[j])
            return unit_objective(out, targets[j], aligned_targets[j] if uses_aligned else None, objective)

        def evaluate() -> float:
            with torch.no_grad():
                return sum(float(loss_of(j)) for j in range(len(batches))) / len(batches)

        before = evaluate()
        result = OutputAlignResult(before, before, False, len(act_qs), len(gains))
        if s.iters == 0 or not (act_qs or gains):
            return result
        base_scales = [q.scale.detach().clone() for q in act_qs]
        log_scales = [torch.zeros_like(b, requires_grad=True) for b in base_scales]
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + 999_983)
        optimizer = torch.optim.Adam(log_scales + [g.log_gain for g in gains], lr=s.lr)
        for g in gains:
            g.install()
        try:
            with progress_bar("align network output", s.iters) as bar:
                for _ in range(s.iters):
                    for q, b, ls in zip(act_qs, base_scales, log_scales, strict=True):
                        q.scale = (b * torch.exp(ls)).clamp_min(SCALE_MIN)
                    total = loss_of(int(torch.randint(len(batches), (1,), generator=generator)))
                    optimizer.zero_grad()
                    total.backward()
                    optimizer.step()
                    bar.advance()
            with torch.no_grad():
                for q, b, ls in zip(act_qs, base_scales, log_scales, strict=True):
                    q.scale = (b * torch.exp(ls)).clamp_min(SCALE_MIN).detach()
            after = evaluate()
        finally:
            for g in gains:
                g.remove()
            for p, flag in frozen:
                p.requires_grad_(flag)
        result.iters = s.iters
        result.loss_after = after
        if after < before:
            for g in gains:
                g.commit()
            result.kept = True
            result.max_gain_change = max(
                (float((g.log_gain.detach().exp() - 1).abs().max()) for g in gains), default=0.0
            )
        else:
            for q, b in zip(act_qs, base_scales, strict=True):
                q.scale = b
            result.loss_after = before
        return result
    finally:
        for m, mode in modes:
            m.training = mode


__all__ = ["OutputAlignSettings", "OutputAlignResult", "align_outputs", "gain_eligible"]
