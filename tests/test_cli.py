"""The command line end to end on tiny model folders, and every user error it must turn into one clean line.

Commands run in-process through ``qdiffuse.cli.main`` (with diffusers' log handler pointed at the captured stderr,
as in a real process); one test runs the real ``python -m qdiffuse.cli`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_folder, tiny_quantized_folder

from qdiffuse import cli, progress
from qdiffuse.io import QUANT_JSON, is_quantized_folder


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


@pytest.fixture
def run(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Result]]:
    """Run ``qdiffuse ARGS`` in-process; uncaught exceptions are reported as Python would (traceback, exit 1)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.get_logger("diffusers")  # make sure its stderr handler exists
    handler = diffusers_logging._default_handler
    old_stream = handler.stream
    was_enabled = progress._enabled

    def _run(*args: object) -> Result:
        capsys.readouterr()
        handler.setStream(sys.stderr)  # what a fresh process does: log to the (captured) stderr
        monkeypatch.setattr(sys, "argv", ["qdiffuse", *map(str, args)])
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # a real process would print the traceback and exit 1
            traceback.print_exc()
            code = 1
        finally:
            handler.setStream(old_stream)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    yield _run
    progress.set_progress_enabled(was_enabled)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def assert_user_error(result: Result, *fragments: str) -> str:
    """Exit 2, no traceback, the message on one line starting with 'error:' (and nothing else on stderr)."""
    assert result.code == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.err_lines
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    assert result.stdout == ""
    return lines[-1]


CALIB = ("--calib-steps", 3, "--calib-per-step", 4, "--calib-inference-steps", 4)


# ------------------------------------------------------------------------------------------------- folders


@pytest.fixture(scope="session")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {kind: tiny_folder(kind, tmp_path_factory) for kind in ("unet", "cond", "dit")}
    out["unet-q"] = tiny_quantized_folder("unet", "w4a8", tmp_path_factory)
    root = tmp_path_factory.mktemp("cli-inputs")
    out["condition"] = root / "condition.safetensors"
    save_file(
        {"encoder_hidden_states": torch.randn(8, 24, generator=torch.Generator().manual_seed(0))}, out["condition"]
    )
    return out


def _copy(folder: Path, dest: Path) -> Path:
    return Path(shutil.copytree(folder, dest))


def _weights(folder: Path) -> Path:
    (path,) = (folder / ("transformer" if (folder / "transformer").is_dir() else "unet")).glob("*.safetensors")
    return path


# -------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    "kind, method",
    [("unet", "minmax"), ("cond", "minmax"), ("dit", "minmax"), ("dit", "mse"), ("dit", "mse+bias")],  # mse: UNet 10 s
)
def test_quantize_sample_info(
    kind: str, method: str, folders: dict[str, Path], tmp_path: Path, run: Callable[..., Result]
) -> None:
    qfolder = tmp_path / "q"
    extra: tuple = ()
    if kind == "unet":  # calibrate and sample with guidance (the null class is 3)
        extra = ("--guidance", 2, "--labels", "0,2")
    elif kind == "cond":
        extra = ("--condition", folders["condition"])
    quantize_input = method == "mse"  # one case checks the flag that quantizes x_t at the first layer too
    # (outlier handling and the guard off there: either may give the x_t input back its FP input, and say so)
    flags = ("--quantize-input", "--outliers", "off", "--guard-db", "0") if quantize_input else ()
    args = ("--scheme", "w4a8", "--method", method, *CALIB, *extra, *flags, "-q")
    res = run("quantize", folders[kind], "--out", qfolder, *args)
    assert res.code == 0, res.stderr
    assert res.stdout.strip() == f"wrote {qfolder} (w4a8, {method})"
    assert is_quantized_folder(qfolder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary folder left behind

    out1, out2, grid = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "grid.png"
    args = ("--num", 3, "--steps", 4, "--seed", 5, *extra, "-q")
    res = run("sample", qfolder, "--out", out1, "--grid", grid, *args)
    assert res.code == 0, res.stderr
    assert res.stderr == ""  # --quiet: no progress, no library warnings
    wrote, runtime = res.stdout.strip().splitlines()
    assert wrote == f"wrote {out1} (3 images)"
    assert runtime.startswith("runtime: real, ")
    assert run("sample", qfolder, "--out", out2, *args).code == 0
    with np.load(out1) as a, np.load(out2) as b:
        arr = a["arr_0"]
        assert arr.dtype == np.uint8 and arr.shape == (3, 16, 16, 1)
        assert np.array_equal(arr, b["arr_0"])  # same seed, same images
        assert arr.std() > 0
        if kind == "cond":
            assert "labels" not in a.files
        else:
            assert a["labels"].dtype == np.int64
            assert a["labels"].tolist() == ([0, 2, 0] if kind == "unet" else [0, 1, 2])
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(grid).shape[:2] == (2 + 2 * 18, 2 + 2 * 18)  # 2x2 tiles of 16 + 2 padding

    res = run("info", qfolder)
    assert res.code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert f"scheme:     w4a8   method: {method}" in lines
    assert any(line.startswith("size:") and "x smaller" in line for line in lines)
    first = "pos_embed.proj" if kind == "dit" else "conv_in"
    first_input = "A:int8-asym-tensor" if quantize_input else "A:fp"
    assert any(line.split() == [first, "W:int8-sym-channel", first_input] for line in lines)
    n_layers = int(next(line for line in lines if line.startswith("layers:")).split()[1])
    assert n_layers == len(lines) - lines.index(next(x for x in lines if x.startswith("layers:"))) - 1


def test_reconstruction_with_ptqd_end_to_end(folders: dict[str, Path], tmp_path: Path, run: Callable) -> None:
    """qdiffusion+ptqd: reconstruction settings reach the manifest, statistics are stored, sampling corrects."""
    qfolder = tmp_path / "q"
    recon = ("--recon-iters", 3, "--recon-act-iters", 2, "--recon-batch-size", 4, "--recon-beta", "10,1")
    res = run(
        "quantize", folders["unet"], "--out", qfolder, "--scheme", "w4a8", "--method", "qdiffusion+ptqd",
        *CALIB, *recon, "--guidance", 2, "--analysis-num", 4, "-q",
    )
    assert res.code == 0, res.stderr
    manifest = json.loads((qfolder / QUANT_JSON).read_text())
    assert manifest["config"]["recon_iters"] == 3 and manifest["config"]["recon_beta"] == [10.0, 1.0]
    assert manifest["calibration"]["reconstruction"]["units"] > 0
    assert list((qfolder / "noise").glob("*.json"))
    args = ("--num", 3, "--steps", 4, "--guidance", 2, "--labels", "0,2", "-q")
    assert run("sample", qfolder, "--out", tmp_path / "c.npz", *args).code == 0
    assert run("sample", qfolder, "--out", tmp_path / "p.npz", "--no-ptqd", *args).code == 0
    with np.load(tmp_path / "c.npz") as corrected, np.load(tmp_path / "p.npz") as plain:
        assert not np.array_equal(corrected["arr_0"], plain["arr_0"])


def test_ill_conditioned_start_is_one_warning_line(folders: dict[str, Path], tmp_path: Path, run: Callable) -> None:
    """A cosine schedule saved with trailing spacing starts DDIM at ᾱ ≈ 0: one ``warning:`` line, still exit 0;
    the DPM-Solver family clips λ there and says nothing."""
    folder = _copy(folders["unet"], tmp_path / "cosine")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    config_path.write_text(json.dumps(config))
    args = ("--num", 2, "--steps", 3, "-q")
    res = run("sample", folder, "--out", tmp_path / "a.npz", "--sampler", "ddim", *args)
    assert res.code == 0, res.stderr
    warned = [line for line in res.err_lines if line.startswith("warning:")]
    assert len(warned) == 1 and "timestep_spacing" in warned[0] and "t = 999" in warned[0]
    res = run("sample", folder, "--out", tmp_path / "b.npz", "--sampler", "dpm++2m", *args)
    assert res.code == 0 and not [line for line in res.err_lines if line.startswith("warning:")], res.stderr


def test_mota_with_ptqd_end_to_end(folders: dict[str, Path], tmp_path: Path, run: Callable) -> None:
    """mota+ptqd on a target solver: the aligned errors and the weights reach the manifest, the noise statistics
    are measured under that solver, and the folder samples with it."""
    qfolder = tmp_path / "q"
    res = run(
        "quantize", folders["unet"], "--out", qfolder, "--scheme", "w4a8", "--method", "mota+ptqd",
        "--calib-sampler", "dpm++2m", "--calib-inference-steps", 4, "--calib-per-step", 2, "--mota-cos", 0.5,
        "--recon-iters", 3, "--recon-act-iters", 2, "--recon-batch-size", 4, "--guidance", 2,
        "--analysis-num", 4, "-q",
    )
    assert res.code == 0, res.stderr
    manifest = json.loads((qfolder / QUANT_JSON).read_text())
    assert manifest["config"]["mota_cos"] == 0.5 and manifest["config"]["calib_sampler"] == "dpm++2m"
    mota = manifest["calibration"]["mota"]
    assert mota["sampler"] == "dpm++2m" and mota["steps"] == 4
    assert set(mota["aligned_error"]) == {"fp", "round_to_nearest", "reconstructed"}
    assert any("dpm++2m" in p.name for p in (qfolder / "noise").glob("*.json"))
    info = run("info", qfolder)
    assert info.code == 0 and "mota:       aligned to dpm++2m at 4 steps" in info.stdout, info.stderr
    args = ("--num", 3, "--steps", 4, "--sampler", "dpm++2m", "--guidance", 2, "--labels", "0,2", "-q")
    assert run("sample", qfolder, "--out", tmp_path / "s.npz", *args).code == 0


def test_sample_fp_folder_labels_and_seeds(folders: dict[str, Path], tmp_path: Path, run: Callable) -> None:
    args = ("--num", 4, "--steps", 4, "--labels", "1-2", "--batch-size", 2, "-q")
    res = run("sample", folders["unet"], "--out", tmp_path / "a.npz", "--seed", 1, *args)
    assert res.code == 0 and res.stderr == ""  # --quiet on an FP folder: nothing on stderr
    assert run("sample", folders["unet"], "--out", tmp_path / "b.npz", "--seed", 2, *args).code == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a["labels"].tolist() == [1, 2, 1, 2]
        assert not np.array_equal(a["arr_0"], b["arr_0"])


def test_sampler_choice_through_the_cli(folders: dict[str, Path], tmp_path: Path, run: Callable) -> None:
    for sampler in ("dpm++2m", "euler"):
        out = tmp_path / f"{sampler}.npz"
        res = run("sample", folders["dit"], "--out", out, "--num", 2, "--steps", 4, "--sampler", sampler, "-q")
        assert res.code == 0, res.stderr
        with np.load(out) as f:
            assert f["arr_0"].shape == (2, 16, 16, 1)


def test_module_entry_point_in_a_subprocess(folders: dict[str, Path], tmp_path: Path) -> None:
    """A real process (real stderr, diffusers' own log handler) failing after the model is loaded."""
    out = tmp_path / "s.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "qdiffuse.cli", "sample", str(folders["unet"]), "--out", str(out), "--labels", "0-5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_user_error(Result(proc.returncode, proc.stdout, proc.stderr), "out of range")
    assert _files(tmp_path) == []


# ------------------------------------------------------------------------------------------------ user errors


def _nan_folder(folders: dict[str, Path], tmp: Path) -> Path:
    folder = _copy(folders["unet"], tmp / "nan-model")
    path = _weights(folder)
    tensors = load_file(str(path))
    tensors["conv_out.bias"] = torch.full_like(tensors["conv_out.bias"], float("nan"))
    save_file(tensors, str(path))
    return folder


def _no_null_folder(folders: dict[str, Path], tmp: Path) -> Path:
    folder = _copy(folders["unet"], tmp / "no-null")
    (folder / "qdiffuse.json").unlink()  # 4 class embeddings, none of them declared the null class
    return folder


def _no_subfolder(folders: dict[str, Path], tmp: Path) -> Path:
    folder = tmp / "scheduler-only"
    shutil.copytree(folders["unet"] / "scheduler", folder / "scheduler")
    return folder


def _bad_config(folders: dict[str, Path], tmp: Path) -> Path:
    folder = _copy(folders["dit"], tmp / "bad-config")
    (folder / "transformer" / "config.json").write_text('{"_class_name": "DiTTransformer2DModel", ')
    return folder


def _corrupt_weights(folders: dict[str, Path], tmp: Path) -> Path:
    folder = _copy(folders["unet"], tmp / "corrupt")
    path = _weights(folder)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return folder


def _condition_without_key(folders: dict[str, Path], tmp: Path) -> Path:
    path = tmp / "cond-no-key.safetensors"
    save_file({"something_else": torch.zeros(8, 24)}, path)
    return path


# name: (argv builder(folders, scratch, out_dir), fragment of the message); some fail only after loading a model
CASES: dict[str, tuple[Callable[[dict, Path, Path], tuple], str]] = {
    "missing-folder-sample": (lambda f, s, o: ("sample", s / "nope", "--out", o / "s.npz"), "nope"),
    "missing-folder-quantize": (lambda f, s, o: ("quantize", s / "nope", "--out", o / "q"), "nope"),
    "no-model-subfolder": (
        lambda f, s, o: ("sample", _no_subfolder(f, s), "--out", o / "s.npz"),
        "unet/config.json or transformer/config.json",
    ),
    "malformed-config": (
        lambda f, s, o: ("quantize", _bad_config(f, s), "--out", o / "q", *CALIB),
        "not valid JSON",
    ),
    "corrupt-weights": (
        lambda f, s, o: ("sample", _corrupt_weights(f, s), "--out", o / "s.npz"),
        "not a readable safetensors file",
    ),
    "unknown-scheme": (
        lambda f, s, o: ("quantize", f["unet"], "--out", o / "q", "--scheme", "w3a3"),
        "unknown scheme 'w3a3'",
    ),
    "unknown-method": (
        lambda f, s, o: ("quantize", f["unet"], "--out", o / "q", "--method", "awq"),
        "unknown method 'awq'",
    ),
    "unknown-sampler": (
        lambda f, s, o: ("sample", f["unet"], "--out", o / "s.npz", "--sampler", "heun"),
        "unknown --sampler 'heun'",
    ),
    "unknown-calib-sampler": (
        lambda f, s, o: ("quantize", f["unet"], "--out", o / "q", "--calib-sampler", "heun"),
        "heun",
    ),
    "mota-first-order-sampler": (
        lambda f, s, o: ("quantize", f["unet"], "--out", o / "q", "--method", "mota", "--calib-sampler", "ddim"),
        "--calib-sampler ddim has none; use one of dpm++2m",
    ),
    "recon-beta-malformed": (
        lambda f, s, o: ("quantize", f["unet"], "--out", o / "q", "--method", "qdiffusion", "--recon-beta", "20"),
        "--recon-beta '20'",
    ),
    "recon-blocks-unknown": (
        lambda f, s, o: ("quantize", f["unet"], "--out", o / "q", "--method", "qdiffusion", "--recon-blocks", "net"),
        "auto or layer",
    ),
    "num-0": (lambda f, s, o: ("sample", f["unet"], "--out", o / "s.npz", "--num", 0), "--num 0"),
    "steps-0-quantized": (
        lambda f, s, o: ("sample", f["unet-q"], "--out", o / "s.npz", "--steps", 0, "-q"),
        "--steps 0",
    ),
    "steps-0": (lambda f, s, o: ("sample", f["unet"], "--out", o / "s.npz", "--steps", 0, "-q"), "--steps 0"),
    "out-parent-missing-sample": (
        lambda f, s, o: ("sample", f["unet"], "--out", o / "missing" / "s.npz"),
        "does not exist",
    ),
    "out-parent-missing-quantize": (
        lambda f, s, o: ("quantize", f["unet"], "--out", o / "missing" / "q"),
        "does not exist",
    ),
    "grid-parent-missing": (
        lambda f, s, o: ("sample", f["unet"], "--out", o / "s.npz", "--grid", o / "missing" / "g.png"),
        "does not exist",
    ),
    "labels-malformed": (
        lambda f, s, o: ("sample", f["unet"], "--out", o / "s.npz", "--labels", "one-two"),
        "--labels",
    ),
    "labels-out-of-range": (
        lambda f, s, o: ("sample", f["unet"], "--out", o / "s.npz", "--steps", 2, "--labels", "0-5", "-q"),
        "labels [3, 4, 5] are out of range",
    ),
    "guidance-without-null-class": (
        lambda f, s, o: ("sample", _no_null_folder(f, s), "--out", o / "s.npz", "--steps", 2, "--guidance", 2, "-q"),
        "null class",
    ),
    "guidance-without-null-class-quantize": (
        lambda f, s, o: ("quantize", _no_null_folder(f, s), "--out", o / "q", *CALIB, "--guidance", 2, "-q"),
        "null class",
    ),
    "nan-calibration-data": (
        lambda f, s, o: ("quantize", _nan_folder(f, s), "--out", o / "q", *CALIB, "-q"),
        "NaN",
    ),
    "eta-with-euler": (
        lambda f, s, o: ("sample", f["unet-q"], "--out", o / "s.npz", "--sampler", "euler", "--eta", 0.5, "-q"),
        "eta",
    ),
    "condition-unreadable": (
        lambda f, s, o: ("sample", f["cond"], "--out", o / "s.npz", "--condition", s / "none.safetensors", "-q"),
        "--condition",
    ),
    "condition-without-key": (
        lambda f, s, o: ("sample", f["cond"], "--out", o / "s.npz", "--condition", _condition_without_key(f, s), "-q"),
        "encoder_hidden_states",
    ),
    "device-unknown": (lambda f, s, o: ("sample", f["unet"], "--out", o / "s.npz", "--device", "tpu"), "--device"),
    "info-not-quantized": (lambda f, s, o: ("info", f["unet"]), "not a quantized model folder"),
    "info-missing-folder": (lambda f, s, o: ("info", s / "nope"), "not a quantized model folder"),
}


def _run_case(name: str, folders: dict[str, Path], tmp_path: Path, run: Callable[..., Result]) -> tuple[Result, Path]:
    scratch, out_dir = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    out_dir.mkdir()
    build, _ = CASES[name]
    return run(*build(folders, scratch, out_dir)), out_dir


@pytest.mark.parametrize("name", list(CASES))
def test_user_error(name: str, folders: dict[str, Path], tmp_path: Path, run: Callable[..., Result]) -> None:
    result, out_dir = _run_case(name, folders, tmp_path, run)
    _, fragment = CASES[name]
    assert_user_error(result, fragment)
    assert _files(out_dir) == []  # no output, no temporary file


def test_existing_output_is_untouched_then_overwritten(
    folders: dict[str, Path], tmp_path: Path, run: Callable[..., Result]
) -> None:
    out, grid = tmp_path / "s.npz", tmp_path / "g.png"
    out.write_bytes(b"precious results \x00\x01")
    args = ("sample", folders["unet-q"], "--out", out, "--num", 2, "--steps", 2, "-q")
    assert_user_error(run(*args), "already exists", "--overwrite")
    assert out.read_bytes() == b"precious results \x00\x01"
    grid.write_bytes(b"old grid")
    out2 = tmp_path / "fresh.npz"
    assert_user_error(run("sample", folders["unet-q"], "--out", out2, "--grid", grid, "-q"), "already exists")
    assert grid.read_bytes() == b"old grid" and not out2.exists()

    # --overwrite replaces only samples qdiffuse wrote, never a file of anything else
    assert_user_error(run(*args, "--overwrite"), "not a samples .npz qdiffuse wrote")
    assert out.read_bytes() == b"precious results \x00\x01"
    out.unlink()
    assert run(*args).code == 0
    first = out.read_bytes()
    res = run(*args[:-1], "--seed", 1, "-q", "--overwrite")
    assert res.code == 0, res.stderr
    with np.load(out) as f:
        assert f["arr_0"].shape == (2, 16, 16, 1)
    assert out.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "s.npz"]


def test_existing_quantize_folder_is_untouched_then_overwritten(
    folders: dict[str, Path], tmp_path: Path, run: Callable[..., Result]
) -> None:
    qfolder = tmp_path / "q"
    qfolder.mkdir()
    (qfolder / "notes.txt").write_text("mine")
    args = ("quantize", folders["dit"], "--out", qfolder, *CALIB, "-q")
    assert_user_error(run(*args), "already exists")
    assert _files(qfolder) == ["notes.txt"] and (qfolder / "notes.txt").read_text() == "mine"
    # a folder of the user's own files is never replaced, not even with --overwrite
    assert_user_error(run(*args, "--overwrite"), "not a quantized model folder qdiffuse wrote")
    assert _files(qfolder) == ["notes.txt"] and (qfolder / "notes.txt").read_text() == "mine"
    (qfolder / "notes.txt").unlink()
    assert run(*args, "--overwrite").code == 0  # an empty folder holds nothing to lose
    res = run(*args, "--overwrite", "--scheme", "w4a8")  # a quantized folder is replaced by a new one
    assert res.code == 0, res.stderr
    assert is_quantized_folder(qfolder) and "w4a8" in (qfolder / QUANT_JSON).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to read-only folders")
def test_read_only_output_folder(folders: dict[str, Path], tmp_path: Path, run: Callable[..., Result]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_user_error(run("sample", folders["unet"], "--out", locked / "s.npz"), "not writable")
        assert _files(locked) == []
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------------------------------- more bad input


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("sample", "{unet}", "--out", "{out}", "--num", "many"), "--num"),
        (("sample", "{unet}"), "out"),
        (("quantize", "{unet}", "--out", "{out}", "--frobnicate"), "--frobnicate"),
        (("bogus",), "bogus"),
    ],
    ids=["bad-int", "missing-out", "unknown-option", "unknown-command"],
)
def test_usage_errors(
    args: tuple, fragment: str, folders: dict[str, Path], tmp_path: Path, run: Callable[..., Result]
) -> None:
    out = tmp_path / "s.npz"
    result = run(*(a.format(unet=folders["unet"], out=out) for a in args))
    assert_user_error(result, fragment)
    assert not out.exists()


def test_info_on_malformed_manifest(folders: dict[str, Path], tmp_path: Path, run: Callable[..., Result]) -> None:
    folder = _copy(folders["unet-q"], tmp_path / "q")
    (folder / QUANT_JSON).write_text("{}")
    assert_user_error(run("info", folder), "quantization")


@pytest.mark.parametrize("shape", [(2, 8, 24), (8, 16)], ids=["two-rows-for-three-images", "wrong-dim"])
def test_condition_with_wrong_shape(
    shape: tuple, folders: dict[str, Path], tmp_path: Path, run: Callable[..., Result]
) -> None:
    path = tmp_path / "c.safetensors"
    save_file({"encoder_hidden_states": torch.zeros(shape)}, path)
    out = tmp_path / "s.npz"
    result = run("sample", folders["cond"], "--out", out, "--num", 3, "--steps", 2, "--condition", path, "-q")
    assert_user_error(result, "--condition")
    assert not out.exists()


@pytest.mark.parametrize(
    "meta, args",
    [
        ('{"num_classes": 4, "null_class": 9}', ("--guidance", 2)),
        ('{"num_classes": 8, "null_class": 8}', ("--labels", 7)),
    ],
    ids=["null-class-past-table", "labels-past-table"],
)
def test_qdiffuse_json_inconsistent_with_the_model(
    meta: str, args: tuple, folders: dict[str, Path], tmp_path: Path, run: Callable[..., Result]
) -> None:
    folder = _copy(folders["dit"], tmp_path / "dit")
    (folder / "qdiffuse.json").write_text(meta)
    out = tmp_path / "s.npz"
    result = run("sample", folder, "--out", out, "--num", 2, "--steps", 2, *args, "-q")
    assert_user_error(result, "qdiffuse.json")
    assert not out.exists()


def test_quiet_sampling_of_a_quantized_unet_prints_nothing_on_stderr(
    folders: dict[str, Path], tmp_path: Path, run: Callable[..., Result]
) -> None:
    result = run("sample", folders["unet-q"], "--out", tmp_path / "s.npz", "--num", 2, "--steps", 3, "-q")
    assert result.code == 0
    assert result.stderr == ""


def test_sampling_a_nan_model_is_a_data_error(folders: dict[str, Path], tmp_path: Path, run: Callable) -> None:
    out = tmp_path / "out" / "s.npz"
    out.parent.mkdir()
    result = run("sample", _nan_folder(folders, tmp_path), "--out", out, "--num", 2, "--steps", 2, "-q")
    assert_user_error(result, "NaN")
    assert _files(out.parent) == []
