"""Calibration data for a target solver: Mixed-Order Trajectory Alignment (MOTA, sampling-aware quantization).

A fast high-order solver moves from step point x_i (timestep t_i) to x_{i+1} along a direction that combines
several network evaluations. Written as the first-order (DDIM) step that lands on the same point,

    x_{i+1} = √(ᾱ_{i+1}/ᾱ_i) · x_i + (√(1−ᾱ_{i+1}) − √(ᾱ_{i+1}/ᾱ_i)·√(1−ᾱ_i)) · ε̃_i,

every solver has one *higher-order direction* ε̃_i per interval. MOTA trains the quantized network's first-order
output at x_i toward the FP model's higher-order direction instead of only toward its own FP output there.

Choices (the method's authors published no code; each is stated here and switchable in the config):

1. **The FP trajectories of the target solver** give the calibration points: every step point of
   ``calib_per_step`` trajectories at the solver's own step count, and (``include_intermediate``) the intermediate
   points of the same trajectories.
2. **Block-level target = the FP network at the interval's intermediate point.** Reconstruction works block by
   block, where there is no ε to combine, so the higher-order direction is carried by an input whose FP block
   outputs produce it: for singlestep DPM-Solver++ (``dpm++2s``/``dpm++3s``) the solver's own last intermediate
   point of the interval; for multistep solvers, which evaluate none, DPM-Solver-2's intermediate point of the same
   interval, u_i = the FP first-order step from x_i to the timestep halfway to t_{i+1}, whose FP direction
   ε(u_i, s_i) is the second-order direction that the multistep combination approximates.
3. **The solver's own direction ε̃_i** (from its actual FP update, equation above) is recorded per step point
   as the network-level target: it is what :func:`aligned_error` reports and what tests check against the
   solver run by hand.
4. **Where the higher-order terms act** (``mota_align_at``): in the block stage (choice 2, the default), or in a
   network-level stage after it (:mod:`qdiffuse.calibration.output_align`, ``recon_output_iters`` > 0), where the
   target is the FP network's own output at the intermediate point, ε_fp(u_i, s_i), as the method describes
   it, with the blocks reconstructed toward the plain target; or in both.
5. **Which rows decide the precision plan** (``mota_plan_data``): by default the schedule-wide time-step-aware set
   ``qdiffusion`` uses decides outlier treatments, the end-to-end guard, activation ranges and bias correction, so
   ``mota`` and ``qdiffusion`` start reconstruction from the same model and differ only in what it fits; the
   solver's rows alone (``trajectory``) cover only the timesteps the solver visits (t = 90…900 at 10 DPM-Solver++
   steps), and on ``fmnist-dit`` the guard measured 1.3 dB of activation loss on them against 3.7 dB on the
   schedule-wide rows (t = 0…980), so it left in place a layer input it otherwise moves to FP (BENCHMARKS.md,
   "Sampling-aware quantization").

The last step of a trajectory, the first-order steps a singlestep solver ends with, and intermediate points used as
calibration rows keep the plain target. The targets assume ε-prediction; other models are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qdiffuse.calibration.collect import CalibrationSet
from qdiffuse.errors import ConfigError
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.sampling.loop import SampleRequest, sample
from qdiffuse.sampling.schedulers import HIGHER_ORDER_SAMPLERS, make_scheduler, set_timesteps

SINGLESTEP_SAMPLERS = ("dpm++2s", "dpm++3s")


def check_mota_sampler(sampler: str) -> None:
    if sampler not in HIGHER_ORDER_SAMPLERS:
        raise ConfigError(
            f"--calib-sampler {sampler} has no higher-order direction for mota to align to; use one of "
            f"{', '.join(HIGHER_ORDER_SAMPLERS)} (the sampler you will sample with)"
        )


@dataclass
class Interval:
    """One solver interval in network-call indices: its start, the intermediate calls, the next start."""

    start: int
    intermediate: tuple[int, ...]
    end: int | None


def solver_intervals(sampler: str, scheduler_config: dict, steps: int) -> tuple[list[Interval], Tensor]:
    """The intervals of ``sampler`` at ``steps`` and the timestep of every network call."""
    scheduler = make_scheduler(sampler, scheduler_config)
    set_timesteps(scheduler, steps)
    timesteps = torch.as_tensor(scheduler.timesteps).round().long()
    n = len(timesteps)
    if sampler in SINGLESTEP_SAMPLERS:
        orders = list(scheduler.order_list)
        starts = [k for k in range(n) if orders[k] == 1]
    else:
        # PLMS evaluates its first interval's end point twice (a Heun-like start): the first of the two calls at
        # one timestep is that interval's intermediate point
        starts = [k for k in range(n) if not (0 < k < n - 1 and int(timesteps[k]) == int(timesteps[k + 1]))]
    intervals = []
    for j, k in enumerate(starts):
        nxt = starts[j + 1] if j + 1 < len(starts) else None
        stop = n if nxt is None else nxt
        intervals.append(Interval(k, tuple(range(k + 1, stop)), nxt))
    return intervals, timesteps


def first_order_coefficients(alpha_bar: Tensor, alpha_bar_next: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) of the DDIM step x_next = a·x + b·ε from ᾱ to ᾱ_next."""
    a = (alpha_bar_next / alpha_bar).sqrt()
    b = (1 - alpha_bar_next).sqrt() - a * (1 - alpha_bar).sqrt()
    return a, b


@dataclass
class TrajectorySet:
    """Calibration rows for MOTA and the solver's own directions.

    calib: the network inputs reconstruction trains on (step points, then intermediate points if kept).
    aligned: row i holds the network input whose FP outputs are row i's higher-order block target (row i of
    ``calib`` itself where a row keeps the plain target).
    x, t, t_next, direction, x_next: per trajectory sample and interval with a next step point (guided, one row
    per sample, not per guided half): the step point, its timestep, the next one, the FP solver's higher-order
    direction ε̃ and the FP solver's own next step point.
    labels / cond: the sample rows' conditioning (for :func:`aligned_error`).
    """

    calib: CalibrationSet
    aligned: CalibrationSet
    x: Tensor
    t: Tensor
    t_next: Tensor
    direction: Tensor
    x_next: Tensor
    labels: Tensor | None
    cond: Tensor | None
    guidance: float


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    return None if not parts or parts[0] is None else torch.cat(parts)  # type: ignore[arg-type]


@torch.no_grad()
def collect_trajectory(
    denoiser: Denoiser,
    scheduler_config: dict,
    sampler: str,
    num_inference_steps: int,
    n_per_step: int = 32,
    guidance: float = 1.0,
    labels: tuple[int, ...] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    cond: Tensor | None = None,
    include_intermediate: bool = True,
) -> TrajectorySet:
    """Run the FP ``sampler`` on ``n_per_step`` trajectories and build :class:`TrajectorySet` from every call."""
    check_mota_sampler(sampler)
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ConfigError(
            f"mota works on ε-prediction models and this one predicts {prediction!r} (scheduler prediction_type); "
            "use --method qdiffusion"
        )
    singlestep = sampler in SINGLESTEP_SAMPLERS
    intervals, timesteps = solver_intervals(sampler, scheduler_config, num_inference_steps)
    alphas = make_scheduler("ddpm", scheduler_config).alphas_cumprod.double()
    calls: list[list[tuple[Tensor, ...]]] = []  # per batch, per call: (x, labels, cond, guided eps)
    pending: list[tuple[Tensor, ...]] = []

    def on_step(i: int, _t: Tensor, nx: Tensor, nl: Tensor | None, nc: Tensor | None) -> None:
        if i == 0:
            calls.append([])
        rows = nx.shape[0] // (1 if guidance == 1.0 else 2)
        pending.append(
            (nx[:rows].cpu(), None if nl is None else nl[:rows].cpu(), None if nc is None else nc[:rows].cpu())
        )

    def eps_hook(_i: int, _t: Tensor, eps: Tensor) -> Tensor:
        calls[-1].append((*pending.pop(), eps.float().cpu()))
        return eps

    request = SampleRequest(
        num=n_per_step, steps=num_inference_steps, sampler=sampler, seed=seed, labels=labels,
        guidance=guidance, batch_size=batch_size,
    )
    sample(denoiser, scheduler_config, request, cond=cond, on_step=on_step, eps_hook=eps_hook,
           description="trajectory calibration data")

    starts: list[tuple[Tensor, ...]] = []  # (x, t, labels, cond) per row group
    aligned: list[tuple[Tensor, ...]] = []
    extra: list[tuple[Tensor, ...]] = []
    dir_parts: dict[str, list[Tensor]] = {"x": [], "t": [], "t_next": [], "direction": [], "x_next": []}
    cond_parts: dict[str, list[Tensor]] = {"labels": [], "cond": []}
    for batch in calls:
        lab, con = batch[0][1], batch[0][2]
        n = batch[0][0].shape[0]
        for iv in intervals:
            x, _, _, eps = batch[iv.start]
            t = timesteps[iv.start]
            starts.append((x, t.expand(n), lab, con))
            if iv.end is None:
                aligned.append((x, t.expand(n), lab, con))
                continue
            t_end = timesteps[iv.end]
            if iv.intermediate:
                mid = iv.intermediate[-1]
                aligned.append((batch[mid][0], timesteps[mid].expand(n), lab, con))
            elif singlestep:
                # a first-order interval of a singlestep solver (its final steps): its direction is its own ε
                aligned.append((x, t.expand(n), lab, con))
            else:
                s = (t + t_end) // 2
                a, b = first_order_coefficients(alphas[t], alphas[s])
                u = (a * x.double() + b * eps.double()).to(x.dtype)
                aligned.append((u, s.expand(n), lab, con))
                if include_intermediate:
                    extra.append((u, s.expand(n), lab, con))
            if include_intermediate:
                for k in iv.intermediate:
                    extra.append((batch[k][0], timesteps[k].expand(n), lab, con))
            x_next = batch[iv.end][0]
            a, b = first_order_coefficients(alphas[t], alphas[t_end])
            dir_parts["x"].append(x)
            dir_parts["t"].append(t.expand(n))
            dir_parts["t_next"].append(t_end.expand(n))
            dir_parts["x_next"].append(x_next)
            dir_parts["direction"].append(((x_next.double() - a * x.double()) / b).float())
            if lab is not None:
                cond_parts["labels"].append(lab)
            if con is not None:
                cond_parts["cond"].append(con)

    def guided_set(groups: list[tuple[Tensor, ...]]) -> CalibrationSet:
        xs, ts, ls, cs = [], [], [], []
        for x, t, lab, con in groups:
            gx, gl, gc = denoiser.guided_inputs(x, lab, con, guidance)
            xs.append(gx)
            ts.append(t if guidance == 1.0 else torch.cat([t, t]))
            ls.append(gl)
            cs.append(gc)
        return CalibrationSet(torch.cat(xs), torch.cat(ts).long(), _cat(ls), _cat(cs))

    calib = guided_set(starts + extra)
    aligned_set = guided_set(aligned + extra)
    return TrajectorySet(
        calib=calib,
        aligned=aligned_set,
        x=torch.cat(dir_parts["x"]),
        t=torch.cat(dir_parts["t"]),
        t_next=torch.cat(dir_parts["t_next"]),
        direction=torch.cat(dir_parts["direction"]),
        x_next=torch.cat(dir_parts["x_next"]),
        labels=_cat(cond_parts["labels"]),
        cond=_cat(cond_parts["cond"]),
        guidance=guidance,
    )


@torch.no_grad()
def aligned_error(denoiser: Denoiser, traj: TrajectorySet, batch_size: int = 64) -> dict[str, float]:
    """How far the model's first-order ε at each step point is from the FP solver's higher-order direction:
    mean squared error and mean cosine distance 1 − cos (per sample), over the recorded intervals."""
    mse, cos, n = 0.0, 0.0, 0
    device = denoiser.device
    for lo in range(0, traj.x.shape[0], batch_size):
        hi = lo + batch_size
        x, t = traj.x[lo:hi].to(device), traj.t[lo:hi].to(device)
        lab = None if traj.labels is None else traj.labels[lo:hi].to(device)
        con = None if traj.cond is None else traj.cond[lo:hi].to(device)
        eps = denoiser(x, t, lab, con, traj.guidance).float().flatten(1).cpu()
        target = traj.direction[lo:hi].flatten(1)
        mse += float((eps - target).pow(2).mean(1).sum())
        cos += float((1 - torch.nn.functional.cosine_similarity(eps, target, dim=1)).sum())
        n += x.shape[0]
    return {"mse": mse / max(n, 1), "cosine_distance": cos / max(n, 1), "points": n}


__all__ = [
    "HIGHER_ORDER_SAMPLERS",
    "SINGLESTEP_SAMPLERS",
    "TrajectorySet",
    "Interval",
    "check_mota_sampler",
    "solver_intervals",
    "first_order_coefficients",
    "collect_trajectory",
    "aligned_error",
]
