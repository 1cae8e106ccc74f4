"""The pieces that keep a user's files and time safe: output kinds and --overwrite, the number checks, one-line
errors for a full disk and a bad schedule, and progress lines in logs."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import numpy as np
import pytest

from qdiffuse import progress
from qdiffuse.bench import BenchConfig
from qdiffuse.config import QuantConfig
from qdiffuse.errors import ConfigError, OutputError
from qdiffuse.fsutil import (
    MARKER,
    PNG,
    QUANTIZED_FOLDER,
    SAMPLES,
    atomic_dir,
    atomic_file,
    check_output_path,
)
from qdiffuse.imageio import save_grid, save_samples
from qdiffuse.sampling.loop import SampleRequest
from qdiffuse.sampling.schedulers import check_schedule, make_scheduler
from qdiffuse.validate import check_number


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------- output kinds


def test_overwrite_never_replaces_a_folder_of_user_files(tmp_path: Path) -> None:
    user = tmp_path / "mine"
    user.mkdir()
    for i in range(20):
        (user / f"f{i}.txt").write_text(str(i))
    before = _snapshot(user)
    with pytest.raises(OutputError, match="not a quantized model folder qdiffuse wrote"):
        with atomic_dir(user, overwrite=True, kind=QUANTIZED_FOLDER):
            pass
    with pytest.raises(OutputError, match="does not end in .npz"):
        save_samples(user, np.zeros((1, 2, 2, 1), np.uint8), None, overwrite=True)
    assert _snapshot(user) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary left


def test_overwrite_replaces_its_own_kind_and_an_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "q"
    with atomic_dir(out, kind=QUANTIZED_FOLDER) as tmp:
        (tmp / "a").write_text("1")
    assert (out / MARKER).read_text().strip() == QUANTIZED_FOLDER.name
    with atomic_dir(out, overwrite=True, kind=QUANTIZED_FOLDER) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "b"])
    legacy = tmp_path / "old"  # written before the marker existed: recognised by its manifest
    legacy.mkdir()
    (legacy / "quantization.json").write_text("{}")
    check_output_path(legacy, True, QUANTIZED_FOLDER)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output_path(empty, True, QUANTIZED_FOLDER)
    # a folder of another kind is not this kind, even with --overwrite
    other = tmp_path / "report"
    other.mkdir()
    (other / MARKER).write_text("report folder\n")
    with pytest.raises(OutputError, match="not a quantized model folder"):
        check_output_path(other, True, QUANTIZED_FOLDER)


def test_files_are_replaced_only_by_their_kind(tmp_path: Path) -> None:
    npz = tmp_path / "s.npz"
    save_samples(npz, np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 1]))
    save_samples(npz, np.ones((2, 4, 4, 1), np.uint8), None, overwrite=True)
    with np.load(npz) as f:
        assert f["arr_0"].max() == 1
    foreign = tmp_path / "other.npz"
    np.savez(foreign, weights=np.zeros(3))
    data = foreign.read_bytes()
    with pytest.raises(OutputError, match="not a samples .npz"):
        save_samples(foreign, np.zeros((1, 4, 4, 1), np.uint8), None, overwrite=True)
    assert foreign.read_bytes() == data
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(OutputError, match="not a PNG image"):
        save_grid(text, np.zeros((1, 4, 4, 1), np.uint8), overwrite=True)
    assert text.read_text() == "not an image"
    with pytest.raises(OutputError, match="does not end in .png"):
        check_output_path(tmp_path / "grid.jpg", False, PNG)


def test_the_input_is_never_an_output(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "config.json").write_text("{}")
    before = _snapshot(model)
    for out in (model, model / "inside", tmp_path):
        with pytest.raises(OutputError, match="overlaps"):
            check_output_path(out, True, QUANTIZED_FOLDER, inputs=[model])
    check_output_path(tmp_path / "in.npz", True, SAMPLES, inputs=[tmp_path / "none"])  # absent inputs: names
    (tmp_path / "in.npz").write_bytes(b"x")
    with pytest.raises(OutputError, match="overlaps"):
        check_output_path(tmp_path / "in.npz", True, SAMPLES, inputs=[tmp_path / "in.npz"])
    assert _snapshot(model) == before


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, code: int) -> None:
    out = tmp_path / "q"
    with pytest.raises(OutputError) as exc:
        with atomic_dir(out, kind=QUANTIZED_FOLDER) as tmp:
            (tmp / "part").write_text("half")
            raise OSError(code, "No space left on device")
    assert "no space left" in str(exc.value) and "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError, match="no space left"):
        with atomic_file(tmp_path / "s.npz", kind=SAMPLES):
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "value, kwargs, fragment",
    [
        (float("nan"), {}, "finite"),
        (float("inf"), {"low": 0}, "finite"),
        (-1, {"low": 0}, ">= 0"),
        (0, {"low": 0, "low_open": True}, "> 0"),
        (5, {"low": 0, "high": 1}, "<= 1"),
        (1.5, {"integer": True}, "whole number"),
        ("3", {}, "not a number"),
    ],
)
def test_check_number_rejects(value: object, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as exc:
        check_number(value, "--x", **kwargs)  # type: ignore[arg-type]
    assert str(exc.value).startswith("--x") and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"num": 10**12}, "--num"),
        ({"num": 1, "eta": 5.0}, "--eta 5"),
        ({"num": 1, "eta": float("nan")}, "--eta nan"),
        ({"num": 1, "guidance": float("nan")}, "--guidance nan"),
        ({"num": 1, "guidance": float("inf")}, "--guidance inf"),
        ({"num": 1, "guidance": -1.0}, "--guidance -1"),
        ({"num": 1, "seed": -1}, "--seed -1"),
        ({"num": 1, "seed": 2**40}, "--seed"),
        ({"num": 1, "steps": 0}, "--steps 0"),
        ({"num": 1, "batch_size": 0}, "--batch-size 0"),
    ],
)
def test_sample_request_checks_every_number(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("+", r"\+")):
        SampleRequest(**kwargs)


def test_a_huge_num_fails_before_any_work() -> None:
    request = SampleRequest(num=10**8)
    with pytest.raises(ConfigError, match="GiB"):
        request.check_fits((3, 512, 512))
    SampleRequest(num=64).check_fits((3, 512, 512))


@pytest.mark.parametrize(
    "field, value",
    [
        ("recon_lr_round", float("inf")),
        ("recon_lr_round", float("nan")),
        ("guard_db", float("nan")),
        ("recon_warmup", float("nan")),
        ("recon_beta", (20.0, float("inf"))),
        ("seed", -3),
        ("calib_steps", 10**6),
    ],
)
def test_quant_config_checks_every_number(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as exc:
        QuantConfig.from_scheme("w8a8", **{field: value})
    assert "\n" not in str(exc.value)


def test_unknown_beta_schedule_is_one_line() -> None:
    config = {"num_train_timesteps": 1000, "beta_schedule": "cosine"}
    for call in (lambda: check_schedule(config), lambda: make_scheduler("dpm++2m", config)):
        with pytest.raises(ConfigError, match="beta_schedule") as exc:
            call()
        assert "\n" not in str(exc.value)
    check_schedule({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"})


def test_bench_config_is_checked_when_read(tmp_path: Path) -> None:
    base = {
        "name": "t",
        "models": ["fmnist-tiny"],
        "samplers": [{"sampler": "ddim", "steps": 2}],
        "quant": [{"scheme": "w8a8", "method": "minmax"}],
        "num": 8,
    }
    import json

    cases = {
        "unknown key": ({**base, "typo": 1}, "unknown keys"),
        "two samples": ({**base, "num": 2}, "too few"),
        "bad quant key": ({**base, "quant": [{"scheme": "w8a8", "method": "minmax", "x": 1}]}, "unexpected"),
        "nan guidance": ({**base, "guidance": float("nan")}, "--guidance"),
        "bad sampler": ({**base, "samplers": [{"sampler": "heun", "steps": 2}]}, "heun"),
        "eta 5": ({**base, "samplers": [{"sampler": "ddim", "steps": 2, "eta": 5}]}, "--eta"),
        "not an object": ([1, 2], "malformed"),
    }
    for name, (data, fragment) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        with pytest.raises(ConfigError, match=fragment) as exc:
            BenchConfig.load(path)
        assert "\n" not in str(exc.value), name
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(base))
    assert BenchConfig.load(path).num == 8


# ---------------------------------------------------------------------------------------- progress


def test_progress_prints_plain_lines_when_stderr_is_not_a_terminal(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "_enabled", True)
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    with progress.progress_bar("sampling", 4) as bar:
        for _ in range(4):
            bar.advance()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("sampling: 1/4 (") and "left" in lines[0]
    assert lines[-1].startswith("sampling: 4/4 (") and "left" not in lines[-1]
    assert len(lines) == 4
    monkeypatch.setattr(progress, "LOG_INTERVAL", math.inf)
    with progress.progress_bar("calibration", 100) as bar:
        for _ in range(100):
            bar.advance()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("calibration: 100/100 (")  # only the final line
