"""Block reconstruction (Q-Diffusion's BRECQ/AdaRound step) on top of round-to-nearest PTQ.

The network is cut into units, in the order the forward pass reaches them: diffusers ``ResnetBlock2D``,
``BasicTransformerBlock``, ``Transformer2DModel`` and any ``Attention`` outside those are blocks; a quantized layer
in no block is a unit of its own. Unit by unit, the unit's inputs are recorded from the *quantized* model (so the
error of everything upstream, already reconstructed, is part of what the unit sees) and its targets from the FP
model on FP inputs. Then:

1. **Learned rounding** (AdaRound, integer and QuaRTZ weight formats): each weight element rounds down or up,
   ``w_q = s · (clamp(floor(w/s) + h(V) + zp, qmin, qmax) − zp)`` with the rectified sigmoid
   ``h(V) = clamp(1.2·σ(V) − 0.1, 0, 1)`` started at ``frac(w/s)``. Adam on V minimises the unit's output error
   plus ``round_reg · Σ(1 − |2h(V) − 1|^β)``, β annealed from ``beta_start`` to ``beta_end`` after a warm-up,
   which drives every h(V) to 0 or 1. The weight is then hardened to ``h = [V ≥ 0]``: exactly on the grid, so
   the saved integer codes decode to the same weight. QuaRTZ weights learn the rounding of their INT8 stage and
   pass the leading-zero suppression after it straight through (:func:`qdiffuse.formats.quartz.lzs_ste`).
2. **Learned step sizes** (LSQ) of the unit's static integer activation quantizers, through the
   straight-through rounding of :func:`qdiffuse.formats.integer.fake_quant_int`.

Each phase is kept only when it lowers the unit's error on the recorded data (``keep_best``), so reconstruction
never ends worse than round-to-nearest on any unit. After every unit its weights and step sizes can be written to
``checkpoint_dir``; a later run with the same settings and calibration data loads the finished units and goes on
from the first missing one, with the same result as an uninterrupted run (batch order comes from a generator
seeded per unit).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qdiffuse.calibration.collect import CalibrationSet
from qdiffuse.config import RECON_UNITS
from qdiffuse.errors import ConfigError, DataError
from qdiffuse.formats import group_view, int_bounds, ungroup_view
from qdiffuse.formats.integer import SCALE_MIN
from qdiffuse.formats.quartz import lzs_ste, stage1_bounds
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.nn.attention import is_diffusers_attention
from qdiffuse.nn.layers import QuantLayer
from qdiffuse.nn.quantizer import ActivationQuantizer, SwitchableActivationQuantizer, WeightQuantizer
from qdiffuse.progress import progress_bar

BLOCK_CLASSES = (
    "ResnetBlock2D",
    "BasicTransformerBlock",
    "Transformer2DModel",
    "JointTransformerBlock",
    "FluxTransformerBlock",
    "FluxSingleTransformerBlock",
)
"""diffusers classes reconstructed as one block (besides ``Attention`` modules outside them)."""

MANIFEST = "reconstruction.json"
_ZETA, _GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class ReconstructionSettings:
    """How block reconstruction runs.

    iters: learned-rounding iterations per unit (Q-Diffusion uses 20k; small defaults suit a CPU).
    act_iters: step-size iterations per unit (0 keeps the calibrated activation ranges).
    batch_size: calibration rows per iteration; max_samples: calibration rows used at all (a seeded subset).
    lr_round / lr_act: Adam learning rates of the rounding variables and the activation step sizes.
    round_reg, beta_start, beta_end, warmup: AdaRound's regulariser weight and its β schedule (no regulariser
    during the first ``warmup`` fraction of the iterations, then β linear from start to end).
    blocks: ``auto`` (diffusers blocks, layer-wise elsewhere) or ``layer`` (every layer alone).
    keep_best: keep a phase's result only when it lowers the unit's error on the recorded data.
    block_weight / align_weight / cos_weight: the unit's objective (MOTA, :mod:`qdiffuse.calibration.trajectory`):
    ``block_weight`` × the error to the FP unit output on the same input (Q-Diffusion's target) + ``align_weight`` ×
    the error to the FP unit output on the row's aligned input (the higher-order target) + ``cos_weight`` × the
    cosine term ‖target‖²·(1 − cos(output, aligned target)) per sample, in the same units. Without aligned inputs
    only the first term exists.
    checkpoint_dir: write each finished unit there and resume from it (None: no checkpoints).
    """

    iters: int = 500
    act_iters: int = 200
    batch_size: int = 32
    max_samples: int = 256
    lr_round: float = 1e-3
    lr_act: float = 4e-4
    round_reg: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    blocks: str = "auto"
    keep_best: bool = True
    seed: int = 0
    block_weight: float = 1.0
    align_weight: float = 0.0
    cos_weight: float = 0.0
    checkpoint_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.iters < 0 or self.act_iters < 0:
            raise ConfigError("reconstruction iterations must be >= 0; use e.g. --recon-iters 500")
        if self.batch_size < 1 or self.max_samples < 1:
            raise ConfigError("reconstruction batch size and sample count must be positive")
        if self.blocks not in RECON_UNITS:
            raise ConfigError(f"unknown reconstruction blocks {self.blocks!r}; use one of {', '.join(RECON_UNITS)}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"reconstruction warm-up {self.warmup} must lie in [0, 1)")
        weights = (self.block_weight, self.align_weight, self.cos_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise ConfigError("reconstruction loss weights must be >= 0 and not all 0; e.g. --mota-align 1")

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the result (the checkpoint folder does not)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "checkpoint_dir"}


@dataclass
class UnitResult:
    """One reconstructed unit: its error (sum of channel-summed squared errors, averaged) before and after."""

    name: str
    loss_rtn: float | None
    loss: float | None
    resumed: bool = False


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the unit of interest has been seen."""


# ------------------------------------------------------------------------------------------------ units


def find_units(model: nn.Module, blocks: str = "auto") -> list[str]:
    """Names of the units to reconstruct (model order, not yet forward order)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(u + ".") for u in found):
            continue
        if isinstance(module, QuantLayer):
            found.append(name)
        elif blocks == "auto" and _is_block(module) and any(isinstance(m, QuantLayer) for m in module.modules()):
            found.append(name)
    return found


def _is_block(module: nn.Module) -> bool:
    return type(module).__name__ in BLOCK_CLASSES or is_diffusers_attention(module)


def forward_order(denoiser: Denoiser, names: list[str], batch: tuple[Tensor | None, ...]) -> list[str]:
    """``names`` in the order one forward pass first calls them (units never called are dropped)."""
    order: list[str] = []
    handles = []
    for name in names:

        def hook(_m: nn.Module, _a: Any, name: str = name) -> None:
            if name not in order:
                order.append(name)

        handles.append(denoiser.model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            denoiser.forward_raw(*batch)
    finally:
        for h in handles:
            h.remove()
    return order


def _capture(denoiser: Denoiser, name: str, batches: list[tuple[Tensor | None, ...]], what: str) -> list[Any]:
    """Per batch, the unit's inputs ``(args, kwargs)`` (``what="input"``) or its output, first call only."""
    module = denoiser.model.get_submodule(name)
    box: list[Any] = []

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        box.append((_detach(args), _detach(kwargs)))
        raise _Stop

    def post(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
        box.append(_detach(out))
        raise _Stop

    if what == "input":
        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        handle = module.register_forward_hook(post, with_kwargs=True)
    records = []
    try:
        with torch.no_grad():
            for batch in batches:
                box.clear()
                try:
                    denoiser.forward_raw(*batch)
                except _Stop:
                    pass
                if not box:
                    raise DataError(f"reconstruction: the calibration inputs never reach {name}")
                records.append(box[0])
    finally:
        handle.remove()
    return records


def _detach(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_detach(o) for o in obj)
    if isinstance(obj, list):
        return [_detach(o) for o in obj]
    if type(obj) is dict:
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def block_loss(out: Any, target: Any) -> Tensor:
    """Squared error summed over the channel axis (dim 1 of images, last dim of tokens), averaged elsewhere."""
    total = None
    for o, t in zip(_tensors(out), _tensors(target), strict=True):
        channels = o.shape[1] if o.dim() == 4 else o.shape[-1]
        term = (o.float() - t.float()).pow(2).sum() * (channels / max(o.numel(), 1))
        total = term if total is None else total + term
    if total is None:
        raise DataError("reconstruction: a unit returned no tensors")
    return total


def cosine_loss(out: Any, target: Any) -> Tensor:
    """‖target‖²·(1 − cos(out, target)) per sample (a row of dim 0), normalised like :func:`block_loss`: a
    direction error in the units of a squared error, blind to the output's scale."""
    total = None
    for o, t in zip(_tensors(out), _tensors(target), strict=True):
        channels = o.shape[1] if o.dim() == 4 else o.shape[-1]
        a, b = o.float().flatten(1), t.float().flatten(1)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
        term = (b.pow(2).sum(1) * (1 - cos)).sum() * (channels / max(o.numel(), 1))
        total = term if total is None else total + term
    if total is None:
        raise DataError("reconstruction: a unit returned no tensors")
    return total


def unit_objective(out: Any, target: Any, aligned: Any | None, s: ReconstructionSettings) -> Tensor:
    """The unit's loss: the plain block target, and with aligned targets the MOTA terms beside it."""
    if aligned is None:
        return block_loss(out, target)
    total = s.block_weight * block_loss(out, target) if s.block_weight else torch.zeros(())
    if s.align_weight:
        total = total + s.align_weight * block_loss(out, aligned)
    if s.cos_weight:
        total = total + s.cos_weight * cosine_loss(out, aligned)
    return total


# --------------------------------------------------------------------------------------------- rounding


def _rect_sigmoid(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


class _PartRounding:
    """Learned rounding of one integer weight split (in the grouped view for per-group formats)."""

    def __init__(self, quantizer: WeightQuantizer, fp_part: Tensor) -> None:
        spec = quantizer.spec
        self.shape = fp_part.shape
        self.grouped = spec.granularity == "group"
        self.group_size = spec.group_size
        view = group_view(fp_part.float(), spec.group_size) if self.grouped else fp_part.float()
        self.scale = quantizer.scale
        self.zp = quantizer.zero_point if quantizer.zero_point is not None else torch.zeros_like(self.scale)
        self.lzs = (spec.lzs_group, spec.rounding, spec.unsigned) if spec.kind == "quartz" else None
        if self.lzs:
            self.qmin, self.qmax = stage1_bounds(spec.unsigned)
        else:
            self.qmin, self.qmax = int_bounds(spec.bits, spec.symmetric, spec.unsigned)
        x = view / self.scale
        self.floor = torch.floor(x)
        rest = (x - self.floor).clamp(0.0, 1.0)
        v = -torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1.0)
        self.v = v.detach().clone().requires_grad_(True)

    def _weight(self, h: Tensor) -> Tensor:
        q = torch.clamp(self.floor + h + self.zp, self.qmin, self.qmax)
        if self.lzs:
            q = lzs_ste(q, *self.lzs)
        w = (q - self.zp) * self.scale
        return ungroup_view(w, self.shape) if self.grouped else w

    def soft(self) -> Tensor:
        return self._weight(_rect_sigmoid(self.v))

    def hard(self) -> Tensor:
        return self._weight((self.v.detach() >= 0).to(self.floor.dtype))

    def reg(self, beta: float) -> Tensor:
        return (1.0 - (2.0 * _rect_sigmoid(self.v) - 1.0).abs().pow(beta)).sum()


class _LayerRounding:
    """Learned rounding of one quantized layer: its integer splits learn, other splits keep their weight."""

    def __init__(self, layer: QuantLayer, fp_weight: Tensor) -> None:
        self.layer = layer
        self.parts: list[_PartRounding | Tensor] = []
        fp_parts = layer.weight_parts(fp_weight)
        current = layer.weight_parts(layer.weight.detach())
        for quantizer, fp_part, cur in zip(layer.weight_quantizers, fp_parts, current, strict=True):
            if quantizer.spec.kind in ("int", "quartz") and quantizer.scale is not None:
                self.parts.append(_PartRounding(quantizer, fp_part.detach()))
            else:
                self.parts.append(cur.clone())

    @property
    def learns(self) -> bool:
        return any(isinstance(p, _PartRounding) for p in self.parts)

    def variables(self) -> list[Tensor]:
        return [p.v for p in self.parts if isinstance(p, _PartRounding)]

    def _cat(self, pick: Callable[[_PartRounding], Tensor]) -> Tensor:
        out = [pick(p) if isinstance(p, _PartRounding) else p for p in self.parts]
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def soft_weight(self) -> Tensor:
        return self._cat(_PartRounding.soft).to(self.layer.weight.dtype)

    def hard_weight(self) -> Tensor:
        return self._cat(_PartRounding.hard).to(self.layer.weight.dtype)

    def reg(self, beta: float) -> Tensor:
        return sum((p.reg(beta) for p in self.parts if isinstance(p, _PartRounding)), torch.zeros(()))

    def install(self) -> None:
        """Make the layer compute with the soft weight (an instance attribute shadows the method)."""
        self.layer.effective_weight = self.soft_weight

    def remove(self) -> None:
        self.layer.__dict__.pop("effective_weight", None)


def _beta(it: int, s: ReconstructionSettings) -> float | None:
    """β of iteration ``it``; None during the warm-up (no rounding regulariser)."""
    start = s.warmup * s.iters
    if it < start:
        return None
    rel = (it - start) / max(s.iters - start, 1.0)
    return s.beta_end + (s.beta_start - s.beta_end) * max(0.0, 1.0 - rel)


def _act_quantizers(module: nn.Module) -> list[ActivationQuantizer]:
    """Static integer activation quantizers of ``module`` that run (the active variant of switchable ones)."""
    inactive: set[int] = set()
    for m in module.modules():
        if isinstance(m, SwitchableActivationQuantizer):
            inactive.update(id(q) for k, q in m.variants.items() if k != m.active)
    return [
        m
        for m in module.modules()
        if isinstance(m, ActivationQuantizer)
        and id(m) not in inactive
        and m.spec.kind == "int"
        and not m.dynamic
        and m.enabled
        and m.scale is not None
    ]


# ---------------------------------------------------------------------------------------------- one unit


def _reconstruct_unit(
    index: int,
    name: str,
    q_model: nn.Module,
    fp_model: nn.Module,
    inputs: list[tuple[tuple, dict]],
    targets: list[Any],
    s: ReconstructionSettings,
    aligned: list[Any] | None = None,
) -> UnitResult:
    module = q_model.get_submodule(name)
    prefix = f"{name}." if not isinstance(module, QuantLayer) else ""
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, QuantLayer)]
    roundings = []
    for sub, layer in layers:
        full = name if not sub else prefix + sub
        r = _LayerRounding(layer, fp_model.get_submodule(full).weight.detach())
        if r.learns:
            roundings.append(r)
    act_qs = _act_quantizers(module) if s.act_iters > 0 else []
    generator = torch.Generator().manual_seed(s.seed * 1_000_003 + index)
    frozen = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)

    def run(j: int) -> Tensor:
        args, kwargs = inputs[j]
        return unit_objective(module(*args, **kwargs), targets[j], None if aligned is None else aligned[j], s)

    def evaluate() -> float:
        with torch.no_grad():
            return sum(float(run(j)) for j in range(len(inputs))) / len(inputs)

    def pick() -> int:
        return int(torch.randint(len(inputs), (1,), generator=generator))

    n_steps = (s.iters if roundings else 0) + (s.act_iters if act_qs else 0)
    try:
        loss_rtn = evaluate()
        loss = loss_rtn
        with progress_bar(f"reconstruct {name}", n_steps) as bar:
            if roundings and s.iters > 0:
                rtn = [r.layer.weight.detach().clone() for r in roundings]
                optimizer = torch.optim.Adam([v for r in roundings for v in r.variables()], lr=s.lr_round)
                for r in roundings:
                    r.install()
                try:
                    for it in range(s.iters):
                        total = run(pick())
                        beta = _beta(it, s)
                        if beta is not None and s.round_reg > 0:
                            total = total + s.round_reg * sum(r.reg(beta) for r in roundings)
                        optimizer.zero_grad()
                        total.backward()
                        optimizer.step()
                        bar.advance()
                finally:
                    for r in roundings:
                        r.remove()
                with torch.no_grad():
                    for r in roundings:
                        r.layer.weight.copy_(r.hard_weight())
                learned = evaluate()
                if s.keep_best and learned > loss:
                    with torch.no_grad():
                        for r, w in zip(roundings, rtn, strict=True):
                            r.layer.weight.copy_(w)
                else:
                    loss = learned
            if act_qs:
                before = [q.scale.detach().clone() for q in act_qs]
                for q in act_qs:
                    q.scale = q.scale.detach().clone().requires_grad_(True)
                optimizer = torch.optim.Adam([q.scale for q in act_qs], lr=s.lr_act)
                try:
                    for _ in range(s.act_iters):
                        total = run(pick())
                        optimizer.zero_grad()
                        total.backward()
                        optimizer.step()
                        with torch.no_grad():
                            for q in act_qs:
                                q.scale.clamp_(min=SCALE_MIN)
                        bar.advance()
                finally:
                    for q in act_qs:
                        q.scale = q.scale.detach()
                learned = evaluate()
                if s.keep_best and learned > loss:
                    for q, old in zip(act_qs, before, strict=True):
                        q.scale = old
                else:
                    loss = learned
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    return UnitResult(name, loss_rtn, loss)


def _unit_state(q_model: nn.Module, name: str) -> dict[str, Tensor]:
    """What reconstruction may change in a unit: its layers' weights and its activation scales."""
    module = q_model.get_submodule(name)
    state: dict[str, Tensor] = {}
    for sub, m in module.named_modules():
        full = f"{name}.{sub}" if sub else name
        if isinstance(m, QuantLayer):
            state[f"{full}.weight"] = m.weight.detach().contiguous().cpu()
        elif isinstance(m, ActivationQuantizer) and m.scale is not None:
            state[f"{full}.scale"] = m.scale.detach().contiguous().cpu()
    return state


def _load_unit_state(q_model: nn.Module, state: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for key, value in state.items():
            owner, _, attr = key.rpartition(".")
            module = q_model.get_submodule(owner)
            if attr == "weight":
                module.weight.copy_(value)
            else:
                module.scale = value.to(device=module.scale.device)


# ----------------------------------------------------------------------------------------- checkpoints


def _calib_digest(calib: CalibrationSet, rows: Tensor) -> str:
    return calib.digest(rows)


def _open_checkpoint(directory: Path, manifest: dict[str, Any]) -> int:
    """Check or create ``directory``'s manifest; returns how many units are already finished there."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"reconstruction checkpoint {path} is unreadable ({exc}); use an empty folder") from None
        if old != manifest:
            raise ConfigError(
                f"reconstruction checkpoint {directory} was made with other settings, units or calibration data; "
                "use an empty --checkpoint-dir or the original settings"
            )
    else:
        _atomic_write(path, lambda p: p.write_text(json.dumps(manifest, indent=2)))
    done = 0
    while (directory / _unit_file(done)).exists():
        done += 1
    return done


def _unit_file(index: int) -> str:
    return f"block_{index:03d}.safetensors"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- entry


def reconstruct(
    fp_model: nn.Module,
    denoiser: Denoiser,
    calib: CalibrationSet,
    settings: ReconstructionSettings | None = None,
    aligned: CalibrationSet | None = None,
) -> list[UnitResult]:
    """Reconstruct ``denoiser``'s quantized model unit by unit against ``fp_model``, in place.

    ``aligned`` (MOTA): row i is the input whose FP unit outputs are row i's aligned target (same rows as
    ``calib``); the objective is then :func:`unit_objective` with the settings' weights.

    ``fp_model`` is an FP copy of the network taken before ``quantize_model`` (module names must match);
    ``denoiser.model`` must already be calibrated (``calibrate_ptq``). The result stays on the quantizers' grids:
    the saved integer codes reproduce the reconstructed weights exactly.
    """
    s = settings or ReconstructionSettings()
    q_model = denoiser.model
    fp = replace(denoiser, model=fp_model)
    device = denoiser.device
    n = min(len(calib), s.max_samples)
    rows = torch.randperm(len(calib), generator=torch.Generator().manual_seed(s.seed))[:n].sort().values
    if aligned is not None and len(aligned) != len(calib):
        raise DataError(f"aligned calibration inputs hold {len(aligned)} rows for {len(calib)} calibration rows")
    batches, aligned_batches = [], []
    for lo in range(0, n, s.batch_size):
        idx = rows[lo : lo + s.batch_size]
        for source, out in ((calib, batches), (aligned, aligned_batches)):
            if source is not None:
                out.append(next(source.subset(idx).batches(len(idx), device)))
    uses_aligned = aligned is not None and (s.align_weight > 0 or s.cos_weight > 0)
    # eval mode throughout: training-mode randomness (DiT's label dropout) would make inputs and targets noise
    modes = [(m, m.training) for model in (q_model, fp_model) for m in model.modules()]
    q_model.eval()
    fp_model.eval()
    try:
        return _reconstruct_units(
            q_model, fp_model, denoiser, fp, calib, rows, batches, s, aligned_batches if uses_aligned else None,
            aligned if uses_aligned else None,
        )
    finally:
        for m, mode in modes:
            m.training = mode


def _reconstruct_units(
    q_model: nn.Module,
    fp_model: nn.Module,
    denoiser: Denoiser,
    fp: Denoiser,
    calib: CalibrationSet,
    rows: Tensor,
    batches: list[tuple[Tensor | None, ...]],
    s: ReconstructionSettings,
    aligned_batches: list[tuple[Tensor | None, ...]] | None = None,
    aligned: CalibrationSet | None = None,
) -> list[UnitResult]:
    from safetensors.torch import load_file, save_file

    units = forward_order(denoiser, find_units(q_model, s.blocks), batches[0])
    done = 0
    directory = s.checkpoint_dir
    if directory is not None:
        manifest = {"settings": s.fingerprint(), "units": units, "calibration": _calib_digest(calib, rows)}
        if aligned is not None:
            manifest["aligned"] = _calib_digest(aligned, rows)
        done = _open_checkpoint(Path(directory), manifest)
    results: list[UnitResult] = []
    for index, name in enumerate(units):
        if index < done:
            _load_unit_state(q_model, load_file(str(Path(directory) / _unit_file(index))))
            results.append(UnitResult(name, None, None, resumed=True))
            continue
        inputs = _capture(denoiser, name, batches, "input")
        targets = _capture(fp, name, batches, "output")
        aligned_targets = None if aligned_batches is None else _capture(fp, name, aligned_batches, "output")
        results.append(_reconstruct_unit(index, name, q_model, fp_model, inputs, targets, s, aligned_targets))
        del inputs, targets, aligned_targets
        if directory is not None:
            state = _unit_state(q_model, name)
            _atomic_write(Path(directory) / _unit_file(index), lambda p, st=state: save_file(st, str(p)))
    return results


__all__ = [
    "ReconstructionSettings",
    "UnitResult",
    "reconstruct",
    "find_units",
    "forward_order",
    "block_loss",
    "cosine_loss",
    "unit_objective",
]
