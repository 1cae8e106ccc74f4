"""torchrun on the CPU (gloo): the same npz as one process at world sizes 2 and 3, a killed rank resumed at another
world size, eval's metrics across ranks, a bench grid across ranks, and bad launches that fail on every rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import tiny_folder

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SAMPLE = ("--num", 10, "--batch-size", 3, "--steps", 3, "--labels", "0-2", "-q")  # 4 batches, the last of 1


def qdiffuse(*args: object, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "qdiffuse"), *map(str, args)], env=env or ENV, capture_output=True, text=True, timeout=timeout
    )


def torchrun(nproc: int, *args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        # "--" ends torchrun's own options: it would take --num for an abbreviation of its --numa-binding
        [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}", "--no-python", "--",
         str(BIN / "qdiffuse"), *map(str, args)],
        env=env or ENV, capture_output=True, text=True, timeout=300,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def same_npz(a: Path, b: Path) -> bool:
    with np.load(a) as x, np.load(b) as y:
        return sorted(x.files) == sorted(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_folder("unet", tmp_path_factory)


@pytest.fixture(scope="module")
def one_process(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "one.npz"
    res = qdiffuse("sample", folder, "--out", out, *SAMPLE)
    assert res.returncode == 0, res.stderr
    return out


def test_two_ranks_assemble_the_one_process_npz(folder: Path, one_process: Path, tmp_path: Path) -> None:
    """(World size 3 on these 4 batches is the resumed run of the next test.)"""
    out = tmp_path / "d.npz"
    res = torchrun(2, "sample", folder, "--out", out, *SAMPLE)
    assert res.returncode == 0, res.stderr[-2000:]
    assert same_npz(out, one_process)
    assert res.stdout.count("wrote") == 1  # rank 0 alone reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]  # shards removed


KILL_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import qdiffuse.distributed.sampling as sampling
    save = sampling._save_shard
    def _save_then_die(path, *args):
        save(path, *args)
        os.kill(os.getpid(), 9)
    sampling._save_shard = _save_then_die
"""


def test_killed_rank_then_rerun_at_another_world_size(folder: Path, one_process: Path, tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_RANK_1)
    out = tmp_path / "out" / "d.npz"
    out.parent.mkdir()
    killed = torchrun(2, "sample", folder, "--out", out, *SAMPLE, env={**ENV, "PYTHONPATH": str(hook)})
    assert killed.returncode != 0
    assert not out.exists()
    shards = out.parent / ".d.npz.shards"
    assert (shards / "batch_0000001.npz").is_file()  # rank 1's one finished batch survives
    res = torchrun(3, "sample", folder, "--out", out, *SAMPLE)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed" in res.stdout
    assert same_npz(out, one_process)
    assert not shards.exists()


def test_shards_of_another_command_are_refused(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.npz"
    shards = tmp_path / ".d.npz.shards"
    shards.mkdir()
    (shards / "shards.json").write_text(json.dumps({"model": "another"}))
    res = torchrun(2, "sample", folder, "--out", out, *SAMPLE)
    assert res.returncode != 0 and not out.exists()
    lines = error_lines(res.stderr)
    assert lines and all("holds batches of another sampling command" in line for line in lines)


def test_eval_across_ranks_matches_one_process(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(30, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=images, labels=np.arange(30) % 10)
    one = qdiffuse("eval", tmp_path / "s.npz", "--json", tmp_path / "one.json")
    assert one.returncode == 0, one.stderr
    two = torchrun(2, "eval", tmp_path / "s.npz", "--json", tmp_path / "two.json")
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert set(a) == set(b)
    for key in ("fid", "sfid", "kid_mean", "precision", "recall", "label_accuracy", "inception_score"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, size: int, port: int) -> dict:
    return {**ENV, "RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "QDIFFUSE_DIST_TIMEOUT": "20"}


def test_no_rendezvous_is_one_line(folder: Path, tmp_path: Path) -> None:
    env = {**_rank_env(0, 2, _free_port()), "QDIFFUSE_DIST_TIMEOUT": "3"}
    res = qdiffuse("sample", folder, "--out", tmp_path / "d.npz", *SAMPLE, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(error_lines(res.stderr)) == 1 and "could not join the 2-process group" in res.stderr
    assert "Traceback" not in res.stderr and list(tmp_path.iterdir()) == []


def test_mismatched_arguments_fail_on_every_rank(folder: Path, tmp_path: Path) -> None:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [str(BIN / "qdiffuse"), "sample", str(folder), "--out", str(tmp_path / "d.npz"), "--num", str(num),
             "--steps", "2", "-q"],
            env=_rank_env(rank, 2, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank, num in ((0, 6), (1, 8))
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 2, err[-2000:]
        lines = error_lines(err)
        assert len(lines) == 1 and "different commands: num is 6 on rank 0 and 8 on rank 1" in lines[0]
    assert list(tmp_path.iterdir()) == []


TIMING = ("sample_seconds", "calibration_seconds", "calibration_peak_mib", "analysis_seconds", "runtime")


def test_bench_across_ranks_gives_the_one_process_rows(tmp_path: Path) -> None:
    from test_bench import tiny_32, write_config

    model = tiny_32(tmp_path / "model")
    quant = [{"scheme": "w8a8", "method": "minmax"}, {"scheme": "w4a8", "method": "minmax"}]
    config = write_config(tmp_path / "bench.json", model, quant, eta=0.0, num=8, guidance=2.0)
    one = qdiffuse("bench", config, "--out", tmp_path / "one", "-q")
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(2, "bench", config, "--out", tmp_path / "two", "-q")
    assert two.returncode == 0, two.stderr[-2000:]
    rows = [json.loads((tmp_path / n / "results.json").read_text())["rows"] for n in ("one", "two")]
    strip = [[{k: v for k, v in r.items() if k not in TIMING} for r in rs] for rs in rows]
    assert strip[0] == strip[1] and len(strip[0]) == 3
    assert two.stdout.count("| model |") == 1  # rank 0 alone prints the table


def test_torn_shards_are_sampled_again(tmp_path: Path) -> None:
    """A truncated or foreign-shaped shard is never trusted: the batch is sampled again (one process, no group)."""
    from qdiffuse.distributed.sampling import sample_sharded, shard_folder
    from qdiffuse.distributed.world import World
    from qdiffuse.sampling.loop import SampleRequest

    request = SampleRequest(num=5, batch_size=2)
    calls: list[int] = []

    def batch(b: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append(b)
        n = min(2, 5 - 2 * b)
        return np.full((n, 4, 4, 1), b, np.uint8), np.full(n, b)

    out = tmp_path / "s.npz"
    first = sample_sharded(World(), request, out, {"id": 1}, batch)
    assert calls == [0, 1, 2]
    folder = shard_folder(out)
    (folder / "batch_0000001.npz").write_bytes(b"PK\x03\x04 torn")
    np.savez(folder / "batch_0000002.npz", arr_0=np.zeros((1, 4, 4), np.float32))
    calls.clear()
    again = sample_sharded(World(), request, out, {"id": 1}, batch)
    assert calls == [1, 2]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
