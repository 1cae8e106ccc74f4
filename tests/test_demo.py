"""The main job end to end: demo report, grids and quantized folders, on a tiny model and on the built-in one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_bench import tiny_32

from qdiffuse.demo import run_demo
from qdiffuse.errors import OutputError
from qdiffuse.models import builtin
from qdiffuse.progress import set_progress_enabled

SMALL_CALIB = {"calib_steps": 2, "calib_per_step": 4, "calib_num_inference_steps": 3}


def test_demo_writes_report_grids_and_models(tmp_path: Path) -> None:
    set_progress_enabled(False)
    model = tiny_32(tmp_path / "model")
    report = run_demo(tmp_path / "demo", model=str(model), num=8, steps=3, calib=SMALL_CALIB, analysis_num=4)
    text = report.read_text()
    for name in ("FP", "w8a8-minmax", "w4a8-mse", "w4a8-ptqd"):
        assert f"| {name} |" in text
    for grid in ("fp.png", "w8a8-minmax.png", "w4a8-mse.png", "w4a8-ptqd.png"):
        assert (tmp_path / "demo" / grid).stat().st_size > 0
    rows = json.loads((tmp_path / "demo" / "report.json").read_text())["rows"]
    assert rows[0]["quant"] == "FP" and all(r["fid"] >= 0 for r in rows)
    assert (tmp_path / "demo" / "bench" / "models" / "model__w4a8-ptqd" / "noise").is_dir()
    with pytest.raises(OutputError):
        run_demo(tmp_path / "demo", model=str(model), num=8, steps=3, calib=SMALL_CALIB)


@pytest.mark.skipif("fmnist-tiny" not in builtin.list_builtin(), reason="fmnist-tiny is not shipped")
def test_demo_on_the_builtin_model(tmp_path: Path) -> None:
    set_progress_enabled(False)
    report = run_demo(
        tmp_path / "demo", num=10, steps=4, runs=(("w8a8", "minmax"),), calib=SMALL_CALIB, analysis_num=4
    )
    rows = json.loads((tmp_path / "demo" / "report.json").read_text())["rows"]
    assert [r["quant"] for r in rows] == ["FP", "w8a8-minmax"]
    assert rows[1]["psnr_to_fp"] > 15  # W8A8 follows the FP samples closely
    assert "fmnist-tiny" in report.read_text()
    assert rows[1]["runtime"].startswith("runtime: real, ")  # the demo samples on the kernels
    assert "- w8a8-minmax: runtime: real, " in report.read_text()
