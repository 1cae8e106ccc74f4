"""The benchmark harness end to end on a tiny 32x32 class-conditional UNet: cells, resume, tables."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import UNet2DModel
from tiny_models import save_folder

from qdiffuse.bench import Bench, BenchConfig
from qdiffuse.progress import set_progress_enabled


def tiny_32(root: Path) -> Path:
    model = UNet2DModel(
        sample_size=32,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=11,
    )
    return save_folder(model, root, {"num_classes": 10, "null_class": 10})


TINY_CALIB = {"calib_steps": 2, "calib_per_step": 4, "calib_num_inference_steps": 3}


def write_config(path: Path, model: Path, quant: list[dict], eta: float, num: int, **extra: object) -> Path:
    """A 3-step DDIM grid on ``model`` with tiny calibration, written to ``path``."""
    config = {
        "name": "test",
        "models": [str(model)],
        "samplers": [{"sampler": "ddim", "steps": 3, "eta": eta}],
        "quant": quant,
        "num": num,
        "batch_size": num,
        "analysis_num": 4,
        "calib": TINY_CALIB,
        **extra,
    }
    path.write_text(json.dumps(config))
    return path


def test_bench_runs_cells_and_resumes(tmp_path: Path) -> None:
    set_progress_enabled(False)
    model = tiny_32(tmp_path / "model")
    quant = [{"scheme": "w8a8", "method": "minmax"}, {"scheme": "w4a8", "method": "ptqd"}]
    config_path = write_config(tmp_path / "bench.json", model, quant, eta=0.0, num=12, guidance=2.0)
    out = tmp_path / "run"
    rows = Bench(BenchConfig.load(config_path), out).run()
    assert [r["quant"] for r in rows] == ["FP", "w8a8-minmax", "w4a8-ptqd"]
    for row in rows:
        assert row["num"] == 12 and row["fid"] >= 0
    assert rows[1]["psnr_to_fp"] > 0 and rows[2]["bops_reduction"] > 1
    assert rows[1]["calibration_seconds"] > 0 and rows[1]["calibration_peak_mib"] > 0
    table = (out / "results.md").read_text()
    assert "w4a8-ptqd" in table
    cells = sorted((out / "cells").glob("*.json"))
    assert len(cells) == 3
    stamp = {p: p.stat().st_mtime_ns for p in cells}
    rerun = Bench(BenchConfig.load(config_path), out).run()
    assert rerun == rows
    assert {p: p.stat().st_mtime_ns for p in cells} == stamp  # finished cells are not recomputed


def test_bad_bench_config_is_a_one_line_error(tmp_path: Path) -> None:
    import pytest

    from qdiffuse.errors import ConfigError

    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(ConfigError, match="malformed"):
        BenchConfig.load(tmp_path / "b.json")
    with pytest.raises(ConfigError, match="does not exist"):
        BenchConfig.load(tmp_path / "missing.json")


def test_unusable_bench_folder_is_a_one_line_error(tmp_path: Path) -> None:
    import pytest

    from qdiffuse.bench import SamplerSetting
    from qdiffuse.errors import OutputError

    config = BenchConfig(name="b", models=["m"], samplers=[SamplerSetting("ddim", 3)], quant=[])
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputError, match="is a file"):
        Bench(config, tmp_path / "file")
    with pytest.raises(OutputError, match="cannot create the bench folder"):
        Bench(config, tmp_path / "file" / "run")
    assert (tmp_path / "file").read_text() == "mine"


def test_per_setting_config_and_reconstruction_with_ptqd(tmp_path: Path) -> None:
    """A setting's own QuantConfig fields get their own model folder; qdiffusion+ptqd stores noise statistics."""
    set_progress_enabled(False)
    model = tiny_32(tmp_path / "model")
    fast = {"recon_iters": 2, "recon_act_iters": 1, "recon_batch_size": 4}
    no_rounding = {**fast, "recon_iters": 0}
    quant = [
        {"scheme": "w4a8", "method": "qdiffusion+ptqd", "label": "w4a8-qp-it2", "config": fast},
        {"scheme": "w4a8", "method": "qdiffusion", "label": "w4a8-q-it0", "config": no_rounding},
        {"scheme": "w4a8", "method": "mse"},
        {"scheme": "w4a8", "method": "mse", "label": "w4a8-mse-corrected", "correct_noise": True},
    ]
    config_path = write_config(tmp_path / "bench.json", model, quant, eta=1.0, num=8)
    out = tmp_path / "run"
    rows = Bench(BenchConfig.load(config_path), out).run()
    assert [r["quant"] for r in rows] == ["FP", "w4a8-qp-it2", "w4a8-q-it0", "w4a8-mse", "w4a8-mse-corrected"]
    with_ptqd, plain = out / "models" / "model__w4a8-qp-it2", out / "models" / "model__w4a8-q-it0"
    assert list((with_ptqd / "noise").glob("ddim-3-eta1*.json")) and not (plain / "noise").exists()
    # correct_noise shares the mse model, adds its statistics and samples differently from the same noise
    assert sorted(p.name for p in (out / "models").iterdir() if p.is_dir()) == [
        "model__w4a8-mse",
        "model__w4a8-q-it0",
        "model__w4a8-qp-it2",
    ]
    assert list((out / "models" / "model__w4a8-mse" / "noise").glob("ddim-3-eta1*.json"))
    assert rows[3]["calibration_seconds"] == rows[4]["calibration_seconds"]
    assert rows[3]["psnr_to_fp"] != rows[4]["psnr_to_fp"]
    manifests = [json.loads((f / "quantization.json").read_text()) for f in (with_ptqd, plain)]
    assert [m["config"]["recon_iters"] for m in manifests] == [2, 0]


def test_a_setting_may_sample_another_settings_model(tmp_path: Path) -> None:
    """``model`` names the labelled setting whose calibration is reused: one folder, its settings taken over, and
    PTQD's correction on top samples differently from the same noise."""
    set_progress_enabled(False)
    model = tiny_32(tmp_path / "model")
    fast = {"recon_iters": 0, "recon_act_iters": 1, "recon_batch_size": 4}
    quant = [
        {"scheme": "w4a8", "method": "qdiffusion", "label": "q-it0", "config": fast},
        {"scheme": "w4a8", "method": "qdiffusion", "label": "q-it0+ptqd", "model": "q-it0", "correct_noise": True},
    ]
    config = BenchConfig.load(write_config(tmp_path / "bench.json", model, quant, eta=0.0, num=8))
    assert config.quant_config(config.quant[1]) == config.quant_config(config.quant[0])
    out = tmp_path / "run"
    rows = Bench(config, out).run()
    assert sorted(p.name for p in (out / "models").iterdir() if p.is_dir()) == ["model__q-it0"]
    assert list((out / "models" / "model__q-it0" / "noise").glob("ddim-3-eta0*.json"))
    assert rows[1]["calibration_seconds"] == rows[2]["calibration_seconds"]
    assert rows[1]["psnr_to_fp"] != rows[2]["psnr_to_fp"]


def test_a_shared_model_must_be_a_labelled_setting_with_the_same_calibration(tmp_path: Path) -> None:
    import pytest

    from qdiffuse.errors import ConfigError

    base = {"name": "b", "models": ["m"], "samplers": [{"sampler": "ddim", "steps": 3}]}
    owner = {"scheme": "w4a8", "method": "qdiffusion", "label": "q", "config": {"recon_iters": 5}}
    for sharer, match in (
        ({"scheme": "w4a8", "method": "qdiffusion", "label": "s", "model": "nope"}, "not the label"),
        ({"scheme": "w4a4", "method": "qdiffusion", "label": "s", "model": "q"}, "scheme, method or config"),
        (
            {"scheme": "w4a8", "method": "qdiffusion", "label": "s", "model": "q", "config": {"recon_iters": 6}},
            "scheme, method or config",
        ),
    ):
        (tmp_path / "b.json").write_text(json.dumps({**base, "quant": [owner, sharer]}))
        with pytest.raises(ConfigError, match=match):
            BenchConfig.load(tmp_path / "b.json")


def test_per_setting_config_is_checked(tmp_path: Path) -> None:
    import pytest

    from qdiffuse.errors import ConfigError

    base = {"name": "b", "models": ["m"], "samplers": [{"sampler": "ddim", "steps": 3}]}
    for quant, match in (
        ({"scheme": "w4a8", "method": "qdiffusion", "config": {"recon_iters": 5}}, "needs a 'label'"),
        ({"scheme": "w4a8", "method": "mse", "label": "x", "config": {"recon_iter": 5}}, "unknown config fields"),
        ({"scheme": "w4-mixed", "method": "ptqd", "snr_margin": 10.0}, "needs a 'label'"),
    ):
        (tmp_path / "b.json").write_text(json.dumps({**base, "quant": [quant]}))
        with pytest.raises(ConfigError, match=match):
            BenchConfig.load(tmp_path / "b.json")
    quant = [{"scheme": "w4a8", "method": "mse"}]
    (tmp_path / "b.json").write_text(json.dumps({**base, "quant": quant, "calib": {"fp_input": []}}))
    with pytest.raises(ConfigError, match="unknown 'calib' fields"):
        BenchConfig.load(tmp_path / "b.json")
    (tmp_path / "b.json").write_text(json.dumps({**base, "quant": quant, "calib": {"fp_inputs": []}}))
    assert BenchConfig.load(tmp_path / "b.json").calib == {"fp_inputs": []}


def test_a_cell_may_set_its_own_calibration_seed(tmp_path: Path) -> None:
    """The grid's seed is every cell's calibration seed unless the cell's config names another (seed repeats of
    one recipe in one grid)."""
    base = {
        "name": "b",
        "models": ["m"],
        "samplers": [{"sampler": "ddim", "steps": 3}],
        "seed": 5,
        "calib": {"recon_iters": 7},
    }
    quant = [
        {"scheme": "w4a8", "method": "qdiffusion", "label": "grid-seed"},
        {"scheme": "w4a8", "method": "qdiffusion", "label": "own-seed", "config": {"seed": 1, "recon_iters": 3}},
    ]
    (tmp_path / "b.json").write_text(json.dumps({**base, "quant": quant}))
    config = BenchConfig.load(tmp_path / "b.json")
    grid, own = (config.quant_config(q) for q in config.quant)
    assert (grid.seed, grid.recon_iters) == (5, 7)
    assert (own.seed, own.recon_iters) == (1, 3)


def _count_samples(monkeypatch, delay: float = 0.0) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Count how often each cell is sampled (by any worker), optionally making every cell slow."""
    import threading
    import time

    counts: dict[str, int] = {}
    lock = threading.Lock()
    original = Bench._samples

    def counted(self, model, setting, quant):  # type: ignore[no-untyped-def]
        with lock:
            key = quant.key if quant else "FP"
            counts[key] = counts.get(key, 0) + 1
        time.sleep(delay)
        return original(self, model, setting, quant)

    monkeypatch.setattr(Bench, "_samples", counted)
    return counts


def test_two_workers_split_the_grid(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Two workers on one folder compute every cell and quantized model once, and agree on the table."""
    import threading

    set_progress_enabled(False)
    counts = _count_samples(monkeypatch, delay=0.3)
    model = tiny_32(tmp_path / "model")
    quant = [{"scheme": "w8a8", "method": "minmax"}, {"scheme": "w4a8", "method": "mse"}]
    config = BenchConfig.load(write_config(tmp_path / "bench.json", model, quant, eta=0.0, num=4))
    out = tmp_path / "run"
    results: list[list[dict]] = []
    workers = [threading.Thread(target=lambda: results.append(Bench(config, out).run())) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert len(results) == 2 and results[0] == results[1]
    assert counts == {"FP": 1, "w8a8-minmax": 1, "w4a8-mse": 1}
    assert [r["quant"] for r in results[0]] == ["FP", "w8a8-minmax", "w4a8-mse"]
    assert all(r["psnr_to_fp"] > 0 for r in results[0][1:])


def test_a_cell_held_elsewhere_is_waited_for_then_taken_over(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """While another worker holds the FP cell, the quantized cell is sampled but waits for the FP samples; when
    the holder lets go without finishing (it was killed), this worker computes the FP cell itself."""
    import threading
    import time

    from qdiffuse.bench import claim

    set_progress_enabled(False)
    counts = _count_samples(monkeypatch)
    model = tiny_32(tmp_path / "model")
    config = BenchConfig.load(
        write_config(tmp_path / "bench.json", model, [{"scheme": "w8a8", "method": "minmax"}], eta=0.0, num=4)
    )
    out = tmp_path / "run"
    bench = Bench(config, out)
    fp_cell = bench._cell_path(str(model), config.samplers[0], None)
    results: list[list[dict]] = []
    with claim(fp_cell.with_name(f".{fp_cell.stem}.lock")):
        worker = threading.Thread(target=lambda: results.append(bench.run()))
        worker.start()
        deadline = time.monotonic() + 120
        while "w8a8-minmax" not in counts and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert counts == {"w8a8-minmax": 1} and worker.is_alive() and not fp_cell.exists()
    worker.join(timeout=300)
    assert counts == {"w8a8-minmax": 1, "FP": 1}
    assert [r["quant"] for r in results[0]] == ["FP", "w8a8-minmax"] and results[0][1]["psnr_to_fp"] > 0


def test_shipped_configs_name_valid_schemes_methods_and_samplers() -> None:
    """Every config in benchmarks/ loads and every cell's quantization config can be built, so a typo fails here,
    not hours into a grid."""
    import json

    from qdiffuse.config import QuantConfig
    from qdiffuse.pipelines.bench import PipelineBenchConfig
    from qdiffuse.sampling.schedulers import SAMPLERS

    configs = sorted((Path(__file__).parents[1] / "benchmarks").glob("*.json"))
    assert configs
    for path in configs:
        if isinstance(json.loads(path.read_text()).get("model"), str):  # a grid over one pipeline
            pipeline = PipelineBenchConfig.from_json(path)
            for sampler, _steps in pipeline.samplers:
                assert sampler is None or sampler in SAMPLERS, path
            for entry in pipeline.quant:
                options = {
                    k: v
                    for k, v in (entry[2] if len(entry) > 2 else {}).items()
                    if k not in ("label", "keep_8bit_extra")
                }
                QuantConfig.from_scheme(entry[0], method=entry[1], **{**pipeline.extra, **options})
            continue
        config = BenchConfig.load(path)
        assert config.name == path.stem, path
        for sampler in config.samplers:
            assert sampler.sampler in SAMPLERS, path
        for quant in config.quant:
            QuantConfig.from_scheme(quant.scheme, method=quant.method, **{**config.calib, **quant.config})
