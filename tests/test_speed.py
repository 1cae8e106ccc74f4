"""``qdiffuse speed`` end to end on the shipped ``fmnist-tiny``, fast settings only: the rows it produces, their
memory accounting, the settings it refuses, and the CLI command writing its JSON. Timings are never asserted
(the test machine is shared); only that they exist and are positive."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qdiffuse import cli, speed
from qdiffuse.errors import ConfigError
from qdiffuse.kernels.cpu_int8 import has_vnni
from qdiffuse.speed import SpeedSettings, parse_int_list, run_speed

FAST = {"models": ("fmnist-tiny",), "schemes": ("w8a8",), "batches": (1,), "repeats": 1, "warmup": 0}


@pytest.fixture(scope="module")
def tiny_result() -> speed.SpeedResult:
    """One fast run, peers reported as not installed whatever this environment has (no peer timing here)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(speed, "_peer_installed", lambda name: False)
    try:
        return run_speed(SpeedSettings(**FAST, peers=True))
    finally:
        mp.undo()


def test_rows_cover_every_runtime_with_their_fields(tiny_result: speed.SpeedResult) -> None:
    runtimes = [r.runtime for r in tiny_result.rows]
    assert runtimes[0] == "fp32 (start)" and runtimes[-1] == "fp32 (end)"
    for expected in ("bf16", "w8a8 simulated", "w8a8"):
        assert expected in runtimes
    timed = [r for r in tiny_result.rows if r.status == "ok"]
    for row in timed:
        assert row.model == "fmnist-tiny" and row.batch == 1
        assert row.median_ms is not None and row.median_ms > 0 and len(row.times_ms) == 1
        assert row.speedup_vs_fp32 is not None and row.speedup_vs_fp32 > 0
        assert row.speedup_vs_bf16 is not None and row.weight_bytes and row.weight_ratio_vs_fp32
        assert row.grad_mode == "inference_mode"
    real = next(r for r in timed if r.runtime == "w8a8")
    w8_kernel = "onednn-int8" if has_vnni() else "dequant-fallback"  # oneDNN's 8-bit sums need VNNI
    assert real.detail.startswith("runtime: real") and w8_kernel in real.detail
    assert next(r for r in timed if r.runtime == "w8a8 simulated").detail.startswith("runtime: simulated")
    peers = [r for r in tiny_result.rows if r.status != "ok"]
    assert peers and all(r.status == "not installed" and r.median_ms is None for r in peers)


def test_quantized_weights_take_less_memory_than_fp32(tiny_result: speed.SpeedResult) -> None:
    by = {r.runtime: r for r in tiny_result.rows}
    fp32 = by["fp32 (start)"].weight_bytes
    assert by["fp32 (end)"].weight_bytes == fp32
    assert by["bf16"].weight_bytes < fp32
    assert by["w8a8"].weight_bytes < 0.5 * fp32
    assert by["w8a8 simulated"].weight_bytes >= fp32  # float weights plus quantizer state


def test_markdown_has_a_row_per_measurement(tiny_result: speed.SpeedResult) -> None:
    text = tiny_result.markdown()
    table = [line for line in text.splitlines() if line.startswith("| fmnist-tiny |")]
    assert len(table) == len(tiny_result.rows)
    assert "FP32 start → end" in text and "not installed" in text


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"models": ("sd-2000",)}, "unknown model 'sd-2000'"),
        ({"schemes": ("w9a9",)}, "unknown scheme 'w9a9'"),
        ({"batches": (0,)}, "positive integers"),
        ({"repeats": 0}, "--repeats 0"),
        ({"schemes": ("w8a8",), "simulated": "w4a8"}, "--simulated 'w4a8'"),
    ],
)
def test_bad_settings_are_config_errors(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        SpeedSettings(**{**FAST, **kwargs})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["0", "1,-8", "1,x", ""])
def test_bad_batch_lists_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="--batch"):
        parse_int_list(text, "--batch")


def test_cli_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    args = ["speed", "fmnist-tiny", "--schemes", "w8a16", "--batch", "1", "--repeats", "1", "--warmup", "0",
            "--simulated", "none", "--no-peers", "--json", str(out), "--quiet"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "| fmnist-tiny | w8a16 | 1 |" in result.output
    data = json.loads(out.read_text())
    assert [r["runtime"] for r in data["rows"]] == ["fp32 (start)", "bf16", "w8a16", "fp32 (end)"]
    assert data["settings"]["schemes"] == ["w8a16"] and data["environment"]["threads"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name != "speed.json"]  # no temporary file left


def test_cli_bad_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["qdiffuse", "speed", "fmnist-tiny", "--batch", "1,0", "--json", str(out)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["error: --batch '1,0' needs positive integers like '1,8,64'"]
    assert not out.exists()
