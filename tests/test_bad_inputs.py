"""A corpus of bad inputs, over every command and the Python API, each held to the whole user-error contract.

For the command line: exit code 2, exactly one line on stderr and it starts with ``error:`` (naming the problem:
the fragments each case lists), no traceback, nothing on stdout, no denoiser forward pass before the error where
the input can be checked up front, and no trace on disk: every file and folder under the case's folder (its
output folder holds the user's files, hidden ones too, and the inputs it builds sit next to it) and every shared
input model is byte-identical afterwards, with nothing added (no output, no temporary file) and nothing removed.
For the Python API: the :class:`~qdiffuse.errors.QDiffuseError` subclass each case names, with a one-line
message, under the same checks on disk.

Commands run in-process through ``qdiffuse.cli.main`` under a time limit; the one case that could eat the
machine's memory runs as a real process with a memory cap.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_folder, tiny_quantized_folder

from qdiffuse import cli, progress
from qdiffuse.errors import ConfigError, DataError, ModelLoadError, OutputError, QDiffuseError

NAN, INF = float("nan"), float("inf")
CALIB = ("--calib-steps", 2, "--calib-per-step", 2, "--calib-inference-steps", 3)
PROCESS_MEMORY = 6 << 30  # address-space cap of a real-process case (bytes)


# --------------------------------------------------------------------------------------------- shared inputs


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Read-only inputs every case may use (hashed before and after each case): model folders and files."""
    out = {kind: tiny_folder(kind, tmp_path_factory) for kind in ("unet", "cond", "dit")}
    out["unet-q"] = tiny_quantized_folder("unet", "w4a8", tmp_path_factory)
    root = tmp_path_factory.mktemp("bad-input-files")
    rng = np.random.default_rng(0)
    out["samples"] = root / "samples.npz"
    np.savez(out["samples"], arr_0=rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8), labels=np.arange(8) % 10)
    out["samples-16"] = root / "samples-16.npz"
    np.savez(out["samples-16"], arr_0=rng.integers(0, 256, (8, 16, 16, 1), dtype=np.uint8))
    out["condition"] = root / "condition.safetensors"
    save_file({"encoder_hidden_states": torch.randn(8, 24, generator=torch.Generator().manual_seed(0))},
              out["condition"])
    return out


@dataclass
class Env:
    """One case's world: the shared inputs, its own folder (the working directory), an output folder holding the
    user's files, and a scratch folder for the inputs the case builds."""

    f: dict[str, Path]
    root: Path
    out: Path
    scratch: Path

    def copy(self, kind: str, dest: Path | None = None) -> Path:
        """A private copy of a shared model folder (for cases that edit it or that a bug could overwrite)."""
        return Path(shutil.copytree(self.f[kind], dest or self.scratch / kind))

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.scratch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)
        return path

    def user_folder(self, name: str = "mine") -> Path:
        """A folder of the user's own files inside the output folder (not anything qdiffuse wrote)."""
        folder = self.out / name
        (folder / "sub").mkdir(parents=True)
        (folder / "photo.txt").write_text("holiday\n")
        (folder / "sub" / "thesis.tex").write_text("\\documentclass{article}\n")
        return folder

    def edited(self, kind: str, rel: str, edit: Callable[[Any], Any], rehash: bool = False) -> Path:
        """A copy of a shared folder with the JSON file ``rel`` changed by ``edit`` (in place or returned);
        ``rehash``: the folder's integrity record rewritten to match (the edit is deliberate, or the folder came
        from another qdiffuse), so only the content checks can catch it."""
        folder = self.copy(kind)
        path = folder / rel
        data = json.loads(path.read_text())
        changed = edit(data)
        path.write_text(json.dumps(data if changed is None else changed, indent=2))
        if rehash and (folder / "integrity.json").is_file():
            from qdiffuse.integrity import write_integrity

            write_integrity(folder)
        return folder

    def without(self, kind: str, *rels: str) -> Path:
        """A copy of a shared folder without the files (globs) ``rels``."""
        folder = self.copy(kind)
        for rel in rels:
            for path in folder.glob(rel):
                path.unlink()
        return folder

    def replaced(self, kind: str, rel: str, data: bytes | None) -> Path:
        """A copy of a shared folder whose file ``rel`` (a glob) holds ``data`` (None: becomes a folder)."""
        folder = self.copy(kind)
        for path in folder.glob(rel):
            if data is None:
                path.unlink()
                path.mkdir()
            else:
                path.write_bytes(data)
        return folder

    def weights(self, folder: Path) -> str:
        sub = "transformer" if (folder / "transformer").is_dir() else "unet"
        return f"{sub}/*.safetensors"

    def bench_config(self, edit: Callable[[dict], Any] | None = None, name: str = "bench.json") -> Path:
        """A small, valid bench config on the tiny UNet, changed by ``edit``."""
        data: dict[str, Any] = {
            "name": "bad-input",
            "models": [str(self.f["unet"])],
            "samplers": [{"sampler": "ddim", "steps": 2, "eta": 0.0}],
            "quant": [{"scheme": "w8a8", "method": "minmax"}],
            "num": 8,
            "batch_size": 8,
            "analysis_num": 2,
            "calib": {"calib_steps": 2, "calib_per_step": 2, "calib_num_inference_steps": 3},
        }
        if edit is not None:
            edit(data)
        return self.write(name, json.dumps(data))


def make_env(inputs: dict[str, Path], root: Path) -> Env:
    env = Env(inputs, root, root / "out", root / "in")
    env.out.mkdir()
    env.scratch.mkdir()
    (env.out / "notes.txt").write_text("my notes\n")
    (env.out / ".hidden-settings").write_bytes(b"\x00\x01 keep me")
    (env.out / "old").mkdir()
    (env.out / "old" / "data.bin").write_bytes(bytes(range(256)))
    (env.scratch / "readme.txt").write_text("inputs of this case\n")
    return env


# ------------------------------------------------------------------------------------------------ snapshots


def snapshot(roots: list[Path]) -> dict[str, str]:
    """Every path under ``roots`` -> its kind and content hash."""
    state: dict[str, str] = {}
    for root in roots:
        if not root.exists():
            state[str(root)] = "missing"
            continue
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if path.is_symlink():
                state[str(path)] = f"link to {os.readlink(path)}"
            elif path.is_dir():
                state[str(path)] = "folder"
            else:
                try:
                    state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                except OSError as exc:
                    state[str(path)] = f"unreadable ({exc.strerror})"
    return state


def disk_changes(before: dict[str, str], after: dict[str, str], root: Path) -> list[str]:
    def show(paths: set[str]) -> str:
        names = sorted(str(Path(p).relative_to(root)) if p.startswith(str(root)) else p for p in paths)
        return ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")

    added = set(after) - set(before)
    removed = set(before) - set(after)
    changed = {p for p in set(before) & set(after) if before[p] != after[p]}
    problems = []
    if added:
        problems.append(f"new on disk: {show(added)}")
    if removed:
        problems.append(f"removed from disk: {show(removed)}")
    if changed:
        problems.append(f"changed on disk: {show(changed)}")
    return problems


# -------------------------------------------------------------------------------------------------- running


class CaseTimeout(BaseException):
    """The case ran past its time limit (raised from SIGALRM wherever the command was)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(signum: int, frame: object) -> None:
        raise CaseTimeout(f"still running after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Outcome:
    code: int | None  # None: killed at the time limit
    stdout: str
    stderr: str
    seconds: float
    forwards: int | None  # denoiser forward passes (None: not counted, a real process)
    exception: BaseException | None = None  # API cases: what was raised (None: nothing)

    def cli_problems(self, case: Case) -> list[str]:
        problems = []
        if self.code is None:
            problems.append(f"no result within {case.limit_s:g} s (killed)")
        elif self.code != 2:
            problems.append(f"exit code {self.code}, expected 2")
        if "Traceback" in self.stderr:
            problems.append("traceback on stderr")
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        if len(lines) != 1 or not lines[0].startswith("error:"):
            problems.append(f"stderr has {len(lines)} non-empty lines, expected one 'error:' line")
        message = next((line for line in lines if line.startswith("error:")), "")
        problems += _missing_fragments(case, message)
        if self.stdout.strip():
            problems.append(f"stdout not empty ({_tail(self.stdout)!r})")
        problems += self._work_problems(case)
        if problems:
            problems.append(f"stderr: {_tail(self.stderr)!r}")
        return problems

    def api_problems(self, case: Case) -> list[str]:
        assert case.raises is not None
        exc = self.exception
        problems = []
        if exc is None:
            problems.append(f"no exception, expected {case.raises.__name__}")
        elif isinstance(exc, CaseTimeout):
            problems.append(f"no result within {case.limit_s:g} s (interrupted)")
        elif not isinstance(exc, case.raises):
            where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
            problems.append(
                f"raised {type(exc).__name__}{at}: {_tail(str(exc))!r}, expected {case.raises.__name__}"
            )
        else:
            message = str(exc)
            if not message.strip() or "\n" in message.strip():
                problems.append(f"message is not one line: {message!r}")
            problems += _missing_fragments(case, message)
        return problems + self._work_problems(case)

    def _work_problems(self, case: Case) -> list[str]:
        if case.before_work and self.forwards:
            return [f"{self.forwards} denoiser forward passes ran before the error (expected it up front)"]
        return []


def _tail(text: str, limit: int = 400) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _missing_fragments(case: Case, message: str) -> list[str]:
    """Each fragment ('a|b': either) must appear in the message, ignoring case."""
    low = message.lower()
    return [
        f"message lacks {fragment!r}"
        for fragment in case.fragments
        if not any(alt.lower() in low for alt in fragment.split("|"))
    ]


DENOISER_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")


class Runner:
    """Runs a case's command in-process (as ``qdiffuse ARGS`` would), or its API call, counting forward passes."""

    def __init__(self, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
        import diffusers

        self.capsys = capsys
        self.monkeypatch = monkeypatch
        self.forwards = 0
        for name in DENOISER_CLASSES:
            cls = getattr(diffusers, name)
            monkeypatch.setattr(cls, "forward", self._counted(cls.forward))

    def _counted(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(forward)
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.forwards += 1
            return forward(*args, **kwargs)

        return counted

    def cli(self, args: tuple, limit_s: float) -> Outcome:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.get_logger("diffusers")  # make sure its stderr handler exists
        handler = diffusers_logging._default_handler
        old_stream = handler.stream
        self.capsys.readouterr()
        self.forwards = 0
        handler.setStream(sys.stderr)  # what a fresh process does: log to the (captured) stderr
        self.monkeypatch.setattr(sys, "argv", ["qdiffuse", *map(str, args)])
        start = time.perf_counter()
        code: int | None
        try:
            with time_limit(limit_s):
                cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except CaseTimeout:
            code = None
        except BaseException:  # a real process would print the traceback and exit 1
            traceback.print_exc()
            code = 1
        finally:
            handler.setStream(old_stream)
        seconds = time.perf_counter() - start
        captured = self.capsys.readouterr()
        return Outcome(code, captured.out, captured.err, seconds, self.forwards)

    def api(self, call: Callable[[], Any], limit_s: float) -> Outcome:
        self.forwards = 0
        progress.set_progress_enabled(False)
        start = time.perf_counter()
        raised: BaseException | None = None
        try:
            with time_limit(limit_s):
                call()
        except BaseException as exc:  # noqa: B036 - recorded, judged by the case
            raised = exc
        return Outcome(None, "", "", time.perf_counter() - start, self.forwards, raised)


def run_process(args: tuple, cwd: Path, limit_s: float) -> Outcome:
    """``python -m qdiffuse.cli ARGS`` in a real process, its address space capped, killed at ``limit_s``."""

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (PROCESS_MEMORY, PROCESS_MEMORY))

    command = [sys.executable, "-m", "qdiffuse.cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=limit_s, preexec_fn=cap_memory, env=env
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Outcome(None, "", err, time.perf_counter() - start, None)
    return Outcome(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start, None)


@pytest.fixture
def runner(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Runner]:
    was_enabled = progress._enabled
    threads = torch.get_num_threads()
    monkeypatch.chdir(tmp_path)
    yield Runner(capsys, monkeypatch)
    progress.set_progress_enabled(was_enabled)
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One bad input. ``build(env)`` makes what the case needs and returns the argv (CLI) or a zero-argument
    callable (API, with ``raises`` the error it must raise)."""

    build: Callable[[Env], Any]
    fragments: tuple[str, ...] = ()
    """Each must appear in the message (case-insensitive; 'a|b': either)."""
    raises: type[QDiffuseError] | None = None
    process: bool = False
    """Run as a real process with a memory cap (for inputs that could exhaust the machine)."""
    limit_s: float = 30.0
    before_work: bool = True
    """The input can be judged before any sampling or calibration: no denoiser forward pass may run."""


def cli_case(build: Callable[[Env], tuple], *fragments: str, **kw: Any) -> Case:
    return Case(build, fragments, **kw)


def api_case(build: Callable[[Env], Callable[[], Any]], raises: type[QDiffuseError], *fragments: str,
             **kw: Any) -> Case:
    return Case(build, fragments, raises=raises, **kw)


def q(e: Env, *extra: object, model: Path | None = None, out: Path | None = None) -> tuple:
    """``qdiffuse quantize`` of the tiny UNet with small calibration into out/q."""
    return ("quantize", model or e.f["unet"], "--out", out or e.out / "q", *CALIB, "--device", "cpu", *extra)


def s(e: Env, *extra: object, model: Path | None = None, out: Path | None = None) -> tuple:
    """``qdiffuse sample`` of 2 images in 3 steps from the tiny UNet into out/s.npz."""
    return ("sample", model or e.f["unet"], "--out", out or e.out / "s.npz", "--num", 2, "--steps", 3,
            "--device", "cpu", *extra)


def a(e: Env, *extra: object, folder: Path | None = None, out: Path | None = None) -> tuple:
    """``qdiffuse analyze`` of a private copy of the quantized UNet (analyze writes statistics into it)."""
    return ("analyze", folder or e.copy("unet-q"), "--out", out or e.out / "report", "--num", 2, "--steps", 3,
            "--device", "cpu", *extra)


def b(e: Env, config: Path, *extra: object) -> tuple:
    return ("bench", config, "--out", e.out / "bench", "--device", "cpu", *extra)


def d(e: Env, *extra: object) -> tuple:
    return ("demo", "--out", e.out / "demo", "--model", e.f["unet"], "--num", 8, "--steps", 2, "--device", "cpu",
            *extra)


def t(e: Env, *extra: object, name: str = "fmnist-tiny") -> tuple:
    """``qdiffuse train`` reading an empty data folder (no Fashion-MNIST here: a bug fails at the data)."""
    data = e.scratch / "no-data"
    data.mkdir(exist_ok=True)
    return ("train", name, "--out", e.out / "model", "--data", data, "--device", "cpu", *extra)


def sens(e: Env, *extra: object) -> tuple:
    return ("sensitivity", e.f["unet"], "--num", 2, "--calib-steps", 2, "--calib-per-step", 2, "--device", "cpu",
            *extra)


def cosine(config: dict) -> None:
    config["beta_schedule"] = "cosine"


def weight_bits_8(manifest: dict) -> None:
    manifest["config"]["weight"]["bits"] = 8


def layer_bits_2(manifest: dict) -> None:
    name = next(n for n, entry in manifest["layers"].items() if entry["bits"] == 4)
    manifest["layers"][name]["bits"] = 2


def format_version_99(manifest: dict) -> None:
    manifest["format_version"] = 99


def truncated(e: Env, kind: str, rel: str) -> Path:
    folder = e.copy(kind)
    for path in folder.glob(rel):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return folder


def npz(e: Env, name: str, **arrays: Any) -> Path:
    path = e.scratch / name
    np.savez(path, **arrays)
    return path


def images(n: int = 8, shape: tuple[int, ...] = (28, 28, 1), dtype: type = np.uint8) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, *shape)).astype(dtype)


def garbage() -> bytes:
    return bytes(np.random.default_rng(2).integers(0, 256, 1000, dtype=np.uint8))


# the Python API


def small_config(scheme: str = "w8a8", **kw: Any) -> Any:
    from qdiffuse.config import QuantConfig

    return QuantConfig.from_scheme(scheme, calib_steps=2, calib_per_step=2, calib_num_inference_steps=3, **kw)


def api_quantize(folder: Path, config: Any = None, **kw: Any) -> Callable[[], Any]:
    def call() -> Any:
        from qdiffuse.api import quantize
        from qdiffuse.models.loading import load_model_folder

        loaded = load_model_folder(folder)
        return quantize(loaded.denoiser, loaded.scheduler_config, config or small_config(), **kw)

    return call


def api_sample(folder: Path, **request: Any) -> Callable[[], Any]:
    def call() -> Any:
        from qdiffuse.models.loading import load_model_folder
        from qdiffuse.sampling.loop import SampleRequest, sample

        loaded = load_model_folder(folder)
        return sample(loaded.denoiser, loaded.scheduler_config, SampleRequest(**{"num": 2, "steps": 3, **request}))

    return call


def api_request(**request: Any) -> Callable[[], Any]:
    def call() -> Any:
        from qdiffuse.sampling.loop import SampleRequest

        return SampleRequest(**{"num": 2, "steps": 3, **request})

    return call


def api_load_quantized(folder: Path, **kw: Any) -> Callable[[], Any]:
    def call() -> Any:
        from qdiffuse.io import load_quantized

        return load_quantized(folder, **kw)

    return call


def api_bench_load(path: Path) -> Callable[[], Any]:
    def call() -> Any:
        from qdiffuse.bench import BenchConfig

        return BenchConfig.load(path)

    return call


def api_from_scheme(scheme: str, **kw: Any) -> Callable[[], Any]:
    def call() -> Any:
        from qdiffuse.config import QuantConfig

        return QuantConfig.from_scheme(scheme, **kw)

    return call


def api_quantize_folder(model: Path, out: Path, overwrite: bool = True) -> Callable[[], Any]:
    def call() -> Any:
        from qdiffuse.pipeline import quantize_folder

        return quantize_folder(model, out, small_config(), overwrite=overwrite)

    return call


def api_quantize_quantized(folder: Path) -> Callable[[], Any]:
    def call() -> Any:
        from qdiffuse.api import quantize
        from qdiffuse.io import load_quantized

        loaded = load_quantized(folder)
        return quantize(loaded.denoiser, loaded.scheduler_config, small_config())

    return call


def api_quantize_module(module: torch.nn.Module) -> Callable[[], Any]:
    def call() -> Any:
        from qdiffuse.api import quantize

        return quantize(module, {}, small_config())

    return call


def api_from_dict(data: dict) -> Callable[[], Any]:
    def call() -> Any:
        from qdiffuse.config import QuantConfig

        return QuantConfig.from_dict(data)

    return call


def api_load_model_folder(folder: Path) -> Callable[[], Any]:
    def call() -> Any:
        from qdiffuse.models.loading import load_model_folder

        return load_model_folder(folder)

    return call


def user_json(e: Env) -> Path:
    """A JSON file of the user's own in the output folder."""
    return user_file(e.out / "results.json", b'{"fid": 3.2}\n')


def user_file(path: Path, data: bytes) -> Path:
    """A file of the user's own at ``path`` (next to the outputs)."""
    path.write_bytes(data)
    return path


def api_load_samples(path: Path) -> Callable[[], Any]:
    def call() -> Any:
        from qdiffuse.eval.evaluate import load_samples

        return load_samples(path)

    return call


def _q_inside_out(e: Env) -> tuple:
    model = e.copy("unet", e.out / "model")
    return q(e, "--overwrite", model=model, out=e.out)


CASES: dict[str, Case] = {
    # ----------------------------------------------------------------------------- quantize: where it writes
    "quantize-out-is-the-input": cli_case(lambda e: q(e, "--overwrite", model=(m := e.copy("unet")), out=m)),
    "quantize-out-inside-the-input": cli_case(
        lambda e: q(e, "--overwrite", model=(m := e.copy("unet")), out=m / "q")
    ),
    "quantize-input-inside-the-out": cli_case(_q_inside_out),
    "quantize-overwrite-user-folder": cli_case(lambda e: q(e, "--overwrite", out=e.user_folder())),
    "quantize-overwrite-user-file": cli_case(lambda e: q(e, "--overwrite", out=e.out / "notes.txt")),
    "quantize-out-parent-missing": cli_case(lambda e: q(e, out=e.out / "missing" / "q"), "does not exist"),
    # ------------------------------------------------------------------------------- quantize: bad settings
    "quantize-unknown-scheme": cli_case(lambda e: q(e, "--scheme", "w3a3"), "w3a3"),
    "quantize-unknown-method": cli_case(lambda e: q(e, "--method", "awq"), "awq"),
    "quantize-unknown-calib-sampler": cli_case(lambda e: q(e, "--calib-sampler", "heun"), "heun"),
    "quantize-unknown-device": cli_case(lambda e: (*q(e)[:-2], "--device", "tpu"), "--device"),
    "quantize-unknown-outliers": cli_case(lambda e: q(e, "--outliers", "sometimes"), "outlier"),
    "quantize-calib-per-step-0": cli_case(lambda e: q(e, "--calib-per-step", 0), "calib"),
    "quantize-calib-steps-negative": cli_case(lambda e: q(e, "--calib-steps", -1), "calib"),
    "quantize-calib-inference-steps-100000": cli_case(
        lambda e: q(e, "--calib-inference-steps", 100000), "steps|calib-inference"
    ),
    "quantize-calib-steps-not-a-number": cli_case(lambda e: q(e, "--calib-steps", "two"), "--calib-steps"),
    "quantize-guard-db-nan": cli_case(lambda e: q(e, "--guard-db", "nan"), "guard"),
    "quantize-guard-db-inf": cli_case(lambda e: q(e, "--guard-db", "inf"), "guard"),
    "quantize-snr-margin-inf": cli_case(lambda e: q(e, "--scheme", "w4-mixed", "--snr-margin", "inf"), "snr"),
    "quantize-snr-margin-nan": cli_case(lambda e: q(e, "--scheme", "w4-mixed", "--snr-margin", "nan"), "snr"),
    "quantize-recon-lr-nan": cli_case(
        lambda e: q(e, "--method", "qdiffusion", "--recon-iters", 1, "--recon-lr", "nan"), "lr|learning rate"
    ),
    "quantize-recon-act-lr-inf": cli_case(
        lambda e: q(e, "--method", "qdiffusion", "--recon-iters", 1, "--recon-act-lr", "inf"), "lr|learning rate"
    ),
    "quantize-recon-reg-nan": cli_case(
        lambda e: q(e, "--method", "qdiffusion", "--recon-iters", 1, "--recon-reg", "nan"), "reg"
    ),
    "quantize-recon-warmup-nan": cli_case(
        lambda e: q(e, "--method", "qdiffusion", "--recon-warmup", "nan"), "warm"
    ),
    "quantize-recon-beta-nan": cli_case(
        lambda e: q(e, "--method", "qdiffusion", "--recon-iters", 1, "--recon-beta", "nan,2"), "beta"
    ),
    "quantize-guidance-nan": cli_case(lambda e: q(e, "--guidance", "nan"), "guidance"),
    "quantize-guidance-negative": cli_case(lambda e: q(e, "--guidance", -1), "guidance"),
    "quantize-batch-size-0": cli_case(lambda e: q(e, "--batch-size", 0), "batch"),
    "quantize-seed-negative": cli_case(lambda e: q(e, "--seed", -1), "seed"),
    "quantize-labels-out-of-range": cli_case(lambda e: q(e, "--labels", "0-7"), "out of range"),
    "quantize-analysis-eta-nan": cli_case(lambda e: q(e, "--method", "ptqd", "--analysis-eta", "nan"), "eta"),
    "quantize-analysis-num-0": cli_case(lambda e: q(e, "--method", "ptqd", "--analysis-num", 0), "num"),
    "quantize-lzs-group-7": cli_case(lambda e: q(e, "--scheme", "quartz-w4a4", "--lzs-group", 7), "lzs"),
    "quantize-lzs-rounding-unknown": cli_case(
        lambda e: q(e, "--scheme", "quartz-w4a4", "--lzs-rounding", "up"), "rounding|lzs"
    ),
    "quantize-lowrank-rank-negative": cli_case(lambda e: q(e, "--lowrank-rank", -1), "rank"),
    "quantize-checkpoint-dir-is-a-file": cli_case(
        lambda e: q(e, "--method", "qdiffusion", "--recon-iters", 1, "--checkpoint-dir", e.out / "notes.txt"),
        "checkpoint",
    ),
    "quantize-condition-garbage": cli_case(
        lambda e: q(e, "--condition", e.write("c.safetensors", garbage()), model=e.f["cond"]), "--condition"
    ),
    # ------------------------------------------------------------------------------ quantize: bad model folders
    "quantize-missing-model": cli_case(lambda e: q(e, model=e.scratch / "nope"), "nope"),
    "quantize-model-is-a-file": cli_case(lambda e: q(e, model=e.out / "notes.txt"), "folder"),
    "quantize-model-config-missing": cli_case(
        lambda e: q(e, model=e.without("unet", "unet/config.json")), "config.json"
    ),
    "quantize-model-config-garbage": cli_case(
        lambda e: q(e, model=e.replaced("unet", "unet/config.json", b'{"_class_name": "UNet2DModel", ')), "JSON"
    ),
    "quantize-model-config-not-an-object": cli_case(
        lambda e: q(e, model=e.replaced("unet", "unet/config.json", b"[1, 2]")), "object"
    ),
    "quantize-model-weights-missing": cli_case(
        lambda e: q(e, model=e.without("unet", "unet/*.safetensors")), "safetensors"
    ),
    "quantize-model-weights-garbage": cli_case(
        lambda e: q(e, model=e.replaced("unet", "unet/*.safetensors", garbage())), "safetensors"
    ),
    "quantize-scheduler-config-missing": cli_case(
        lambda e: q(e, model=e.without("unet", "scheduler/scheduler_config.json")), "scheduler"
    ),
    "quantize-scheduler-config-garbage": cli_case(
        lambda e: q(e, model=e.replaced("unet", "scheduler/scheduler_config.json", b"\xff\xfe{")), "scheduler"
    ),
    "quantize-scheduler-beta-schedule-cosine": cli_case(
        lambda e: q(e, model=e.edited("unet", "scheduler/scheduler_config.json", cosine)), "cosine"
    ),
    "quantize-qdiffuse-json-garbage": cli_case(
        lambda e: q(e, model=e.replaced("unet", "qdiffuse.json", b"{num_classes: 3}")), "qdiffuse.json"
    ),
    # --------------------------------------------------------------------------------- sample: where it writes
    "sample-overwrite-user-folder": cli_case(lambda e: s(e, "--overwrite", out=e.user_folder())),
    "sample-overwrite-user-folder-named-npz": cli_case(lambda e: s(e, "--overwrite", out=e.user_folder("x.npz"))),
    "sample-overwrite-user-file-named-npz": cli_case(
        lambda e: s(e, "--overwrite", out=user_file(e.out / "mine.npz", garbage()))
    ),
    "sample-out-not-npz": cli_case(lambda e: s(e, out=e.out / "x.txt"), "npz"),
    "sample-grid-not-png": cli_case(lambda e: s(e, "--grid", e.out / "grid.txt"), "png"),
    "sample-num-10^12": cli_case(
        lambda e: (*s(e)[:4], "--num", 1_000_000_000_000, "--steps", 3, "--device", "cpu"), "num",
        process=True, limit_s=60,
    ),
    # ---------------------------------------------------------------------------------- sample: bad settings
    "sample-eta-5": cli_case(lambda e: s(e, "--eta", 5), "eta"),
    "sample-eta-negative": cli_case(lambda e: s(e, "--eta", -1), "eta"),
    "sample-eta-nan": cli_case(lambda e: s(e, "--eta", "nan"), "eta"),
    "sample-guidance-nan": cli_case(lambda e: s(e, "--guidance", "nan"), "guidance"),
    "sample-guidance-inf": cli_case(lambda e: s(e, "--guidance", "inf"), "guidance"),
    "sample-guidance-negative": cli_case(lambda e: s(e, "--guidance", -1), "guidance"),
    "sample-guidance-not-a-number": cli_case(lambda e: s(e, "--guidance", "lots"), "--guidance"),
    "sample-steps-100000": cli_case(lambda e: s(e, "--steps", 100000), "steps"),
    "sample-steps-negative": cli_case(lambda e: s(e, "--steps", -3), "steps"),
    "sample-batch-size-0": cli_case(lambda e: s(e, "--batch-size", 0), "batch"),
    "sample-seed-negative": cli_case(lambda e: s(e, "--seed", -1), "seed"),
    "sample-num-negative": cli_case(lambda e: s(e, "--num", -2), "num"),
    "sample-unknown-sampler": cli_case(lambda e: s(e, "--sampler", "heun"), "heun"),
    "sample-unknown-runtime": cli_case(lambda e: s(e, "--runtime", "fast", model=e.f["unet-q"]), "runtime"),
    "sample-unknown-device": cli_case(lambda e: (*s(e)[:-2], "--device", "tpu"), "--device"),
    "sample-unknown-model-name": cli_case(lambda e: s(e, model=Path("no-such-model")), "no-such-model"),
    "sample-labels-out-of-range": cli_case(lambda e: s(e, "--labels", "2-9"), "out of range"),
    "sample-labels-reversed-range": cli_case(lambda e: s(e, "--labels", "5-2"), "--labels"),
    "sample-labels-on-a-text-model": cli_case(lambda e: s(e, "--labels", "0", model=e.f["cond"]), "labels"),
    "sample-ptqd-on-an-fp-model": cli_case(lambda e: s(e, "--ptqd"), "ptqd"),
    "sample-condition-garbage": cli_case(
        lambda e: s(e, "--condition", e.write("c.safetensors", garbage()), model=e.f["cond"]), "--condition"
    ),
    "sample-condition-is-a-folder": cli_case(
        lambda e: s(e, "--condition", e.out / "old", model=e.f["cond"]), "--condition"
    ),
    # ---------------------------------------------------------------------------------- sample: bad folders
    "sample-scheduler-beta-schedule-cosine": cli_case(
        lambda e: s(e, model=e.edited("unet", "scheduler/scheduler_config.json", cosine)), "cosine"
    ),
    "sample-scheduler-config-is-a-folder": cli_case(
        lambda e: s(e, model=e.replaced("unet", "scheduler/scheduler_config.json", None)), "scheduler"
    ),
    "sample-model-config-missing": cli_case(
        lambda e: s(e, model=e.without("dit", "transformer/config.json")), "config.json"
    ),
    "sample-model-weights-truncated": cli_case(
        lambda e: s(e, model=truncated(e, "dit", "transformer/*.safetensors")), "safetensors"
    ),
    "sample-quantized-safetensors-missing": cli_case(
        lambda e: s(e, model=e.without("unet-q", "quantized.safetensors")), "quantized.safetensors"
    ),
    "sample-quantized-safetensors-truncated": cli_case(
        lambda e: s(e, model=truncated(e, "unet-q", "quantized.safetensors")), "quantized.safetensors"
    ),
    "sample-quantized-manifest-garbage": cli_case(
        lambda e: s(e, model=e.replaced("unet-q", "quantization.json", b'{"format_version": 1,')), "quantization"
    ),
    "sample-quantized-weight-bits-4-to-8": cli_case(
        lambda e: s(e, model=e.edited("unet-q", "quantization.json", weight_bits_8)), "bit|quantization.json|manifest"
    ),
    "sample-quantized-layer-bits-4-to-2": cli_case(
        lambda e: s(e, model=e.edited("unet-q", "quantization.json", layer_bits_2)), "bit|quantization.json|manifest"
    ),
    "sample-quantized-weight-bits-4-to-8-no-verify": cli_case(
        lambda e: s(e, "--no-verify", model=e.edited("unet-q", "quantization.json", weight_bits_8)),
        "bit|quantization.json|manifest",
    ),
    "sample-quantized-layer-bits-4-to-2-no-verify": cli_case(
        lambda e: s(e, "--no-verify", model=e.edited("unet-q", "quantization.json", layer_bits_2)),
        "bit|quantization.json|manifest",
    ),
    "sample-quantized-layer-bits-4-to-2-rehashed": cli_case(
        lambda e: s(e, model=e.edited("unet-q", "quantization.json", layer_bits_2, rehash=True)),
        "bit|quantization.json|manifest",
    ),
    # -------------------------------------------------------------------------------------------------- eval
    "eval-missing-samples": cli_case(lambda e: ("eval", e.scratch / "none.npz"), "does not exist"),
    "eval-samples-not-npz": cli_case(lambda e: ("eval", e.write("s.npz", "not an archive\n")), "npz"),
    "eval-samples-without-arr_0": cli_case(lambda e: ("eval", npz(e, "s.npz", images=images())), "arr_0"),
    "eval-samples-float": cli_case(lambda e: ("eval", npz(e, "s.npz", arr_0=images(dtype=np.float32))), "uint8"),
    "eval-samples-5-channels": cli_case(lambda e: ("eval", npz(e, "s.npz", arr_0=images(shape=(28, 28, 5)))),
                                        "shape"),
    "eval-samples-labels-mismatch": cli_case(
        lambda e: ("eval", npz(e, "s.npz", arr_0=images(), labels=np.arange(3))), "labels"
    ),
    "eval-samples-object-array": cli_case(
        lambda e: ("eval", npz(e, "s.npz", arr_0=np.array([{"a": 1}, None], dtype=object))), "npz"
    ),
    "eval-samples-is-a-quantized-folder": cli_case(lambda e: ("eval", e.f["unet-q"]), "not a file|npz"),
    "eval-ref-missing": cli_case(lambda e: ("eval", e.f["samples"], "--ref", e.scratch / "ref.npz"), "ref"),
    "eval-ref-garbage": cli_case(
        lambda e: ("eval", e.f["samples"], "--ref", e.write("ref.npz", garbage())), "ref"
    ),
    "eval-fp-shape-mismatch": cli_case(
        lambda e: ("eval", e.f["samples"], "--fp", e.f["samples-16"], "--device", "cpu"), "--fp"
    ),
    "eval-json-exists": cli_case(
        lambda e: ("eval", e.f["samples"], "--json", user_json(e)), "already exists"
    ),
    "eval-json-overwrite-user-folder": cli_case(
        lambda e: ("eval", e.f["samples"], "--json", e.user_folder(), "--overwrite", "--device", "cpu")
    ),
    "eval-inception-missing": cli_case(
        lambda e: ("eval", e.f["samples"], "--inception", e.scratch / "pt_inception.pth"), "inception"
    ),
    # -------------------------------------------------------------------------------------------------- info
    "info-fp-folder": cli_case(lambda e: ("info", e.f["unet"]), "not a quantized model folder"),
    "info-manifest-garbage": cli_case(
        lambda e: ("info", e.replaced("unet-q", "quantization.json", b"\x00\x01garbage")), "quantization"
    ),
    "info-format-version-99": cli_case(
        lambda e: ("info", e.edited("unet-q", "quantization.json", format_version_99)), "version|quantization.json"
    ),
    "info-format-version-99-rehashed": cli_case(
        lambda e: ("info", e.edited("unet-q", "quantization.json", format_version_99, rehash=True)), "version"
    ),
    "info-weight-bits-4-to-8": cli_case(
        lambda e: ("info", e.edited("unet-q", "quantization.json", weight_bits_8)), "bit|quantization.json|manifest"
    ),
    "info-layer-bits-4-to-2": cli_case(
        lambda e: ("info", e.edited("unet-q", "quantization.json", layer_bits_2)), "bit|quantization.json|manifest"
    ),
    "info-safetensors-missing": cli_case(
        lambda e: ("info", e.without("unet-q", "quantized.safetensors")), "quantized.safetensors"
    ),
    "info-safetensors-is-a-folder": cli_case(
        lambda e: ("info", e.replaced("unet-q", "quantized.safetensors", None)), "quantized.safetensors"
    ),
    # ----------------------------------------------------------------------------------------------- analyze
    "analyze-out-is-the-folder": cli_case(lambda e: a(e, "--overwrite", folder=(m := e.copy("unet-q")), out=m)),
    "analyze-overwrite-user-folder": cli_case(lambda e: a(e, "--overwrite", out=e.user_folder())),
    "analyze-fp-folder": cli_case(lambda e: a(e, folder=e.copy("unet")), "not a quantized model folder"),
    "analyze-num-0": cli_case(lambda e: a(e, "--num", 0), "num"),
    "analyze-eta-5": cli_case(lambda e: a(e, "--eta", 5), "eta"),
    "analyze-steps-100000": cli_case(lambda e: a(e, "--steps", 100000), "steps"),
    "analyze-guidance-nan": cli_case(lambda e: a(e, "--guidance", "nan"), "guidance"),
    "analyze-unknown-sampler": cli_case(lambda e: a(e, "--sampler", "heun"), "heun"),
    # ------------------------------------------------------------------------------------------------- bench
    "bench-config-missing": cli_case(lambda e: b(e, e.scratch / "none.json"), "does not exist"),
    "bench-config-garbage": cli_case(lambda e: b(e, e.write("bench.json", '{"name": "x", ')), "bench config"),
    "bench-config-is-a-folder": cli_case(lambda e: b(e, e.out / "old"), "bench config"),
    "bench-unknown-top-level-key": cli_case(
        lambda e: b(e, e.bench_config(lambda c: c.update(guidence=3.0))), "guidence", limit_s=20
    ),
    "bench-unknown-key-in-quant": cli_case(
        lambda e: b(e, e.bench_config(lambda c: c["quant"][0].update(lable="mine"))), "lable", limit_s=20
    ),
    "bench-num-2": cli_case(lambda e: b(e, e.bench_config(lambda c: c.update(num=2))), "num", limit_s=20),
    "bench-unknown-scheme": cli_case(
        lambda e: b(e, e.bench_config(lambda c: c["quant"][0].update(scheme="w3a3"))), "w3a3", limit_s=20
    ),
    "bench-unknown-sampler": cli_case(
        lambda e: b(e, e.bench_config(lambda c: c["samplers"][0].update(sampler="heun"))), "heun", limit_s=20
    ),
    "bench-steps-0": cli_case(
        lambda e: b(e, e.bench_config(lambda c: c["samplers"][0].update(steps=0))), "steps", limit_s=20
    ),
    "bench-guidance-nan": cli_case(
        lambda e: b(e, e.bench_config(lambda c: c.update(guidance=NAN))), "guidance", limit_s=20
    ),
    "bench-out-is-a-file": cli_case(
        lambda e: ("bench", e.bench_config(), "--out", e.out / "notes.txt", "--device", "cpu"), "notes.txt"
    ),
    "bench-unknown-runtime": cli_case(lambda e: b(e, e.bench_config(), "--runtime", "fast"), "runtime"),
    # -------------------------------------------------------------------------------------------------- demo
    "demo-num-0": cli_case(lambda e: (*d(e), "--num", 0), "num", limit_s=20),
    "demo-steps-0": cli_case(lambda e: (*d(e), "--steps", 0), "steps", limit_s=20),
    "demo-guidance-nan": cli_case(lambda e: (*d(e), "--guidance", "nan"), "guidance", limit_s=20),
    "demo-unknown-model": cli_case(lambda e: (*d(e), "--model", "no-such-model"), "no-such-model", limit_s=20),
    "demo-unknown-runtime": cli_case(lambda e: (*d(e), "--runtime", "fast"), "runtime", limit_s=20),
    "demo-overwrite-user-folder": cli_case(
        lambda e: ("demo", "--out", e.user_folder(), "--overwrite", "--model", e.f["unet"], "--num", 8,
                   "--steps", 2, "--device", "cpu"),
        limit_s=20,
    ),
    # ------------------------------------------------------------------------------------------------- train
    "train-unknown-model": cli_case(lambda e: t(e, "--steps", 1, name="no-such-net"), "no-such-net"),
    "train-steps-0": cli_case(lambda e: t(e, "--steps", 0), "steps"),
    "train-lr-nan": cli_case(lambda e: t(e, "--steps", 1, "--lr", "nan"), "lr|learning rate"),
    "train-lr-0": cli_case(lambda e: t(e, "--steps", 1, "--lr", 0), "lr|learning rate"),
    "train-batch-size-0": cli_case(lambda e: t(e, "--steps", 1, "--batch-size", 0), "batch"),
    "train-ema-decay-2": cli_case(lambda e: t(e, "--steps", 1, "--ema-decay", 2), "ema"),
    "train-no-data-out-parent-missing": cli_case(
        lambda e: (*t(e, "--steps", 1)[:2], "--out", e.out / "new" / "model", *t(e, "--steps", 1)[4:]),
        "fashion-mnist|data",
    ),
    "train-init-from-missing": cli_case(lambda e: t(e, "--steps", 1, "--init-from", e.scratch / "nope"), "nope"),
    "train-out-is-a-file": cli_case(
        lambda e: (*t(e, "--steps", 1)[:2], "--out", e.out / "notes.txt", *t(e, "--steps", 1)[4:]), "file"
    ),
    # ------------------------------------------------------------------------------------------- sensitivity
    "sensitivity-unknown-per": cli_case(lambda e: sens(e, "--per", "row"), "--per"),
    "sensitivity-num-0": cli_case(lambda e: sens(e, "--num", 0), "num"),
    "sensitivity-unknown-scheme": cli_case(lambda e: sens(e, "--scheme", "w3a3"), "w3a3"),
    "sensitivity-unknown-outliers": cli_case(lambda e: sens(e, "--outliers", "sometimes"), "outlier"),
    "sensitivity-guidance-nan": cli_case(lambda e: sens(e, "--guidance", "nan"), "guidance"),
    "sensitivity-json-exists": cli_case(lambda e: sens(e, "--json", user_json(e)), "already exists"),
    # ------------------------------------------------------------------------------------------------- speed
    "speed-unknown-model": cli_case(lambda e: ("speed", "no-such-model"), "no-such-model"),
    "speed-unknown-scheme": cli_case(lambda e: ("speed", "--schemes", "w8a8,w3a3"), "w3a3"),
    "speed-batch-malformed": cli_case(lambda e: ("speed", "--batch", "1,x"), "--batch"),
    "speed-repeats-0": cli_case(lambda e: ("speed", "--repeats", 0), "repeats"),
    "speed-threads-0": cli_case(lambda e: ("speed", "--threads", 0), "threads"),
    "speed-json-exists": cli_case(lambda e: ("speed", "--json", user_json(e)), "already exists"),
    # ------------------------------------------------------------------------------------------------- usage
    "usage-unknown-command": cli_case(lambda e: ("quantise", e.f["unet"]), "quantise"),
    "usage-unknown-option": cli_case(lambda e: s(e, "--frobnicate"), "--frobnicate"),
    "usage-missing-out": cli_case(lambda e: ("sample", e.f["unet"]), "--out"),
    # ------------------------------------------------------------------------------------ Python API: config
    "api-from-scheme-unknown-scheme": api_case(lambda e: api_from_scheme("w3a3"), ConfigError, "w3a3"),
    "api-from-scheme-unknown-method": api_case(lambda e: api_from_scheme("w8a8", method="awq"), ConfigError, "awq"),
    "api-from-scheme-unknown-keyword": api_case(
        lambda e: api_from_scheme("w8a8", calib_stepz=2), ConfigError, "calib_stepz"
    ),
    "api-from-scheme-guard-db-nan": api_case(lambda e: api_from_scheme("w8a8", guard_db=NAN), ConfigError, "guard"),
    "api-from-scheme-recon-lr-nan": api_case(
        lambda e: api_from_scheme("w8a8", method="qdiffusion", recon_lr_round=NAN), ConfigError, "lr|learning rate"
    ),
    "api-from-scheme-recon-beta-inf": api_case(
        lambda e: api_from_scheme("w8a8", method="qdiffusion", recon_beta=(INF, 2.0)), ConfigError, "beta"
    ),
    "api-from-scheme-calib-per-step-0": api_case(
        lambda e: api_from_scheme("w8a8", calib_per_step=0), ConfigError, "calib"
    ),
    "api-from-dict-missing-formats": api_case(lambda e: api_from_dict({"scheme": "w8a8"}), ConfigError, "malformed"),
    # ---------------------------------------------------------------------------------- Python API: quantize
    "api-quantize-guidance-nan": api_case(lambda e: api_quantize(e.f["unet"], guidance=NAN), ConfigError, "guidance"),
    "api-quantize-labels-out-of-range": api_case(
        lambda e: api_quantize(e.f["unet"], labels=(0, 7)), ConfigError, "out of range"
    ),
    "api-quantize-batch-size-0": api_case(lambda e: api_quantize(e.f["unet"], batch_size=0), ConfigError, "batch"),
    "api-quantize-unknown-runtime": api_case(
        lambda e: api_quantize(e.f["unet"], runtime="fast"), ConfigError, "runtime"
    ),
    "api-quantize-cosine-scheduler": api_case(
        lambda e: api_quantize(e.edited("unet", "scheduler/scheduler_config.json", cosine)), QDiffuseError, "cosine"
    ),
    "api-quantize-already-quantized": api_case(
        lambda e: api_quantize_quantized(e.f["unet-q"]), ConfigError, "already quantized"
    ),
    "api-quantize-not-a-diffusion-model": api_case(
        lambda e: api_quantize_module(torch.nn.Linear(4, 4)), ConfigError, "Linear"
    ),
    "api-quantize-folder-out-is-the-input": api_case(
        lambda e: api_quantize_folder(m := e.copy("unet"), m), OutputError
    ),
    "api-quantize-folder-overwrite-user-folder": api_case(
        lambda e: api_quantize_folder(e.f["unet"], e.user_folder()), OutputError
    ),
    # ---------------------------------------------------------------------------------- Python API: sampling
    "api-sample-request-eta-nan": api_case(lambda e: api_request(eta=NAN), ConfigError, "eta"),
    "api-sample-request-guidance-inf": api_case(lambda e: api_request(guidance=INF), ConfigError, "guidance"),
    "api-sample-request-seed-negative": api_case(lambda e: api_request(seed=-1), ConfigError, "seed"),
    "api-sample-request-num-10^12": api_case(
        lambda e: api_request(num=1_000_000_000_000), ConfigError, "num"
    ),
    "api-sample-steps-100000": api_case(lambda e: api_sample(e.f["dit"], steps=100000), ConfigError, "steps"),
    "api-sample-cosine-scheduler": api_case(
        lambda e: api_sample(e.edited("dit", "scheduler/scheduler_config.json", cosine)), QDiffuseError, "cosine"
    ),
    # ----------------------------------------------------------------------------- Python API: loading folders
    "api-load-quantized-missing-folder": api_case(
        lambda e: api_load_quantized(e.scratch / "nope"), ModelLoadError, "nope"
    ),
    "api-load-quantized-safetensors-missing": api_case(
        lambda e: api_load_quantized(e.without("unet-q", "quantized.safetensors")), ModelLoadError,
        "quantized.safetensors",
    ),
    "api-load-quantized-weight-bits-4-to-8": api_case(
        lambda e: api_load_quantized(e.edited("unet-q", "quantization.json", weight_bits_8)), ModelLoadError,
        "bit|quantization.json|manifest",
    ),
    "api-load-quantized-layer-bits-4-to-2": api_case(
        lambda e: api_load_quantized(e.edited("unet-q", "quantization.json", layer_bits_2)), ModelLoadError,
        "bit|quantization.json|manifest",
    ),
    "api-load-quantized-layer-bits-4-to-2-simulated": api_case(
        lambda e: api_load_quantized(e.edited("unet-q", "quantization.json", layer_bits_2), runtime="simulated"),
        ModelLoadError,
        "bit|quantization.json|manifest",
    ),
    "api-load-quantized-weight-bits-4-to-8-unverified": api_case(
        lambda e: api_load_quantized(e.edited("unet-q", "quantization.json", weight_bits_8), verify=False),
        ModelLoadError,
        "bit|quantization.json|manifest",
    ),
    "api-load-quantized-layer-bits-4-to-2-unverified": api_case(
        lambda e: api_load_quantized(e.edited("unet-q", "quantization.json", layer_bits_2), verify=False),
        ModelLoadError,
        "bit|quantization.json|manifest",
    ),
    "api-load-quantized-unknown-runtime": api_case(
        lambda e: api_load_quantized(e.f["unet-q"], runtime="fast"), ConfigError, "runtime"
    ),
    "api-load-model-folder-config-missing": api_case(
        lambda e: api_load_model_folder(e.without("unet", "unet/config.json")), ModelLoadError, "config.json"
    ),
    "api-load-samples-not-npz": api_case(lambda e: api_load_samples(e.write("s.npz", "text")), DataError, "npz"),
    # --------------------------------------------------------------------------------- Python API: bench config
    "api-bench-config-missing": api_case(lambda e: api_bench_load(e.scratch / "none.json"), ConfigError, "exist"),
    "api-bench-config-is-a-folder": api_case(lambda e: api_bench_load(e.out / "old"), ConfigError, "bench config"),
    "api-bench-unknown-top-level-key": api_case(
        lambda e: api_bench_load(e.bench_config(lambda c: c.update(guidence=3.0))), ConfigError, "guidence"
    ),
    "api-bench-unknown-key-in-quant": api_case(
        lambda e: api_bench_load(e.bench_config(lambda c: c["quant"][0].update(lable="mine"))), ConfigError, "lable"
    ),
    "api-bench-num-2": api_case(lambda e: api_bench_load(e.bench_config(lambda c: c.update(num=2))), ConfigError,
                                "num"),
    "api-bench-unknown-scheme": api_case(
        lambda e: api_bench_load(e.bench_config(lambda c: c["quant"][0].update(scheme="w3a3"))), ConfigError, "w3a3"
    ),
}


def test_the_corpus_is_large_and_covers_every_command() -> None:
    names = list(CASES)
    assert len(names) >= 60
    for prefix in ("quantize", "sample", "eval", "info", "analyze", "bench", "demo", "train", "sensitivity",
                   "speed", "api"):
        assert sum(n.startswith(prefix + "-") for n in names) >= 3, prefix


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, inputs: dict[str, Path], tmp_path: Path, runner: Runner) -> None:
    case = CASES[name]
    env = make_env(inputs, tmp_path)
    target = case.build(env)
    watched = [tmp_path, *inputs.values()]
    before = snapshot(watched)
    if case.raises is not None:
        outcome = runner.api(target, case.limit_s)
        problems = outcome.api_problems(case)
    elif case.process:
        outcome = run_process(target, tmp_path, case.limit_s)
        problems = outcome.cli_problems(case)
    else:
        outcome = runner.cli(target, case.limit_s)
        problems = outcome.cli_problems(case)
    problems += disk_changes(before, snapshot(watched), tmp_path)
    assert not problems, f"{name} ({outcome.seconds:.1f} s): " + "; ".join(problems)


def test_the_harness_sees_work_and_outputs(inputs: dict[str, Path], tmp_path: Path, runner: Runner) -> None:
    """A good command through the same checks: exit 0, forward passes counted, its output seen as new."""
    env = make_env(inputs, tmp_path)
    before = snapshot([tmp_path])
    outcome = runner.cli(s(env, "-q"), 30)
    assert outcome.code == 0, outcome.stderr
    assert outcome.forwards == 3  # one batch of 2, 3 steps, no guidance
    assert disk_changes(before, snapshot([tmp_path]), tmp_path) == ["new on disk: out/s.npz"]
