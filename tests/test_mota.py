"""MOTA: solver intervals, trajectory rows and targets checked against the solver run by hand, the objective's terms
on hand-made tensors, and reconstruction that lowers the aligned error."""

from __future__ import annotations

import copy
import json

import diffusers
import pytest
import torch
from tiny_models import tiny_unet

from qdiffuse.api import quantize
from qdiffuse.calibration.collect import CalibrationSet
from qdiffuse.calibration.reconstruct import ReconstructionSettings, cosine_loss, unit_objective
from qdiffuse.calibration.trajectory import collect_trajectory, first_order_coefficients, solver_intervals
from qdiffuse.config import QuantConfig
from qdiffuse.errors import ConfigError
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.progress import set_progress_enabled
from qdiffuse.sampling.loop import batch_generator

set_progress_enabled(False)

CONFIG = json.loads(diffusers.DDPMScheduler(clip_sample=False).to_json_string())
META = {"num_classes": 3, "null_class": 3}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m = tiny_unet(4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return m.eval()


def test_intervals_follow_each_solver() -> None:
    multistep, ts = solver_intervals("dpm++2m", CONFIG, 4)
    assert [(i.start, i.intermediate, i.end) for i in multistep] == [(0, (), 1), (1, (), 2), (2, (), 3), (3, (), None)]
    assert ts.tolist() == [750, 500, 250, 0] or len(ts) == 4
    single, _ = solver_intervals("dpm++2s", CONFIG, 6)  # order list 1 2 1 2 1 1 (first order at the end)
    assert [(i.start, i.intermediate, i.end) for i in single] == [(0, (1,), 2), (2, (3,), 4), (4, (), 5), (5, (), None)]
    third, _ = solver_intervals("dpm++3s", CONFIG, 6)
    assert [(i.start, i.intermediate) for i in third][:2] == [(0, (1, 2)), (3, (4,))]
    plms, ts = solver_intervals("pndm", CONFIG, 6)  # PLMS evaluates its first end point twice
    assert int(ts[1]) == int(ts[2]) and (plms[0].start, plms[0].intermediate, plms[0].end) == (0, (1,), 2)


def _by_hand(denoiser: Denoiser, sampler_class: str, extra: dict, steps: int, n: int, guidance: float) -> list:
    """The FP solver run with diffusers directly: the network input x and the guided ε at every call."""
    scheduler = getattr(diffusers, sampler_class).from_config(CONFIG, **extra)
    scheduler.set_timesteps(steps)
    gen = batch_generator(0, 0)
    x = torch.randn((n, *denoiser.sample_shape), generator=gen) * scheduler.init_noise_sigma
    labels = torch.tensor([i % 3 for i in range(n)])
    calls = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(x, t)
            eps = denoiser(model_in, t.expand(n), labels, None, guidance)
            calls.append((model_in.clone(), int(t), eps))
            x = scheduler.step(eps, t, x).prev_sample
    return calls


def test_multistep_directions_reproduce_the_solver(model: torch.nn.Module) -> None:
    """The recorded higher-order direction of each interval, taken as one first-order step from the step point,
    lands on the FP solver's own next step point; aligned rows are the DPM-Solver-2 midpoints from the FP ε."""
    denoiser = Denoiser.from_model(model, META)
    steps, n = 5, 3
    traj = collect_trajectory(denoiser, CONFIG, "dpm++2m", steps, n_per_step=n, guidance=2.0)
    calls = _by_hand(
        denoiser, "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, steps, n, 2.0
    )
    alphas = diffusers.DDPMScheduler.from_config(CONFIG).alphas_cumprod.double()
    assert traj.x.shape[0] == n * (steps - 1)
    for i in range(steps - 1):
        rows = slice(i * n, (i + 1) * n)
        x, t, eps = calls[i]
        x_next, t_next, _ = calls[i + 1]
        torch.testing.assert_close(traj.x[rows], x, atol=1e-5, rtol=0)
        assert int(traj.t[rows][0]) == t and int(traj.t_next[rows][0]) == t_next
        a, b = first_order_coefficients(alphas[t], alphas[t_next])
        landed = a * traj.x[rows].double() + b * traj.direction[rows].double()
        torch.testing.assert_close(landed.float(), x_next, atol=1e-4, rtol=1e-4)
        # guided calibration rows: [conditional; unconditional] halves of every step point, then its aligned input
        s = (t + t_next) // 2
        a, b = first_order_coefficients(alphas[t], alphas[s])
        midpoint = (a * x.double() + b * eps.double()).float()
        block = slice(2 * n * i, 2 * n * (i + 1))
        torch.testing.assert_close(traj.calib.x[block][:n], x, atol=1e-5, rtol=0)
        torch.testing.assert_close(traj.aligned.x[block][:n], midpoint, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(traj.aligned.x[block][n:], midpoint, atol=1e-4, rtol=1e-4)
        assert int(traj.aligned.t[block][0]) == int(s)
        assert traj.aligned.labels[block].tolist() == [0, 1, 2, 3, 3, 3]
    # the last step keeps the plain target; the midpoints are calibration rows of their own after the step points
    last = slice(2 * n * (steps - 1), 2 * n * steps)
    torch.testing.assert_close(traj.aligned.x[last], traj.calib.x[last])
    assert len(traj.calib) == 2 * n * (steps + steps - 1)
    torch.testing.assert_close(traj.calib.x[2 * n * steps :], traj.aligned.x[2 * n * steps :])


def test_singlestep_aligns_to_the_solvers_own_intermediate_point(model: torch.nn.Module) -> None:
    denoiser = Denoiser.from_model(model, META)
    steps, n = 6, 2
    traj = collect_trajectory(denoiser, CONFIG, "dpm++2s", steps, n_per_step=n, guidance=1.0, labels=(0, 1))
    calls = _by_hand(
        denoiser, "DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, steps, n, 1.0
    )
    # intervals (0, 1 → 2), (2, 3 → 4), (4 → 5), (5): step points 0, 2, 4, 5
    for row, (start, mid) in enumerate([(0, 1), (2, 3)]):
        rows = slice(row * n, (row + 1) * n)
        torch.testing.assert_close(traj.calib.x[rows], calls[start][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(traj.aligned.x[rows], calls[mid][0], atol=1e-5, rtol=0)
        assert int(traj.aligned.t[rows][0]) == calls[mid][1]
    alphas = diffusers.DDPMScheduler.from_config(CONFIG).alphas_cumprod.double()
    a, b = first_order_coefficients(alphas[calls[0][1]], alphas[calls[2][1]])
    landed = a * traj.x[:n].double() + b * traj.direction[:n].double()
    torch.testing.assert_close(landed.float(), calls[2][0], atol=1e-4, rtol=1e-4)


def test_singlestep_first_order_tail_keeps_the_plain_target(model: torch.nn.Module) -> None:
    """Singlestep DPM-Solver++ ends with first-order steps (orders … 1 1): their direction is their own ε, so the
    aligned row is the step point itself and no midpoint row is added."""
    denoiser = Denoiser.from_model(model, META)
    steps, n = 6, 2  # intervals (0, 1 → 2), (2, 3 → 4), (4 → 5), (5)
    traj = collect_trajectory(denoiser, CONFIG, "dpm++2s", steps, n_per_step=n, guidance=1.0, labels=(0, 1))
    tail = slice(2 * n, 3 * n)
    torch.testing.assert_close(traj.aligned.x[tail], traj.calib.x[tail])
    assert len(traj.calib) == n * (4 + 2)  # 4 step points + the 2 solver intermediates, no constructed midpoint


def test_v_prediction_is_refused(model: torch.nn.Module) -> None:
    config = dict(CONFIG, prediction_type="v_prediction")
    with pytest.raises(ConfigError, match="ε-prediction"):
        collect_trajectory(Denoiser.from_model(model, META), config, "dpm++2m", 4, n_per_step=1)


def test_first_order_sampler_is_refused_with_the_samplers_that_work() -> None:
    with pytest.raises(ConfigError, match="dpm\\+\\+2m, dpm\\+\\+3m, dpm\\+\\+2s"):
        QuantConfig.from_scheme("w4a8", method="mota", calib_sampler="ddim")
    with pytest.raises(ConfigError, match="all 0"):
        QuantConfig.from_scheme("w4a8", method="mota", calib_sampler="dpm++2m", mota_block=0, mota_align=0,
                                mota_cos=0)


def test_mota_collects_its_own_data(model: torch.nn.Module) -> None:
    calib = CalibrationSet(torch.randn(4, 1, 16, 16), torch.full((4,), 500))
    config = QuantConfig.from_scheme("w8a8", method="mota", calib_sampler="dpm++2m")
    with pytest.raises(ConfigError, match="collects its own calibration data"):
        quantize(Denoiser.from_model(copy.deepcopy(model), META), CONFIG, config, calib=calib)


def test_objective_terms_on_hand_made_tensors() -> None:
    target = torch.tensor([[[[3.0, 4.0]]]])  # one sample, one channel: ‖target‖² = 25
    assert float(cosine_loss(target, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_loss(2 * target, target)) == pytest.approx(0.0, abs=1e-6)  # blind to scale
    # block_loss normalisation: × channels / numel = 1/2; 1 − cos(−t, t) = 2
    assert float(cosine_loss(-target, target)) == pytest.approx(25 * 2 / 2)
    ortho = torch.tensor([[[[4.0, -3.0]]]])
    assert float(cosine_loss(ortho, target)) == pytest.approx(25 * 1 / 2)
    s = ReconstructionSettings(block_weight=2.0, align_weight=3.0, cos_weight=4.0)
    out, plain, aligned = torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2), target
    # block: 2 × (1+1)/2 = 2; align: 3 × (9+16)/2 = 37.5; cos of a zero output counts as 1 − 0 → 4 × 25/2 = 50
    assert float(unit_objective(out, plain, aligned, s)) == pytest.approx(2 + 37.5 + 50)
    assert float(unit_objective(out, plain, None, s)) == pytest.approx(1.0)  # no aligned target: plain only


def test_mota_reconstruction_lowers_the_aligned_loss(model: torch.nn.Module) -> None:
    """Unit by unit, reconstruction toward the higher-order targets (block weight 0, align 1) ends below where
    round-to-nearest left the aligned loss, and never above it."""
    from qdiffuse.calibration.ptq import calibrate_ptq
    from qdiffuse.calibration.reconstruct import reconstruct
    from qdiffuse.nn.rewrite import quantize_model

    fp = copy.deepcopy(model)
    denoiser = Denoiser.from_model(copy.deepcopy(model), META)
    traj = collect_trajectory(denoiser, CONFIG, "dpm++2m", 6, n_per_step=4, guidance=2.0)
    config = QuantConfig.from_scheme("w4a8", method="mota", calib_sampler="dpm++2m", outliers="off")
    quantize_model(denoiser.model, config)
    calibrate_ptq(denoiser, traj.calib, 64)
    settings = ReconstructionSettings(
        iters=60, act_iters=20, max_samples=48, block_weight=0.0, align_weight=1.0, cos_weight=0.1
    )
    results = reconstruct(fp, denoiser, traj.calib, settings, traj.aligned)
    assert all(r.loss <= r.loss_rtn for r in results)
    assert sum(r.loss for r in results) < 0.99 * sum(r.loss_rtn for r in results)


def test_plan_is_decided_on_the_standard_set_unless_asked(model: torch.nn.Module) -> None:
    """By default ``mota`` decides outlier treatments, guard and ranges on qdiffusion's schedule-wide rows: with
    no reconstruction iterations the two methods give the same model, bit for bit. ``mota_plan_data='trajectory'``
    decides them on the solver's own rows instead (only the timesteps it visits)."""
    from qdiffuse.api import quant_state

    common = dict(calib_steps=4, calib_per_step=2, recon_iters=0, recon_act_iters=0, guard_db=0.5)
    qdiff = quantize(Denoiser.from_model(copy.deepcopy(model), META), CONFIG,
                     QuantConfig.from_scheme("w4a8", method="qdiffusion", **common), guidance=2.0, runtime="simulated")
    mota_config = dict(common, calib_sampler="dpm++2m", calib_num_inference_steps=4, recon_output_iters=0)
    mota = quantize(Denoiser.from_model(copy.deepcopy(model), META), CONFIG,
                    QuantConfig.from_scheme("w4a8", method="mota", **mota_config), guidance=2.0, runtime="simulated")
    q_info, m_info = quant_state(qdiff).calibration, quant_state(mota).calibration
    assert m_info["timesteps"] == q_info["timesteps"] and len(m_info["timesteps"]) == 4
    assert m_info["mota"]["plan_data"] == "standard" and m_info["mota"]["rows"] > m_info["inputs"]
    assert m_info.get("guard") == q_info.get("guard") and m_info.get("outliers") == q_info.get("outliers")
    q_state, m_state = qdiff.state_dict(), mota.state_dict()
    assert q_state.keys() == m_state.keys()
    for key, value in q_state.items():
        assert torch.equal(value, m_state[key]), key
    own = quantize(Denoiser.from_model(copy.deepcopy(model), META), CONFIG,
                   QuantConfig.from_scheme("w4a8", method="mota", mota_plan_data="trajectory", **mota_config),
                   guidance=2.0, runtime="simulated")
    solver_steps = {int(t) for t in solver_intervals("dpm++2m", CONFIG, 4)[1]}
    assert set(quant_state(own).calibration["timesteps"]) >= solver_steps
    with pytest.raises(ConfigError, match="--mota-plan-data 'mixed' unknown"):
        QuantConfig.from_scheme("w4a8", method="mota", calib_sampler="dpm++2m", mota_plan_data="mixed")
