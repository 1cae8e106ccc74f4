"""Per-layer choice of what an integer activation grid needs: nothing, smoothing, a Hadamard rotation, dynamic
ranges, outlier channels in floating point, or (the last resort) a floating-point input.

Each candidate is scored on the layer itself: the FP model runs a few calibration calls (one timestep per call, so a
dynamic range is what it would be at sampling time), and every quantized layer input computes the layer's output
under each candidate — input on the candidate's grid, weight on the layer's weight grid — against the FP output.
The score is the output SQNR (dB) at the worst probe timestep. A layer keeps the plain static grid where that is
within a few dB of the best candidate and above the level a healthy input reaches at its bit-width; otherwise the
cheapest candidate within 1 dB of the best wins. Every decision is kept with its scores and the range structure
that caused it, for ``quantize`` and ``info`` to report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from qdiffuse.calibration.collect import CalibrationSet
from qdiffuse.config import SCHEMES, LayerRule, QuantConfig
from qdiffuse.formats import broadcast_along, fake_quant_int, int_bounds, int_qparams
from qdiffuse.formats.hadamard import hadamard_transform, rotation_block
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.models.clock import TimestepClock
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.nn.quantizer import WeightQuantizer
from qdiffuse.outliers.stats import RangeStats
from qdiffuse.outliers.treatment import layer_op
from qdiffuse.progress import progress_bar

ALPHAS = (0.25, 0.5, 0.75)
"""Smoothing strengths searched per layer (SmoothQuant's α: 0 leaves the input alone, 1 moves its whole range into
the weights)."""
OUTLIER_THRESHOLD = 16.0
"""A channel is an outlier when its max |x| exceeds this many times the median channel's."""
MAX_FP_FRACTION = 1 / 16
"""At most this share of a layer's input channels goes to the floating-point branch."""
MIN_ROTATION_BLOCK = 8
"""Smallest Hadamard block worth rotating a layer's input channels with (the block must divide the channels)."""
KEEP_MARGIN_DB = 3.0
CHOICE_MARGIN_DB = 1.0
PROBE_STEPS = 8
PROBE_ROWS = 8


def healthy_db(bits: int) -> float:
    """Output SQNR below which a plain per-tensor grid of ``bits`` is worth replacing: 6 dB per bit less what
    a skewed input wastes. At 8 bits (28 dB) it sits under the static scores of the built-ins' layers (25–55 dB
    for those the choice changed in their W8A8 folders, `quantization.json`); the lower bit-widths follow the same
    line, not tuned separately."""
    return 6.02 * bits - 20.0


def floor_db(bits: int) -> float:
    """Below this even the best candidate is not a usable grid for the input: it goes to higher precision."""
    return 6.02 * bits - 30.0


@dataclass(frozen=True)
class Candidate:
    """One way to quantize a layer's input; ``cost`` orders them (cheapest first)."""

    name: str
    cost: int
    alpha: float | None = None
    dynamic: bool = False
    split: bool = False
    fp_input: bool = False
    rotate: bool = False


@dataclass
class OutlierDecision:
    """What was chosen for one layer's input, why, and what it costs."""

    layer: str
    choice: str
    reason: str
    sqnr_db: dict[str, float]
    stats: dict[str, Any]
    fp_channels: int = 0
    fp_macs_fraction: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "choice": self.choice,
            "reason": self.reason,
            "sqnr_db": {k: round(v, 2) for k, v in self.sqnr_db.items()},
            "stats": self.stats,
            "fp_channels": self.fp_channels,
            "fp_macs_fraction": round(self.fp_macs_fraction, 4),
        }


@dataclass
class TreatmentPlan:
    """The config the rewrite must use, the per-layer input treatments to install, and every decision."""

    config: QuantConfig
    treatments: dict[str, tuple[Tensor | None, Tensor | None, int]] = field(default_factory=dict)
    decisions: list[OutlierDecision] = field(default_factory=list)

    @property
    def changed(self) -> list[OutlierDecision]:
        return [d for d in self.decisions if d.choice != "static"]

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for d in self.decisions:
            counts[d.choice] = counts.get(d.choice, 0) + 1
        return {"layers": len(self.decisions), "choices": counts, "changed": [d.to_dict() for d in self.changed]}


def _targets(model: nn.Module, config: QuantConfig) -> dict[str, tuple[nn.Module, FormatSpec, FormatSpec]]:
    """Layers whose input goes on an integer per-tensor grid: the ones a treatment can help."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or not name:
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue
        formats = config.formats_for(name)
        if formats is None or formats[1] is None:
            continue
        weight, act = formats
        if act.kind != "int" or act.granularity != "tensor":
            continue
        out[name] = (module, weight, act)
    return out


def _candidates(dynamic_only: bool, has_outliers: bool, can_rotate: bool) -> list[Candidate]:
    cands = [Candidate("static", 0)] if not dynamic_only else []
    cands += [] if dynamic_only else [Candidate(f"smooth{a}", 1, alpha=a) for a in ALPHAS]
    if can_rotate and not dynamic_only:
        cands.append(Candidate("rotate", 2, rotate=True))
    cands += [Candidate("dynamic", 3, dynamic=True)]
    cands += [Candidate(f"smooth{a}+dynamic", 4, alpha=a, dynamic=True) for a in ALPHAS]
    if can_rotate:
        cands.append(Candidate("rotate+dynamic", 5, rotate=True, dynamic=True))
    if has_outliers:
        cands += [] if dynamic_only else [Candidate("fp-channels", 6, split=True)]
        cands += [Candidate("fp-channels+dynamic", 7, split=True, dynamic=True)]
    cands.append(Candidate("fp-input", 9, fp_input=True))
    return cands


def _smooth_vector(stats: RangeStats, weight: Tensor, alpha: float) -> Tensor:
    a = stats.channel_absmax.clamp_min(1e-8)
    w = weight.detach().abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(1).clamp_min(1e-8)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(1e-6, 1e6)


class _LayerProbe:
    """Scores every candidate of one layer on the probe calls (a forward pre-hook on the FP layer)."""

    def __init__(
        self,
        module: nn.Module,
        weight_spec: FormatSpec,
        act_spec: FormatSpec,
        stats: RangeStats,
        splits: tuple[int, ...],
        dynamic_only: bool,
    ) -> None:
        self.module = module
        self.act_spec = act_spec
        self.stats = stats
        self.splits = splits
        self.dim = stats.channel_dim
        channels = module.weight.shape[1]
        self.fp_index = stats.outlier_channels(OUTLIER_THRESHOLD, max(1, int(channels * MAX_FP_FRACTION)))
        self.rotation = stats.rotation
        self.candidates = _candidates(dynamic_only, self.fp_index.numel() > 0, self.rotation > 0)
        self.err: dict[str, list[float]] = {c.name: [] for c in self.candidates}
        self.signal: list[float] = []
        self.smooth = {a: _smooth_vector(stats, module.weight, a) for a in ALPHAS}
        self.weights: dict[str, Tensor] = {}
        self.weight_spec = weight_spec

    def _weight(self, c: Candidate) -> Tensor:
        key = f"{c.alpha}|{c.split}|{c.rotate}"
        if key not in self.weights:
            w = self.module.weight.detach().float().clone()
            if c.split:
                w.index_fill_(1, self.fp_index, 0.0)
            if c.alpha is not None:
                s = self.smooth[c.alpha].clone()
                if c.split:
                    s[self.fp_index] = 1.0
                w = w * broadcast_along(s, w, 1)
            if c.rotate:
                w = hadamard_transform(w, self.rotation, 1)
            parts = []
            for part in torch.split(w, self.splits, dim=1):
                q = WeightQuantizer(self.weight_spec, "minmax")
                q.calibrate(part)
                parts.append(q(part))
            self.weights[key] = torch.cat(parts, dim=1)
        return self.weights[key]

    def smooth_of(self, c: Candidate) -> Tensor | None:
        if c.alpha is None:
            return None
        s = self.smooth[c.alpha].clone()
        if c.split:
            s[self.fp_index] = 1.0
        return s

    def _static_range(self, c: Candidate, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        if c.rotate:
            return torch.tensor(self.stats.rot_min), torch.tensor(self.stats.rot_max)
        ch_min, ch_max = self.stats.ch_min[lo:hi].clone(), self.stats.ch_max[lo:hi].clone()
        s = self.smooth_of(c)
        if s is not None:
            ch_min, ch_max = ch_min / s[lo:hi], ch_max / s[lo:hi]
        if c.split:
            keep = torch.ones(self.stats.ch_min.numel(), dtype=torch.bool)
            keep[self.fp_index] = False
            keep = keep[lo:hi]
            if not keep.any():
                return torch.tensor(0.0), torch.tensor(0.0)
            ch_min, ch_max = ch_min[keep], ch_max[keep]
        return ch_min.min(), ch_max.max()

    def _quantize_input(self, x: Tensor, c: Candidate) -> Tensor:
        spec = self.act_spec
        qmin, qmax = int_bounds(spec.bits, spec.symmetric, spec.unsigned)
        s = self.smooth_of(c)
        if s is not None:
            x = x / broadcast_along(s, x, self.dim)
        if c.split:
            x = x.index_fill(self.dim, self.fp_index, 0.0)
        if c.rotate:
            x = hadamard_transform(x, self.rotation, self.dim)
        out, lo = [], 0
        for part in torch.split(x, self.splits, dim=self.dim):
            hi = lo + part.shape[self.dim]
            xmin, xmax = (part.amin(), part.amax()) if c.dynamic else self._static_range(c, lo, hi)
            scale, zp = int_qparams(xmin, xmax, spec.bits, spec.symmetric, spec.unsigned)
            out.append(fake_quant_int(part, scale, zp, qmin, qmax))
            lo = hi
        return torch.cat(out, dim=self.dim)

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].detach().float()
        w = module.weight.detach().float()
        ref = layer_op(self.module, x, w)
        self.signal.append(float(ref.pow(2).sum()))
        for c in self.candidates:
            if c.fp_input:
                y = layer_op(self.module, x, self._weight(c))
            else:
                y = layer_op(self.module, self._quantize_input(x, c), self._weight(c))
                if c.split:
                    outliers = x.index_select(self.dim, self.fp_index)
                    y = y + layer_op(self.module, outliers, w.index_select(1, self.fp_index))
            self.err[c.name].append(float((y - ref).pow(2).sum()))

    def sqnr(self) -> dict[str, float]:
        """Each candidate's output SQNR at its worst probe call: the calls are the timesteps of the trajectory,
        and a grid that is fine on average can still drown the small signal of the last, low-noise steps,
        which decide the image's detail."""
        return {
            k: min(10 * math.log10(max(s, 1e-30) / max(e, 1e-30)) for s, e in zip(self.signal, errs, strict=True))
            for k, errs in self.err.items()
        }


def _decide(probe: _LayerProbe, bits: int) -> tuple[Candidate, str]:
    scores = probe.sqnr()
    by_name = {c.name: c for c in probe.candidates}
    usable = [c for c in probe.candidates if not c.fp_input]
    best = max(usable, key=lambda c: scores[c.name])
    static = scores.get("static", float("-inf"))
    if static >= healthy_db(bits) and static >= scores[best.name] - KEEP_MARGIN_DB:
        return by_name["static"], "static grid holds it"
    if scores[best.name] < floor_db(bits):
        return by_name["fp-input"], f"no {bits}-bit grid holds it (best {best.name} {scores[best.name]:.1f} dB)"
    good = [c for c in usable if scores[c.name] >= scores[best.name] - CHOICE_MARGIN_DB]
    choice = min(good, key=lambda c: (c.cost, -scores[c.name]))
    why = []
    s = probe.stats
    if s.channel_ratio >= OUTLIER_THRESHOLD:
        why.append(f"channel max/median {s.channel_ratio:.3g}")
    if s.drift_ratio >= 2.0:
        why.append(f"range drifts {s.drift_ratio:.3g}x over t")
    if not why:
        why.append(f"static grid {scores.get('static', float('nan')):.1f} dB")
    return choice, ", ".join(why)


def _probe_calls(calib: CalibrationSet) -> list[Tensor]:
    """Row indices of the probe calls: up to :data:`PROBE_ROWS` rows at each of :data:`PROBE_STEPS` timesteps."""
    ts = sorted({int(v) for v in calib.t.tolist()})
    if len(ts) > PROBE_STEPS:
        ts = [ts[round(i * (len(ts) - 1) / (PROBE_STEPS - 1))] for i in range(PROBE_STEPS)]
    calls = []
    for tv in ts:
        rows = torch.nonzero(calib.t.round().long() == tv).flatten()
        if rows.numel():
            calls.append(rows[torch.linspace(0, rows.numel() - 1, min(PROBE_ROWS, rows.numel())).round().long()])
    return calls


@torch.no_grad()
def plan_treatments(
    denoiser: Denoiser, config: QuantConfig, calib: CalibrationSet, batch_size: int = 64
) -> TreatmentPlan:
    """Measure and score every integer-activation input of the FP model ``denoiser``; returns what to do."""
    from qdiffuse.nn.rewrite import shortcut_splits

    model = denoiser.model
    targets = _targets(model, config)
    if not targets:
        return TreatmentPlan(config)
    splits_at = shortcut_splits(model) if config.split_shortcuts else {}
    clock = TimestepClock()
    handles = [model.register_forward_pre_hook(clock, with_kwargs=True)]  # the range pass; the probes need no t
    stats: dict[str, RangeStats] = {}
    for name, (module, _, _) in targets.items():
        block = rotation_block(module.weight.shape[1])
        block = block if block >= MIN_ROTATION_BLOCK and name not in splits_at else 0
        st = stats[name] = RangeStats(1 if isinstance(module, nn.Conv2d) else -1, rotation=block)
        handles.append(module.register_forward_pre_hook(lambda m, a, st=st: st.update(a[0], clock.t)))
    try:
        calib.run_through(denoiser, batch_size, "input ranges")
    finally:
        for h in handles:
            h.remove()
    handles = []
    probes: dict[str, _LayerProbe] = {}
    for name, (module, wspec, aspec) in targets.items():
        channels = module.weight.shape[1]
        at = splits_at.get(name)
        splits = (at, channels - at) if at and 0 < at < channels else (channels,)
        probe = _LayerProbe(module, wspec, aspec, stats[name], splits, config.dynamic_activations)
        probes[name] = probe
        handles.append(module.register_forward_pre_hook(probe))
    try:
        calls = _probe_calls(calib)
        with progress_bar("outlier candidates", len(calls)) as bar:
            for rows in calls:
                for x, t, labels, cond in calib.subset(rows).batches(len(rows), denoiser.device):
                    denoiser.forward_raw(x, t, labels, cond)
                bar.advance()
    finally:
        for h in handles:
            h.remove()
    return _plan(config, targets, probes)


def _plan(
    config: QuantConfig, targets: dict[str, tuple[nn.Module, FormatSpec, FormatSpec]], probes: dict[str, _LayerProbe]
) -> TreatmentPlan:
    dynamic_layers, fp_inputs, rules = list(config.dynamic_layers), list(config.fp_inputs), []
    plan = TreatmentPlan(config)
    for name, probe in probes.items():
        _, wspec, aspec = targets[name]
        choice, why = _decide(probe, aspec.bits)
        decision = OutlierDecision(name, choice.name, why, probe.sqnr(), probe.stats.summary())
        if choice.fp_input:
            higher = f"w{wspec.bits}a8" if wspec.kind == "int" else None
            if aspec.bits < 8 and higher in SCHEMES:
                rules.append(LayerRule(name, higher))
                decision.choice = "8-bit-input"
            else:
                fp_inputs.append(name)
        if choice.dynamic and not config.dynamic_activations:
            dynamic_layers.append(name)
        smooth = probe.smooth_of(choice)
        fp_index = probe.fp_index if choice.split else None
        rotation = probe.rotation if choice.rotate else 0
        if smooth is not None or fp_index is not None or rotation:
            plan.treatments[name] = (smooth, fp_index, rotation)
        if fp_index is not None:
            decision.fp_channels = int(fp_index.numel())
            decision.fp_macs_fraction = fp_index.numel() / probe.module.weight.shape[1]
        plan.decisions.append(decision)
    plan.config = replace(
        config,
        dynamic_layers=tuple(dynamic_layers),
        fp_inputs=tuple(fp_inputs),
        rules=tuple(rules) + config.rules,
    )
    return plan


def install_treatments(model: nn.Module, plan: TreatmentPlan | None, rank: int = 0) -> None:
    """Put the planned smoothing vectors, outlier channels and rotations on the rewritten model's quantized layers,
    and a rank-``rank`` float branch (SVDQuant) on every layer with integer weights wide enough for one."""
    from qdiffuse.nn.layers import QuantLayer
    from qdiffuse.nn.rewrite import quant_layers

    treatments = plan.treatments if plan is not None else {}
    for name, layer in quant_layers(model):
        smooth, fp_index, rotation = treatments.get(name, (None, None, 0))
        layer_rank = rank if rank and _lowrank_fits(layer, rank) else 0
        if smooth is not None or fp_index is not None or rotation or layer_rank:
            if not isinstance(layer, QuantLayer):
                raise RuntimeError(f"{name} is not a quantized layer after the rewrite")
            layer.treat_input(smooth, fp_index, rotation, layer_rank)


def _lowrank_fits(layer: nn.Module, rank: int) -> bool:
    """A low-rank branch pays where its rank is small against both sides of the weight (<= 1/8 of each)."""
    w = layer.weight
    return (
        layer.weight_spec.kind == "int"
        and getattr(layer, "groups", 1) == 1
        and len(layer.splits) == 1
        and 8 * rank <= min(w.shape[0], w[0].numel())
    )


__all__ = ["plan_treatments", "install_treatments", "TreatmentPlan", "OutlierDecision", "healthy_db", "floor_db"]
