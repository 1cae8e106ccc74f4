"""Range observers: shapes by granularity, accumulation, clipping behaviour and error handling."""

import pytest
import torch

from qdiffuse.errors import ConfigError, DataError
from qdiffuse.formats import FormatSpec, fake_quantize, group_view, nvfp4_global_scale
from qdiffuse.observers import (
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)

INT8 = FormatSpec(kind="int", bits=8)
NAMES = ["minmax", "percentile", "mse"]


def lp_error(x: torch.Tensor, xq: torch.Tensor, dims: tuple[int, ...], p: float = 2.4) -> torch.Tensor:
    return (x - xq).abs().pow(p).mean(dim=dims)


def test_minmax_accumulates_over_calls() -> None:
    obs = MinMaxObserver(INT8)
    obs.update(torch.tensor([-1.0, 2.0]))
    obs.update(torch.tensor([[0.5, -3.0], [1.0, 0.0]]))
    xmin, xmax = obs.compute_range()
    assert xmin.shape == () and (xmin.item(), xmax.item()) == (-3.0, 2.0)
    scale, zp = obs.compute_qparams()
    assert scale.item() == pytest.approx(3 / 127) and zp.item() == 0.0
    assert obs.calls == 2


def test_minmax_per_channel_shape() -> None:
    w = torch.randn(6, 3, 3, 3)
    spec = FormatSpec(kind="int", bits=4, symmetric=False, granularity="channel")
    obs = MinMaxObserver(spec)
    obs.update(w)
    xmin, xmax = obs.compute_range()
    assert xmin.shape == (6, 1, 1, 1)
    assert torch.equal(xmin.flatten(), w.amin(dim=(1, 2, 3)))
    assert torch.equal(xmax.flatten(), w.amax(dim=(1, 2, 3)))
    scale, zp = obs.compute_qparams()
    out = fake_quantize(w, spec, scale, zp)
    assert out.shape == w.shape
    assert ((out - w).abs() <= scale / 2 + 1e-6).all()


def test_minmax_per_group_shape() -> None:
    w = torch.randn(4, 10)
    spec = FormatSpec(kind="int", bits=4, granularity="group", group_size=4)
    obs = MinMaxObserver(spec)
    obs.update(w)
    xmin, xmax = obs.compute_range()
    gv = group_view(w, 4)
    assert xmin.shape == (4, 3, 1)
    assert torch.equal(xmin, gv.amin(-1, keepdim=True)) and torch.equal(xmax, gv.amax(-1, keepdim=True))
    scale, zp = obs.compute_qparams()
    assert fake_quantize(w, spec, scale, zp).shape == w.shape


def test_qparams_by_kind() -> None:
    x = torch.tensor([-896.0, 10.0])
    for kind, expected in [("fp8_e4m3", 2.0), ("fp8_e5m2", 896.0 / 57344.0)]:
        obs = MinMaxObserver(FormatSpec(kind=kind))
        obs.update(x)
        scale, zp = obs.compute_qparams()
        assert zp is None and scale.item() == pytest.approx(expected)
    obs = MinMaxObserver(FormatSpec(kind="nvfp4", granularity="channel"))  # block formats: per tensor
    obs.update(x.reshape(2, 1))
    scale, zp = obs.compute_qparams()
    assert zp is None and scale.shape == () and scale.item() == nvfp4_global_scale(torch.tensor(896.0)).item()
    obs = MinMaxObserver(FormatSpec(kind="mxfp4"))
    obs.update(x)
    scale, zp = obs.compute_qparams()
    assert zp is None and scale.item() == 1.0


@pytest.mark.parametrize("name", NAMES)
def test_errors_before_update_and_on_bad_data(name: str) -> None:
    obs = make_observer(name, INT8)
    with pytest.raises(DataError):
        obs.compute_range()
    with pytest.raises(DataError):
        obs.compute_qparams()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(DataError, match="NaN or inf"):
            obs.update(torch.tensor([1.0, bad]))
    with pytest.raises(DataError):
        obs.update(torch.empty(0))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_all_zero_and_constant_tensors(name: str, granularity: str) -> None:
    spec = FormatSpec(kind="int", bits=8, granularity=granularity)
    obs = make_observer(name, spec)
    obs.update(torch.zeros(3, 8))
    scale, zp = obs.compute_qparams()
    assert (scale > 0).all()
    assert torch.equal(fake_quantize(torch.zeros(3, 8), spec, scale, zp), torch.zeros(3, 8))
    obs = make_observer(name, spec)
    const = torch.full((3, 8), 0.5)
    obs.update(const)
    scale, zp = obs.compute_qparams()
    torch.testing.assert_close(fake_quantize(const, spec, scale, zp), const)


def test_channel_count_change_is_an_error() -> None:
    obs = MinMaxObserver(FormatSpec(granularity="channel"))
    obs.update(torch.randn(4, 3))
    with pytest.raises(DataError):
        obs.update(torch.randn(5, 3))


def test_percentile_matches_quantiles_and_clips_outliers() -> None:
    x = torch.arange(101, dtype=torch.float32)
    obs = PercentileObserver(INT8, percentile=99.0)
    obs.update(x)
    xmin, xmax = obs.compute_range()
    assert (xmin.item(), xmax.item()) == (1.0, 99.0)

    y = torch.randn(20000)
    y[123] = 1000.0
    obs = PercentileObserver(INT8, percentile=99.9)
    obs.update(y)
    _, hi = obs.compute_range()
    assert hi.item() == pytest.approx(torch.quantile(y, 0.999).item(), rel=1e-5)
    assert hi.item() < 5.0
    mm = MinMaxObserver(INT8)
    mm.update(y)
    assert mm.compute_range()[1].item() == 1000.0


def test_percentile_per_channel() -> None:
    w = torch.randn(3, 2000)
    w[1, 7] = -500.0
    obs = PercentileObserver(FormatSpec(granularity="channel"), percentile=99.9)
    obs.update(w)
    lo, hi = obs.compute_range()
    assert lo.shape == (3, 1)
    for c in range(3):
        assert lo[c, 0].item() == pytest.approx(torch.quantile(w[c], 0.001).item(), rel=1e-5)
        assert hi[c, 0].item() == pytest.approx(torch.quantile(w[c], 0.999).item(), rel=1e-5)
    assert lo[1, 0].item() > -10.0


def test_percentile_bounded_subsample_is_deterministic() -> None:
    def run() -> PercentileObserver:
        obs = PercentileObserver(INT8, percentile=99.0, max_samples=5000)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            obs.update(torch.rand(4000, generator=gen))
        return obs

    a, b = run(), run()
    assert a._sample.values is not None and a._sample.values.numel() == 5000
    assert torch.equal(a.compute_range()[1], b.compute_range()[1])
    lo, hi = a.compute_range()
    assert lo.item() == pytest.approx(0.01, abs=0.01) and hi.item() == pytest.approx(0.99, abs=0.01)


def _heavy_tailed(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.distributions.StudentT(torch.tensor(2.5)).sample(shape)


@pytest.mark.parametrize(
    "spec",
    [
        FormatSpec(kind="int", bits=4, granularity="channel"),
        FormatSpec(kind="int", bits=4, symmetric=False, granularity="channel"),
        FormatSpec(kind="fp8_e4m3", granularity="channel"),
    ],
    ids=["int4-sym", "int4-asym", "fp8"],
)
def test_mse_beats_minmax_per_channel_on_heavy_tails(spec: FormatSpec) -> None:
    w = _heavy_tailed((16, 512))
    errs = {}
    for obs in (MinMaxObserver(spec), MSEObserver(spec)):
        obs.update(w)
        scale, zp = obs.compute_qparams()
        errs[type(obs).__name__] = lp_error(w, fake_quantize(w, spec, scale, zp), (1,))
    assert (errs["MSEObserver"] <= errs["MinMaxObserver"]).all()
    assert errs["MSEObserver"].mean() < errs["MinMaxObserver"].mean()


def test_mse_per_tensor_laplace_over_batches() -> None:
    spec = FormatSpec(kind="int", bits=4)
    laplace = torch.distributions.Laplace(0.0, 1.0)
    batches = [laplace.sample((2000,)) for _ in range(3)]
    mse, mm = MSEObserver(spec), MinMaxObserver(spec)
    for b in batches:
        mse.update(b)
        mm.update(b)
    x = torch.cat(batches)
    lo, hi = mse.compute_range()
    mlo, mhi = mm.compute_range()
    assert mlo.item() <= lo.item() < 0 < hi.item() <= mhi.item()  # a shrink of the min-max range
    errs = [lp_error(x, fake_quantize(x, spec, *o.compute_qparams()), (0,)) for o in (mse, mm)]
    assert errs[0] < errs[1]


def test_mse_per_group_shape() -> None:
    w = _heavy_tailed((4, 3, 3, 3))
    spec = FormatSpec(kind="int", bits=4, granularity="group", group_size=8)
    obs = MSEObserver(spec, num_candidates=20)
    obs.update(w)
    xmin, xmax = obs.compute_range()
    assert xmin.shape == (4, 4, 1)
    gv = group_view(w, 8)
    assert (xmin >= gv.amin(-1, keepdim=True)).all() and (xmax <= gv.amax(-1, keepdim=True)).all()
    scale, zp = obs.compute_qparams()
    assert fake_quantize(w, spec, scale, zp).shape == w.shape


def test_mse_block_formats_fall_back_to_minmax() -> None:
    x = torch.randn(4, 32)
    obs = MSEObserver(FormatSpec(kind="nvfp4"))
    obs.update(x)
    scale, _ = obs.compute_qparams()
    assert scale.item() == nvfp4_global_scale(x.abs().amax()).item()


def test_make_observer() -> None:
    assert isinstance(make_observer("minmax", INT8), MinMaxObserver)
    obs = make_observer("percentile", INT8, percentile=99.9)
    assert isinstance(obs, PercentileObserver) and obs.percentile == 99.9
    assert isinstance(make_observer("mse", INT8, p=2.0, num_candidates=10), Observer)
    with pytest.raises(ConfigError, match="minmax, percentile, mse"):
        make_observer("kl", INT8)
    with pytest.raises(ConfigError):
        make_observer("minmax", INT8, percentile=99.0)
    with pytest.raises(ConfigError):
        make_observer("percentile", INT8, percentile=10.0)
    with pytest.raises(ConfigError):
        make_observer("mse", INT8, num_candidates=0)
