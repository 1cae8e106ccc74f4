"""Fault injection against the command line: Ctrl-C and SIGKILL at seeded random times, and a full disk.

Every command runs as a real subprocess (``python -m qdiffuse.cli``, one thread). The fault points of a command
run in chains: a run is interrupted, everything is checked, and the next run of the chain is the rerun of the same
command (with ``--overwrite`` once an output exists); each chain ends with an uninterrupted rerun whose result
must equal a reference run's exactly. Delays are seeded fractions of the reference run's working time (until it
printed its result). After every fault:

* a target does not exist, or it is complete and equal to the reference run's (a quantized folder also loads);
* after Ctrl-C the exit code is 130 with exactly one ``error:`` line, no traceback and no hidden leftover;
* after SIGKILL the only leftovers are hidden temporaries named after a target (``.NAME.*``; bench lock files
  are left by uninterrupted runs too);
* files that existed next to the outputs are byte-identical, and an output that existed before an
  ``--overwrite`` run still exists afterwards (the old one or the new one).

Two points are placed, not drawn: the start-up point sends Ctrl-C while the start-up imports are inside
``import torch`` (a wrapper marks when they reach numpy), the end point just after a command printed
``wrote ...`` (the output is in place and the process is shutting down).

"Saving a quantized folder" is ``quantize --overwrite`` over an existing folder under a wrapper that makes the
disk slow: a pause after the weights file is written and after each rename next to the target, so each signal
lands once inside each phase of the save (the temporary folder being written, the old folder moved aside, the new
folder renamed into place).

The disk-full tests run ``quantize`` and ``sample`` on a size-limited tmpfs (root with mount permission) and,
without a mount, in-process with the writers made to fail with ENOSPC.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from tiny_models import save_folder, tiny_folder, tiny_quantized_folder

SEED = 1729
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RUN_TIMEOUT_S = 240.0
"""A run still going this long after its start is hung: it is killed and reported."""
SAVE_PAUSE_S = 0.5
"""The slow disk of the save wrapper: seconds after the weights file and after each rename next to the target."""
DISK_FULL = re.compile(r"disk is full|disk full|no space left|out of (disk )?space", re.IGNORECASE)
TIMING_KEYS = frozenset({"sample_seconds", "calibration_seconds", "calibration_peak_mib", "analysis_seconds"})
"""Bench row fields that measure time or memory: they differ between runs, every other field must not."""
CALIB = ("--calib-steps", "2", "--calib-per-step", "2", "--calib-inference-steps", "3", "--guard-db", "0")
SIGNALS = {"SIGINT": signal.SIGINT, "SIGKILL": signal.SIGKILL}

SAVE_WRAPPER = r"""
import os, sys, time

marker, pause, watched = os.environ["QDF_MARKER"], float(os.environ["QDF_PAUSE"]), os.environ["QDF_DIR"]
import safetensors.torch

_save_file, _replace = safetensors.torch.save_file, os.replace


def save_file(*args, **kwargs):
    open(marker, "w").close()  # the save begins
    result = _save_file(*args, **kwargs)
    time.sleep(pause)
    return result


def replace(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    if os.path.dirname(os.path.abspath(dst)) == watched:
        time.sleep(pause)


safetensors.torch.save_file = save_file
os.replace = replace
from qdiffuse.cli import entry

entry()  # what the qdiffuse executable runs
"""


IMPORT_WRAPPER = r"""
import os, sys

marker = os.environ["QDF_MARKER"]


def hook(event, args):
    if event == "import" and args[0] == "numpy" and not os.path.exists(marker):
        open(marker, "w").close()  # the imports have reached numpy (torch initialises it)


sys.addaudithook(hook)
from qdiffuse.cli import entry

entry()  # what the qdiffuse executable runs
"""
"""``python -m qdiffuse.cli`` that marks when the start-up imports reach numpy, for the start-up point."""


# ------------------------------------------------------------------------------------------------ subprocesses

_live: set[subprocess.Popen[bytes]] = set()
_live_lock = threading.Lock()
_load_lock = threading.Lock()


@dataclass
class Result:
    rc: int | None
    """Exit code (negative: killed by that signal); None when it hung and was killed."""
    stdout: str
    stderr: str
    seconds: float
    signalled: bool
    """Whether the signal was sent while the process was still running."""
    work_seconds: float | None = None
    """When its first line on stdout came (the command's work is done: ``wrote ...``, the bench table)."""
    signal_seconds: float | None = None
    """When the signal was sent."""


def run_cli(
    args: list[str],
    cwd: Path,
    log: Path,
    sig: int | None = None,
    delay: float = 0.0,
    anchor: Callable[[Path], bool] | None = None,
    env: dict[str, str] | None = None,
) -> Result:
    """Run ``python ARGS``; with ``sig``, send it ``delay`` seconds after the start, or after ``anchor(stdout file)``
    first holds."""
    out_path, err_path = log.with_name(log.name + ".out"), log.with_name(log.name + ".err")
    signalled, work_seconds, signal_seconds, rc = False, None, None, None
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=cwd, env={**CHILD_ENV, **(env or {})}, stdin=subprocess.DEVNULL,
            stdout=out, stderr=err, start_new_session=True,
        )
        with _live_lock:
            _live.add(proc)
        signal_at = start + delay if sig is not None and anchor is None else None
        try:
            while (rc := proc.poll()) is None and time.monotonic() - start < RUN_TIMEOUT_S:
                now = time.monotonic()
                if work_seconds is None and out_path.stat().st_size > 0:
                    work_seconds = now - start
                if sig is not None and not signalled:
                    if signal_at is None and anchor is not None and anchor(out_path):
                        signal_at = now + delay
                    if signal_at is not None and now >= signal_at:
                        proc.send_signal(sig)
                        signalled, signal_seconds = True, now - start
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            with _live_lock:
                _live.discard(proc)
        seconds = time.monotonic() - start
    return Result(
        rc, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"), seconds, signalled,
        work_seconds, signal_seconds,
    )


def kill_leftover_processes() -> None:
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def tail(text: str, lines: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "(empty)"


# ----------------------------------------------------------------------------------------------- file checks


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digest_tree(root: Path, paths: list[Path]) -> dict[str, str]:
    """SHA-256 of every file under ``paths``, by path relative to ``root``."""
    out: dict[str, str] = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            out[f.relative_to(root).as_posix()] = sha256(f)
    return out


def hidden_entries(root: Path) -> set[str]:
    """Relative paths of the hidden entries under ``root``, not looking inside hidden folders."""
    found: set[str] = set()
    if not root.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        found.update((rel / name).as_posix() for name in [*dirnames, *filenames] if name.startswith("."))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return found


def visible_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def named_after_target(rel: str, reference: Path) -> bool:
    """Whether hidden ``rel`` is a temporary of an output: ``.NAME.*`` or ``.STEM.*`` of an entry the
    reference run left in the same folder."""
    parent, name = Path(rel).parent, Path(rel).name
    folder = reference / parent
    if not folder.is_dir():
        return False
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        bases = {entry.name, entry.name.rsplit(".", 1)[0]}
        if any(name.startswith(f".{base}.") for base in bases):
            return True
    return False


def compare_arrays(a: Path, b: Path) -> str | None:
    try:
        with np.load(a) as fa:
            got = {k: fa[k] for k in fa.files}
    except Exception as exc:  # a partial file fails in many ways
        return f"cannot be loaded ({type(exc).__name__}: {exc})"
    with np.load(b) as fb:
        want = {k: fb[k] for k in fb.files}
    if got.keys() != want.keys():
        return f"holds arrays {sorted(got)}, an uninterrupted run's {sorted(want)}"
    for k in want:
        if got[k].dtype != want[k].dtype or not np.array_equal(got[k], want[k]):
            return f"array {k} differs from an uninterrupted run's"
    return None


def without_timing(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def compare_file(a: Path, b: Path) -> str | None:
    """None when ``a`` holds what the reference ``b`` holds (tensors, arrays, JSON values, else bytes)."""
    if a.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            got = load_file(str(a))
        except Exception as exc:
            return f"cannot be read ({type(exc).__name__}: {exc})"
        want = load_file(str(b))
        if got.keys() != want.keys():
            return "holds other tensors than an uninterrupted run's"
        bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
        return f"tensors differ: {bad[:3]}" if bad else None
    if a.suffix == ".npz":
        return compare_arrays(a, b)
    if a.suffix == ".json":
        try:
            got = json.loads(a.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            return f"is not complete JSON ({exc})"
        want = json.loads(b.read_text())
        if isinstance(want, dict) and "rows" in want and "meta" in want:  # bench results: no dates or timings
            got = [without_timing(r) for r in got.get("rows", [])] if isinstance(got, dict) else got
            want = [without_timing(r) for r in want["rows"]]
        elif isinstance(want, dict) and "fid" in want:  # a bench cell
            got, want = without_timing(got) if isinstance(got, dict) else got, without_timing(want)
        elif a.name.endswith(".time.json"):  # calibration cost of a bench model: seconds and MiB
            return None if isinstance(got, dict) and set(got) == set(want) else "is not a calibration cost record"
        return None if got == want else "differs from an uninterrupted run's"
    if a.name == "results.md":  # dates and timings in it; its shape is what a partial write breaks
        n_got, n_want = len(a.read_text().splitlines()), len(b.read_text().splitlines())
        return None if n_got == n_want else f"has {n_got} lines, an uninterrupted run's {n_want}"
    return None if a.read_bytes() == b.read_bytes() else "differs byte for byte from an uninterrupted run's"


def compare_quantized(a: Path, b: Path) -> list[str]:
    """Problems with quantized folder ``a`` against the reference ``b``: its files, their content, and loading."""
    if not a.is_dir():
        return [f"{a.name} is not a folder"]
    files_a = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    if files_a != files_b:
        return [f"{a.name} is incomplete: missing {sorted(files_b - files_a)}, extra {sorted(files_a - files_b)}"]
    problems = [f"{a.name}/{rel} {why}" for rel in sorted(files_b) if (why := compare_file(a / rel, b / rel))]
    if not problems:
        from qdiffuse.io import load_quantized

        try:
            with _load_lock:  # building a model patches torch.nn.Module globally: one load at a time
                load_quantized(a, "cpu", runtime="simulated")
        except Exception as exc:
            problems.append(f"{a.name} does not load ({type(exc).__name__}: {exc})")
    return problems


# -------------------------------------------------------------------------------------------------- families


@dataclass
class Family:
    """One command under test: how to run it in a workspace and how to check its outputs there."""

    name: str
    targets: tuple[str, ...]
    """Outputs, relative to the workspace."""
    argv: Callable[[Path, bool], list[str]]
    """Arguments after ``python`` for a workspace, with or without ``--overwrite``."""
    check: Callable[[Path, Path], list[str]]
    """Problems with whatever outputs exist in a workspace, against the reference workspace."""
    setup: Callable[[Path], list[Path]]
    """Make the inputs and neighbour files of a workspace; returns the neighbours."""

    def complete(self, w: Path, ref: Path) -> list[str]:
        missing = [t for t in self.targets if not (w / t).exists()]
        return [f"{t} is missing after an uninterrupted rerun" for t in missing] + self.check(w, ref)


def neighbours(w: Path, seed: int) -> list[Path]:
    """Files a user already has next to the outputs: they must never change."""
    rng = np.random.default_rng(seed)
    w.mkdir(parents=True, exist_ok=True)
    (w / "keep.txt").write_text(f"notes {rng.integers(1 << 30)}\n")
    with open(w / "keep.npz", "wb") as f:
        np.savez(f, arr_0=rng.integers(0, 255, (2, 8, 8, 1), dtype=np.uint8))
    (w / "keep").mkdir(exist_ok=True)
    (w / "keep" / "blob.bin").write_bytes(rng.bytes(5000))
    return [w / "keep.txt", w / "keep.npz", w / "keep"]


def quantize_args(model: Path, out: Path, overwrite: bool) -> list[str]:
    return [
        "quantize", str(model), "--out", str(out), "--scheme", "w8a8", *CALIB, "--outliers", "off", "--seed", "0",
        "--device", "cpu", "-q", *(["--overwrite"] if overwrite else []),
    ]


def check_quantized_target(w: Path, ref: Path) -> list[str]:
    return compare_quantized(w / "q", ref / "q") if (w / "q").exists() else []


def check_samples(w: Path, ref: Path) -> list[str]:
    problems = []
    for name in ("s.npz", "g.png"):
        if (w / name).exists() and (why := compare_file(w / name, ref / name)):
            problems.append(f"{name} {why}")
    return problems


def check_bench(w: Path, ref: Path) -> list[str]:
    run, ref_run = w / "run", ref / "run"
    if not run.exists():
        return []
    problems = []
    for path in visible_files(run):
        rel = path.relative_to(run)
        if rel.as_posix() == "notes.txt" or (rel.parts[0] == "models" and len(rel.parts) > 2):
            continue  # the user's file; files in a model folder are compared with the folder below
        if not (ref_run / rel).exists():
            problems.append(f"run/{rel.as_posix()} is not in an uninterrupted run's output")
        elif why := compare_file(path, ref_run / rel):
            problems.append(f"run/{rel.as_posix()} {why}")
    models = run / "models"
    for folder in sorted(models.iterdir()) if models.is_dir() else []:
        if folder.is_dir() and not folder.name.startswith("."):
            problems += [f"run/models/{p}" for p in compare_quantized(folder, ref_run / "models" / folder.name)]
    return problems


def tiny_32(root: Path) -> Path:
    """A 32x32 class-conditional UNet folder: the size the bench's Fashion-MNIST classifier takes."""
    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=11,
    )
    return save_folder(model, root, {"num_classes": 10, "null_class": 10})


def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    unet = tiny_folder("unet", tmp_path_factory)
    quantized = tiny_quantized_folder("unet", "w8a8", tmp_path_factory)
    bench_model = tiny_32(tmp_path_factory.mktemp("bench-model") / "m32")
    bench_config = {
        "name": "faults", "models": [str(bench_model)], "samplers": [{"sampler": "ddim", "steps": 3, "eta": 0.0}],
        "quant": [{"scheme": "w8a8", "method": "minmax"}], "num": 4, "batch_size": 4, "analysis_num": 4,
        "calib": {"calib_steps": 2, "calib_per_step": 2, "calib_num_inference_steps": 3, "guard_db": 0,
                  "outliers": "off"},
    }

    def bench_setup(w: Path) -> list[Path]:
        kept = neighbours(w, SEED)
        (w / "bench.json").write_text(json.dumps(bench_config))
        (w / "run").mkdir()
        (w / "run" / "notes.txt").write_text("my notes about this benchmark\n")
        return [*kept, w / "bench.json", w / "run" / "notes.txt"]

    def sample_args(w: Path, overwrite: bool) -> list[str]:
        return [
            "-m", "qdiffuse.cli", "sample", str(quantized), "--out", str(w / "s.npz"), "--grid", str(w / "g.png"),
            "--num", "4", "--steps", "3", "--seed", "0", "--device", "cpu", "-q",
            *(["--overwrite"] if overwrite else []),
        ]

    plain = lambda w: neighbours(w, SEED)  # noqa: E731
    return {
        "quantize": Family(
            "quantize", ("q",), lambda w, o: ["-m", "qdiffuse.cli", *quantize_args(unet, w / "q", o)],
            check_quantized_target, plain,
        ),
        "sample": Family("sample", ("s.npz", "g.png"), sample_args, check_samples, plain),
        "bench": Family(
            "bench", ("run",), lambda w, o: ["-m", "qdiffuse.cli", "bench", str(w / "bench.json"), "--out",
                                             str(w / "run"), "--device", "cpu", "-q"],
            check_bench, bench_setup,
        ),
        "save": Family(
            "save", ("q",), lambda w, o: ["-c", SAVE_WRAPPER, *quantize_args(unet, w / "q", o)],
            check_quantized_target, plain,
        ),
    }


# ---------------------------------------------------------------------------------------------------- points

END_DELAY_S = 0.05
"""The end point: SIGINT this long after the command printed ``wrote ...`` (its output is in place)."""
STARTUP_DELAY_S = 0.03
"""The start-up point: SIGINT this long after the start-up imports reached numpy (while torch initialises it)."""


@dataclass
class Point:
    family: str
    chain: int
    signal: str
    fraction: float
    """anchor "start": of the reference run's working time (until its first line on stdout); "save": of
    SAVE_PAUSE_S after the save began (the integer part is the phase: 0 writing the temporary folder, 1 old folder
    moved aside, 2 new folder in place); "wrote" and "startup": unused (END_DELAY_S, STARTUP_DELAY_S)."""
    anchor: str = "start"
    delay: float = 0.0
    target_existed: bool = False
    restored: bool = False
    rc: int | None = None
    exit_after: float = 0.0
    outcome: str = ""
    stdout: str = ""
    stderr: str = ""
    after: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.anchor == "save":
            phase = ("writing the temporary folder", "old folder moved aside", "new folder renamed in place")
            where = f"after the save began ({phase[int(self.fraction)]})"
        elif self.anchor == "wrote":
            where = "after it printed 'wrote ...'"
        elif self.anchor == "startup":
            where = "after the start-up imports reached numpy (inside `import torch`)"
        else:
            where = f"after start ({self.fraction:.0%} of an uninterrupted run's work)"
        before = (", previous output restored" if self.restored else "") + (
            "" if not self.target_existed else ", resuming" if self.family == "bench" else ", over an existing output"
        )
        text = (
            f"{self.family} (chain {self.chain}{before}): {self.signal} {self.delay:.2f} s {where} -> exit {self.rc} "
            f"at {self.exit_after:.1f} s, {self.outcome}; outputs after: {self.after or 'none'}"
        )
        if self.leftovers:
            text += f"; hidden leftovers {self.leftovers}"
        if self.problems:
            text += "\n      PROBLEMS: " + "\n                ".join(self.problems)
            text += f"\n      stdout: {tail(self.stdout, 2)}\n      stderr: {tail(self.stderr)}"
        return text


CHAINS = {"quantize": (1, 6), "sample": (2, 3), "bench": (4, 1)}
"""Chains and random points per chain. Quantize and sample also get the start-up and the end point, the save its
six phase x signal points: 26 fault points in all. Bench points are one per chain: a rerun resumes, so it is
shorter than the reference run the delays are drawn against."""


def plan(family: str) -> list[list[Point]]:
    """Seeded points. Saves: each phase x signal once, in random order, at a random time inside the phase. Others:
    fractions of the reference's working time stratified over the run, signals balanced and shuffled, each chain
    every ``chains``-th stratum. Quantize and sample begin with the start-up point and end with the end point;
    sample then goes on with its second chain's points over the outputs the end point left."""
    rng = random.Random(f"{SEED}-{family}")
    if family == "save":
        combos = [(phase, sig) for phase in range(3) for sig in SIGNALS]
        rng.shuffle(combos)
        return [[Point("save", 0, sig, phase + rng.uniform(0.2, 0.8), "save") for phase, sig in combos]]
    chains, per_chain = CHAINS[family]
    n = chains * per_chain
    fractions = [0.03 + (i + rng.random()) / n * 0.97 for i in range(n)]
    signals = []
    for _ in range((n + 1) // 2):  # each pair of neighbouring strata: one of each, in random order
        signals += rng.sample(list(SIGNALS), 2)
    signals = signals[:n]
    points = [Point(family, i % chains, s, f) for i, (s, f) in enumerate(zip(signals, fractions, strict=True))]
    planned = [[p for p in points if p.chain == c] for c in range(chains)]
    startup, end = Point(family, 0, "SIGINT", 0.0, "startup"), Point(family, 0, "SIGINT", 0.0, "wrote")
    if family == "quantize":
        planned[0] = [startup, *planned[0], end]
    if family == "sample":  # one workspace: start-up, three points, the end point, three points over its outputs
        planned = [[startup, *planned[0], end, *(replace(p, chain=0) for p in planned[1])]]
    return planned


def printed_wrote(stdout: Path) -> bool:
    try:
        return "wrote " in stdout.read_text(errors="replace")
    except OSError:
        return False


def check_exit(point: Point, result: Result) -> None:
    errors, traceback = error_lines(result.stderr), "Traceback" in result.stderr
    point.rc, point.stdout, point.stderr, point.exit_after = result.rc, result.stdout, result.stderr, result.seconds
    if result.rc is None:
        point.outcome = "hung"
        point.problems.append(f"still running {RUN_TIMEOUT_S:.0f} s after its start (killed)")
        return
    if not result.signalled:
        point.outcome = "finished before the signal"
        if result.rc != 0 or errors or traceback:
            point.problems.append(f"the run itself failed (exit {result.rc})")
        return
    if point.signal == "SIGKILL":
        point.outcome = "killed" if result.rc == -signal.SIGKILL else "not killed"
        if result.rc not in (-signal.SIGKILL, 0):
            point.problems.append(f"exit {result.rc} after SIGKILL")
        return
    if result.rc == 0 and not errors and not traceback:
        assert result.signal_seconds is not None
        if result.work_seconds is not None and result.work_seconds > result.signal_seconds + 0.1:
            point.outcome = "exited 0: the Ctrl-C was lost"
            point.problems.append(
                f"the SIGINT was ignored: the command went on, printed its result "
                f"{result.work_seconds - result.signal_seconds:.1f} s after it and exited 0"
            )
        else:
            point.outcome = "exited 0 (the signal came as it finished)"
        return
    point.outcome = "interrupted"
    if result.rc == -signal.SIGINT:
        point.outcome = "died of the SIGINT"
        after = "after printing its error line" if errors else "without a word"
        point.problems.append(
            f"the process died of the SIGINT itself (returncode -2, shell status 130) {after} instead of exiting "
            "130: the signal came during interpreter shutdown (SIGINT back to its default), or CPython's "
            "'unhandled KeyboardInterrupt' flag was set (Ctrl-C inside an exec/eval of a string, e.g. while a "
            "dataclass is built) and `python -m` re-raises SIGINT at exit even though main() handled it"
        )
    elif result.rc != 130:
        point.problems.append(f"exit {result.rc} after SIGINT (expected 130)")
    if len(errors) != 1:
        point.problems.append(f"{len(errors)} 'error:' lines on stderr after SIGINT (expected exactly 1)")
    if traceback:
        point.problems.append("a traceback on stderr after SIGINT")


@dataclass
class Reference:
    workspace: Path
    seconds: float


def reference_run(family: Family, root: Path) -> Reference:
    w = root / "ws"
    family.setup(w)
    result = run_cli(family.argv(w, False), w, root / "run")
    if result.rc != 0 or result.work_seconds is None:
        raise AssertionError(f"uninterrupted {family.name} failed (exit {result.rc}): {result.stderr[-3000:]}")
    return Reference(w, result.work_seconds)


def run_chain(family: Family, points: list[Point], reference: Future[Reference], root: Path) -> list[str]:
    """Run the points of one chain in a fresh workspace, then the final rerun; returns the final rerun's problems.

    Each run is the rerun of the one before (``--overwrite`` once an output exists). The save chain always runs
    over an existing folder: a copy of the reference's, put back before a point when a fault lost it.
    """
    ref = reference.result()
    w = root / "ws"
    kept = family.setup(w)
    kept_digest = digest_tree(w, kept)
    expected_top = {p.relative_to(w).parts[0] for p in kept} | set(family.targets)
    save_env = {"QDF_PAUSE": str(SAVE_PAUSE_S), "QDF_DIR": str(w)}

    def overwrite() -> bool:
        return any((w / t).exists() for t in family.targets)

    for k, point in enumerate(points):
        if point.anchor == "save" and not (w / "q").exists():
            shutil.copytree(ref.workspace / "q", w / "q")
            point.restored = k > 0
        before = {t for t in family.targets if (w / t).exists()}
        point.target_existed = bool(before)
        if family.name == "bench":  # its folder always exists (the user's notes are in it): finished cells?
            point.target_existed = any((w / "run" / "cells").glob("[!.]*.json"))
        hidden_before = hidden_entries(w)
        marker = root / f"save-began-{k}"
        anchor: Callable[[Path], bool] | None = None
        if point.anchor == "save":
            point.delay = point.fraction * SAVE_PAUSE_S
            anchor = lambda _, marker=marker: marker.exists()  # noqa: E731
        elif point.anchor == "wrote":
            point.delay, anchor = END_DELAY_S, printed_wrote
        elif point.anchor == "startup":
            point.delay = STARTUP_DELAY_S
            anchor = lambda _, marker=marker: marker.exists()  # noqa: E731
        else:
            point.delay = point.fraction * ref.seconds
        args = family.argv(w, overwrite())
        if point.anchor == "startup":
            assert args[:2] == ["-m", "qdiffuse.cli"]
            args = ["-c", IMPORT_WRAPPER, *args[2:]]
        result = run_cli(
            args, w, root / f"point-{k}", SIGNALS[point.signal], point.delay, anchor,
            {**save_env, "QDF_MARKER": str(marker)},
        )
        check_exit(point, result)
        point.after = [t for t in family.targets if (w / t).exists()]
        point.problems += family.check(w, ref.workspace)
        lost = sorted(t for t in before if not (w / t).exists())
        if lost:
            point.problems.append(f"the existing output {lost} was removed and not replaced (lost from its path)")
        new_hidden = sorted(hidden_entries(w) - hidden_before - hidden_entries(ref.workspace))
        point.leftovers = new_hidden
        if point.signal == "SIGINT" and new_hidden:
            point.problems.append(f"hidden leftovers after SIGINT: {new_hidden}")
        stray = [h for h in new_hidden if not named_after_target(h, ref.workspace)]
        if point.signal == "SIGKILL" and stray:
            point.problems.append(f"leftovers not named as a hidden temporary of an output: {stray}")
        visible = {p.name for p in w.iterdir() if not p.name.startswith(".")} - expected_top
        if visible:
            point.problems.append(f"unexpected visible entries next to the outputs: {sorted(visible)}")
        if digest_tree(w, kept) != kept_digest:
            point.problems.append("files that existed next to the outputs changed")
    final = run_cli(
        family.argv(w, overwrite()), w, root / "final", env={**save_env, "QDF_MARKER": str(root / "save-final")}
    )
    problems = []
    if final.rc != 0 or error_lines(final.stderr) or "Traceback" in final.stderr:
        problems.append(f"the rerun failed (exit {final.rc}): {tail(final.stderr)}")
    else:
        problems += family.complete(w, ref.workspace)
    if digest_tree(w, kept) != kept_digest:
        problems.append("files that existed next to the outputs changed by the rerun")
    return problems


@dataclass
class Outcome:
    points: list[Point]
    rerun_problems: list[str]
    reference_seconds: float

    def report(self) -> str:
        lines = [p.describe() for p in self.points]
        return "\n".join([*lines, *(f"rerun: {p}" for p in self.rerun_problems)])

    def failures(self) -> str:
        bad = [p.describe() for p in self.points if p.problems]
        return "\n".join([*bad, *(f"rerun after the faults: {p}" for p in self.rerun_problems)])


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    """Run every fault point of every family (two processes at a time, one thread each) and collect the outcomes."""
    fams = families(tmp_path_factory)
    plans = {name: plan(name) for name in fams}
    old_int = signal.getsignal(signal.SIGINT)
    if old_int == signal.SIG_IGN:  # children would inherit an ignored SIGINT; Ctrl-C must reach them
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            refs: dict[str, Future[Reference]] = {}
            for name in ("quantize", "bench", "sample"):
                refs[name] = pool.submit(reference_run, fams[name], tmp_path_factory.mktemp(f"ref-{name}"))
            refs["save"] = refs["quantize"]  # the save wrapper only slows the disk: same command, same folder
            chains: dict[str, list[Future[list[str]]]] = {name: [] for name in fams}
            for name in ("save", "quantize", "sample", "bench"):  # longest first
                for c, points in enumerate(plans[name]):
                    root = tmp_path_factory.mktemp(f"faults-{name}-{c}")
                    chains[name].append(pool.submit(run_chain, fams[name], points, refs[name], root))
            outcomes = {}
            for name in fams:
                rerun = [f"chain {c}: {p}" for c, future in enumerate(chains[name]) for p in future.result()]
                points = [p for chain in plans[name] for p in chain]
                outcomes[name] = Outcome(points, rerun, refs[name].result().seconds)
    finally:
        kill_leftover_processes()
        signal.signal(signal.SIGINT, old_int)
    yield outcomes


@pytest.mark.parametrize("name", ["quantize", "sample", "bench", "save"])
def test_interrupted_and_killed_runs_leave_no_partial_output(name: str, faults: dict[str, Outcome]) -> None:
    outcome = faults[name]
    print(f"\n{name}: uninterrupted run works {outcome.reference_seconds:.1f} s\n{outcome.report()}")
    assert sum(len(o.points) for o in faults.values()) >= 20
    failures = outcome.failures()
    assert not failures, f"{name} under SIGINT/SIGKILL:\n{failures}"


# ------------------------------------------------------------------------------------------------- disk full


def check_disk_full(code: object, stderr: str, folder: Path, target: Path) -> list[str]:
    problems = []
    errors = error_lines(stderr)
    if code != 2:
        problems.append(f"exit {code} (expected 2)")
    if len(errors) != 1 or not DISK_FULL.search(errors[0] if errors else ""):
        problems.append(f"stderr should be one 'error:' line saying the disk is full, got: {tail(stderr, 4)}")
    if "Traceback" in stderr:
        problems.append("a traceback on stderr")
    if target.exists():
        problems.append(f"{target.name} was left behind")
    hidden = sorted(hidden_entries(folder))
    if hidden:
        problems.append(f"hidden leftovers {hidden}")
    return problems


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount size-limited tmpfs folders (skips without root and mount permission); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        path = tmp_path / f"tmpfs-{len(mounted)}"
        path.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command: cannot make a small tmpfs to fill up")
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True,
            timeout=30,
        )
        if res.returncode != 0:
            pytest.skip(f"cannot mount a size-limited tmpfs (needs root and mount permission): {res.stderr.strip()}")
        mounted.append(path)
        return path

    try:
        yield mount
    finally:
        kill_leftover_processes()
        for path in mounted:
            if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill(folder: Path, leave: int) -> tuple[Path, str]:
    """Fill ``folder``'s file system with a neighbour file until only ``leave`` bytes are free."""
    stat = os.statvfs(folder)
    data = random.Random(SEED).randbytes(max(0, stat.f_bavail * stat.f_frsize - leave))
    (folder / "keep.bin").write_bytes(data)
    return folder / "keep.bin", hashlib.sha256(data).hexdigest()


def test_disk_full_on_a_small_tmpfs(
    small_tmpfs: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """quantize and sample writing to a tmpfs too small for their output: one line, exit 2, nothing left."""
    unet = tiny_folder("unet", tmp_path_factory)
    quantized = tiny_quantized_folder("unet", "w8a8", tmp_path_factory)
    q_dir, s_dir = small_tmpfs("256k"), small_tmpfs("256k")
    q_keep, q_digest = fill(q_dir, 64 * 1024)  # the weights file alone is about 240 KiB
    s_keep, s_digest = fill(s_dir, 8 * 1024)  # 64 images of 16x16: 16 KiB
    jobs = {
        "quantize": (["-m", "qdiffuse.cli", *quantize_args(unet, q_dir / "q", False)], q_dir, q_dir / "q"),
        "sample": (
            ["-m", "qdiffuse.cli", "sample", str(quantized), "--out", str(s_dir / "s.npz"), "--num", "64", "--steps",
             "2", "--device", "cpu", "-q"],
            s_dir, s_dir / "s.npz",
        ),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {n: pool.submit(run_cli, args, tmp_path, tmp_path / n) for n, (args, _, _) in jobs.items()}
        results = {n: f.result() for n, f in futures.items()}
    problems = []
    for name, (_, folder, target) in jobs.items():
        res = results[name]
        problems += [f"{name}: {p}" for p in check_disk_full(res.rc, res.stderr, folder, target)]
    for name, (keep, digest) in {"quantize": (q_keep, q_digest), "sample": (s_keep, s_digest)}.items():
        if sha256(keep) != digest:
            problems.append(f"{name}: the file that filled the disk changed")
        extra = sorted(p.name for p in keep.parent.iterdir() if p != keep and not p.name.startswith("."))
        if extra:
            problems.append(f"{name}: left {extra}")
    assert not problems, "full disk:\n" + "\n".join(problems)


def _no_space(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("command", ["quantize", "sample"])
def test_disk_full_in_process(
    command: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same without a mount: the writers fill the disk part way through (OSError ENOSPC)."""
    import safetensors.torch

    from qdiffuse import cli

    def save_file(tensors: object, filename: str, *args: object, **kwargs: object) -> None:
        Path(filename).write_bytes(bytes(4096))
        raise _no_space(filename)

    def savez(file: Any, *args: object, **kwds: object) -> None:
        if hasattr(file, "write"):
            file.write(b"PK\x03\x04" + bytes(60))
            raise _no_space(getattr(file, "name", file))
        Path(file).write_bytes(b"PK\x03\x04" + bytes(60))
        raise _no_space(file)

    kept = neighbours(tmp_path, SEED)
    digest = digest_tree(tmp_path, kept)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(np, "savez", savez)
    monkeypatch.setattr(np, "savez_compressed", savez)
    if command == "quantize":
        target = tmp_path / "q"
        args = quantize_args(tiny_folder("unet", tmp_path_factory), target, False)
    else:
        target = tmp_path / "s.npz"
        model = tiny_quantized_folder("unet", "w8a8", tmp_path_factory)
        args = ["sample", str(model), "--out", str(target), "--num", "4", "--steps", "3", "--device", "cpu", "-q"]
    monkeypatch.setattr(sys, "argv", ["qdiffuse", *args])
    old_term = signal.getsignal(signal.SIGTERM)
    code: object = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code
    except Exception as exc:  # what a user would see as a traceback
        pytest.fail(f"{command} on a full disk: {type(exc).__name__} escaped main() (a traceback): {exc}")
    finally:
        signal.signal(signal.SIGTERM, old_term)
    problems = check_disk_full(code, capsys.readouterr().err, tmp_path, target)
    if digest_tree(tmp_path, kept) != digest:
        problems.append("files that existed next to the output changed")
    assert not problems, f"{command} on a full disk:\n" + "\n".join(problems)
