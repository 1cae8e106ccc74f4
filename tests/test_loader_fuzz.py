"""A seeded fuzz pass over the quantized-folder loader: damaged headers, data, manifests, model configs, records.

Every case writes one mutated file into a copy of a tiny quantized folder and loads it. The loader passes a case
when it either raises a :class:`QDiffuseError` whose message is one line, or loads a model whose outputs equal the
undamaged folder's bit for bit. Anything else is a defect: another exception type (a crash in a parser), a
multi-line message, a case that runs past its time limit (a hang), or a load that quietly computes something else.

Most cases load with ``verify=False`` so the mutations reach the parsers and the manifest's claim checks; the
``verify=True`` families check that the content hashes catch every changed byte, including those no structural
check can see (a flipped data byte), and that a damaged integrity.json fails cleanly. One outcome is allowed with
``verify=False`` and only for the model config: an edit that keeps every tensor shape (``norm_eps``, a deleted
``sample_size``, ``center_input_sample``) describes a different but well-formed model, which nothing but the hash
can tell apart; such a case may load and compute something else (or fail in its forward), and the same bytes must
then fail to load with ``verify=True``, naming the config.

The counts are fixed and the generator seeded, so a failure reproduces with its case number (set
``QDIFFUSE_FUZZ_REPORT=path`` to get every defect, not only the first 20). Measured: 2173 cases; the whole file
takes about 22 s of CPU time on one core (35 s wall on an idle core, 50 s while sharing it with a benchmark).
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import signal
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import denoiser_outputs, probe_inputs, tiny_quantized_folder

from qdiffuse.errors import QDiffuseError
from qdiffuse.integrity import INTEGRITY_FILE
from qdiffuse.io import QUANT_JSON, QUANT_WEIGHTS, load_quantized
from qdiffuse.progress import set_progress_enabled

set_progress_enabled(False)

SEED = 1729
CASE_SECONDS = 10
"""A case that takes longer is a hang: a load of these folders takes ~50 ms."""
MEMORY_HEADROOM = 4 << 30
"""Address space a case may add: a config that asks for a terabyte fails at once instead of swapping the
machine; real folders of these tiny models need a few MiB."""

TARGETS = [("dit", "w4a8", 1.0), ("unet", "w4a8", 0.4), ("dit", "quartz-w4a8", 0.5), ("dit", "nvfp4", 0.5)]
"""Folders and the share of each family's cases they get: a DiT with integer, QuaRTZ (packed LZS flags) and NVFP4
(block scales) weights, and a UNet (shortcut splits, a qdiffuse.json, 8-bit first and last layers), which takes
twice as long to load and so gets fewer cases."""


# ------------------------------------------------------------------------------------------------- the harness


@dataclass
class Target:
    """One undamaged folder, a scratch copy cases damage (and restore), and its reference outputs."""

    name: str
    source: Path
    work: Path
    files: dict[str, bytes]
    inputs: tuple[Any, ...]
    share: float
    reference: dict[str, torch.Tensor] = field(default_factory=dict)

    def write(self, rel: str, data: bytes | None) -> None:
        """Replace ``rel`` by a new file (never in place: a model loaded earlier may still map the old one)."""
        path = self.work / rel
        if data is None:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name(f".{path.name}.fuzz")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def restore(self, rel: str) -> None:
        self.write(rel, self.files.get(rel))


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Target]:
    out = {}
    for kind, scheme, share in TARGETS:
        source = tiny_quantized_folder(kind, scheme, tmp_path_factory)
        work = tmp_path_factory.mktemp(f"fuzz-{kind}-{scheme}") / "q"
        files = {p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*") if p.is_file()}
        for rel, data in files.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes(data)
        first = load_quantized(work)
        target = Target(f"{kind}-{scheme}", source, work, files, probe_inputs(first), share)
        for runtime in ("real", "simulated"):
            target.reference[runtime] = denoiser_outputs(load_quantized(work, runtime=runtime), target.inputs)
            again = denoiser_outputs(load_quantized(work, runtime=runtime), target.inputs)
            assert torch.equal(again, target.reference[runtime]), "loading must be deterministic to fuzz it"
        out[target.name] = target
    return out


class CaseTimeout(Exception):
    """Raised by the alarm inside a case that runs past :data:`CASE_SECONDS`."""


@contextmanager
def _limits() -> Iterator[None]:
    """A per-case alarm and an address-space cap for the whole family, both undone afterwards."""

    def alarm(_signum: int, _frame: object) -> None:
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        in_use = int(f.read().split()[0]) * resource.getpagesize()
    cap = in_use + MEMORY_HEADROOM
    if hard == resource.RLIM_INFINITY or cap < hard:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Case:
    """One damaged file and how to load it. ``semantic``: a valid model-config edit the hash alone can see."""

    index: int
    what: str
    rel: str
    data: bytes | None
    verify: bool
    runtime: str
    semantic: bool = False


@dataclass
class Tally:
    errors: int = 0
    loads: int = 0
    semantic: int = 0
    defects: list[str] = field(default_factory=list)


def _run(target: Target, case: Case, tally: Tally) -> None:
    """Load ``case`` and file its outcome; anything but a one-line QDiffuseError or an identical model is a defect."""
    label = f"#{case.index} {target.name} {case.rel} {case.what} verify={case.verify} {case.runtime}"
    target.write(case.rel, case.data)
    outcome: str | None = None
    got: torch.Tensor | Exception | None = None
    try:
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
        try:
            loaded = load_quantized(target.work, runtime=case.runtime, verify=case.verify)
            try:
                got = denoiser_outputs(loaded, target.inputs)
            except Exception as exc:  # noqa: BLE001 - judged below: only a valid config edit may do this
                got = exc
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except QDiffuseError as exc:
        message = str(exc)
        tally.errors += 1
        if not message or "\n" in message:
            outcome = f"multi-line or empty message {message!r}"
        elif case.verify and case.data != target.files.get(case.rel) and Path(case.rel).name not in message:
            outcome = f"verify=True error does not name the changed file: {message}"
    except CaseTimeout:
        outcome = f"no result after {CASE_SECONDS} s (hang)"
    except BaseException as exc:  # noqa: BLE001 - every other exception is what the fuzz looks for
        if isinstance(exc, KeyboardInterrupt):
            raise
        outcome = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    else:
        tally.loads += 1
        reference = target.reference[case.runtime]
        if isinstance(got, Exception) or not torch.equal(got, reference):
            if case.semantic and not case.verify:
                tally.semantic += 1
                outcome = _hash_catches(target, case)
            elif isinstance(got, Exception):
                outcome = f"loaded, but its forward fails: {type(got).__name__}: {' '.join(str(got).split())[:200]}"
            else:
                outcome = "loaded, but its outputs differ from the undamaged folder's"
        elif case.verify and case.data != target.files.get(case.rel) and case.rel != INTEGRITY_FILE:
            outcome = "verify=True loaded a changed file"
    finally:
        target.restore(case.rel)
    if outcome is not None:
        tally.defects.append(f"{label}: {outcome}")


def _hash_catches(target: Target, case: Case) -> str | None:
    """A valid model-config edit loads with verify=False; the same bytes must fail to load with verify=True."""
    try:
        load_quantized(target.work, runtime=case.runtime, verify=True)
    except QDiffuseError as exc:
        if Path(case.rel).name in str(exc) and "\n" not in str(exc):
            return None
        return f"a valid model-config edit, but verify=True says: {exc}"
    return "a valid model-config edit that verify=True loads too"


def _family(targets: dict[str, Target], cases: Callable[[random.Random, Target, int], Iterator[Case]], n: int) -> Tally:
    """Run ``n`` cases per target from the generator ``cases`` and fail with every defect found."""
    tally = Tally()
    start = time.perf_counter()
    total = 0
    with _limits():
        for offset, target in enumerate(targets.values()):
            rng = random.Random(SEED * 1000 + offset)
            count = round(n * target.share)
            total += count
            for case in cases(rng, target, count):
                _run(target, case, tally)
    seconds = time.perf_counter() - start
    print(f"{total} cases in {seconds:.1f} s: {tally.errors} one-line errors, {tally.loads} loads "
          f"({tally.semantic} valid model-config edits), {len(tally.defects)} defects")
    report = os.environ.get("QDIFFUSE_FUZZ_REPORT")
    if report:  # every defect, for whoever fixes them
        with open(report, "a") as f:
            f.writelines(line + "\n" for line in tally.defects)
    assert not tally.defects, "\n".join(tally.defects[:20])
    assert tally.errors + tally.loads == total
    return tally


# ----------------------------------------------------------------------------------------------- JSON mutations


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every node of a JSON tree, as the keys/indices leading to it."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _get(node: Any, path: tuple) -> Any:
    for key in path:
        node = node[key]
    return node


def _strings(node: Any) -> list[str]:
    return [_get(node, p) for p in _paths(node) if isinstance(_get(node, p), str)]


OTHER_VALUES: list[Any] = [None, True, False, 0, -1, 1.5, "", "x", [], {}, [1], {"a": 1}, 2**40, "w8a8"]


def _new_value(rng: random.Random, value: Any, pool: list[str]) -> tuple[str, Any]:
    """A changed value of the same kind where that is meaningful, or of another type."""
    if isinstance(value, bool):
        return "flip", not value
    if isinstance(value, (int, float)) and rng.random() < 0.8:
        choices = [value + 1, value - 1, 0, -value, 2 * value, value / 2, float(value), 2**40, -(2**40),
                   2**64, 1e308, float("nan"), float("inf")]
        return "number", rng.choice(choices)
    if isinstance(value, str) and rng.random() < 0.8:
        choices = ["", value + "x", value[:-1], value.upper(), " " + value, value * 2, "../../etc/passwd",
                   "é\n\u0000", rng.choice(pool) if pool else "y"]
        return "string", rng.choice(choices)
    if isinstance(value, list) and value and rng.random() < 0.8:
        changed = list(value)
        op = rng.choice(["drop-first", "drop-last", "duplicate", "append-none", "empty", "reverse"])
        if op == "drop-first":
            changed = changed[1:]
        elif op == "drop-last":
            changed = changed[:-1]
        elif op == "duplicate":
            changed.append(rng.choice(changed))
        elif op == "append-none":
            changed.append(None)
        elif op == "empty":
            changed = []
        else:
            changed.reverse()
        return f"list-{op}", changed
    return "type", rng.choice(OTHER_VALUES)


def mutate_json(rng: random.Random, doc: Any) -> tuple[str, Any]:
    """One edit of a copy of ``doc``: delete a key or element, rename a key, add one, or change a value."""
    doc = json.loads(json.dumps(doc))
    paths = _paths(doc)
    path = rng.choice(paths[1:]) if len(paths) > 1 else ()
    parent, key = (_get(doc, path[:-1]), path[-1]) if path else (None, None)
    where = "/".join(map(str, path)) or "<root>"
    roll = rng.random()
    if parent is not None and roll < 0.15:
        del parent[key]
        return f"delete {where}", doc
    if isinstance(parent, dict) and roll < 0.22:
        parent[f"{key}_renamed" if rng.random() < 0.5 else key.upper()] = parent.pop(key)
        return f"rename {where}", doc
    if isinstance(parent, dict) and roll < 0.26:
        parent["unexpected_field"] = rng.choice(OTHER_VALUES)
        return f"add a key beside {where}", doc
    what, value = _new_value(rng, _get(doc, path), _strings(doc))
    if parent is None:
        return f"{what} <root>", value
    parent[key] = value
    return f"{what} {where} -> {json.dumps(value)[:40]}", doc


def mutate_json_text(rng: random.Random, text: bytes) -> tuple[str, bytes]:
    """Damage below the JSON level: truncation, stray bytes, invalid UTF-8, deep nesting, the wrong top type."""
    op = rng.choice(["truncate", "insert", "utf8", "nest", "list", "empty", "byte"])
    if op == "truncate":
        return op, text[: rng.randrange(len(text))]
    if op == "insert":
        i = rng.randrange(len(text))
        return op, text[:i] + rng.choice([b"}", b",", b'"', b"\\", b"\x00", b"NaN", b"]"]) + text[i:]
    if op == "utf8":
        i = rng.randrange(len(text))
        return op, text[:i] + b"\xff\xfe" + text[i:]
    if op == "nest":
        depth = rng.choice([1000, 100_000])
        return f"nest{depth}", b"[" * depth + b"]" * depth
    if op == "list":
        return op, b"[" + text + b"]"
    if op == "empty":
        return op, b""
    i = rng.randrange(len(text))
    return f"byte@{i}", text[:i] + bytes([rng.randrange(256)]) + text[i + 1 :]


def _dump(doc: Any) -> bytes:
    return json.dumps(doc, indent=2).encode()


# ---------------------------------------------------------------------------------------- safetensors mutations


def _split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join_safetensors(header: dict[str, Any] | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
          "F8_E4M3", "F8_E5M2", "C64", "Q4", "", 7, None]


def _reshape_same_numel(rng: random.Random, shape: list[int]) -> list[int]:
    """Another shape with the same element count (a header edit whose byte ranges still add up)."""
    numel = math.prod(shape)
    options = [[numel], [*shape, 1], [1, *shape], list(reversed(shape))]
    if len(shape) >= 2:
        options.append([shape[0] * shape[1], *shape[2:]])
    if shape and shape[-1] % 2 == 0:
        options.append([*shape[:-1], 2, shape[-1] // 2])
    if 1 in shape:
        i = shape.index(1)
        options.append(shape[:i] + shape[i + 1 :])
    if numel == 1:
        options.append([])
    changed = rng.choice(options)
    return changed if changed != shape else [numel, 1]


def mutate_header(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """One edit of the safetensors header: offsets, dtypes, shapes, names, metadata, or its length prefix."""
    header, body = _split_safetensors(data)
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    info = header[key]
    roll = rng.random()
    if roll < 0.18:
        start, end = info["data_offsets"]
        choices: list[Any] = [[start + 1, end + 1], [start, end + 1], [start, end - 1], [start - 1, end], [end, start],
                              [start, start], [start, 2**64 - 1], [start + 8, end + 8], [-1, end], [start, end, 0],
                              [start], [float(start), end], [str(start), end], None, [0, end - start]]
        info["data_offsets"] = rng.choice(choices)
        return f"offsets of {key} -> {info['data_offsets']}", _join_safetensors(header, body)
    if roll < 0.33:
        info["dtype"] = rng.choice([d for d in DTYPES if d != info["dtype"]])
        return f"dtype of {key} -> {info['dtype']}", _join_safetensors(header, body)
    if roll < 0.55:
        shape = info["shape"]
        choices = [_reshape_same_numel(rng, shape), [*shape, 2], shape[:-1], [-d for d in shape] or [-1],
                   [2**62, *shape], [float(d) for d in shape] or [1.0], [str(d) for d in shape] or ["1"], [shape],
                   [0], None, "16"]
        if shape:
            i = rng.randrange(len(shape))
            choices.append(shape[:i] + [shape[i] + 1] + shape[i + 1 :])
        info["shape"] = rng.choice(choices)
        return f"shape of {key} -> {info['shape']}", _join_safetensors(header, body)
    if roll < 0.68:
        other = rng.choice(keys)
        op = rng.choice(["rename", "drop", "clone", "duplicate"])
        if op == "rename":
            header[key + rng.choice(["x", ".0", "_"])] = header.pop(key)
        elif op == "drop":
            del header[key]
        elif op == "clone":
            header[key + ".copy"] = dict(info)
        else:  # the same name twice in the JSON text: only reachable by writing the text directly
            text = json.dumps(header, separators=(",", ":"))
            entry = json.dumps({key: header[other]}, separators=(",", ":"))[1:-1]
            return f"duplicate name {key} (with {other}'s entry)", _join_safetensors(
                ("{" + entry + "," + text[1:]).encode(), body
            )
        return f"{op} {key}", _join_safetensors(header, body)
    if roll < 0.74:
        header["__metadata__"] = rng.choice([{"format": 5}, 5, [], {"a": {"b": 1}}, None, {"format": "np"}])
        return f"metadata -> {header['__metadata__']}", _join_safetensors(header, body)
    if roll < 0.84:
        (n,) = struct.unpack("<Q", data[:8])
        value = rng.choice([n + 1, n - 1, n + 8, n - 8, 0, 1, 7, len(data), len(data) - 8, 2**63, 2**64 - 1,
                            100_000_001])
        return f"length prefix {n} -> {value}", struct.pack("<Q", value) + data[8:]
    what, changed = mutate_json(rng, header)
    if isinstance(changed, dict):
        return f"header: {what}", _join_safetensors(changed, body)
    return f"header: {what}", _join_safetensors(json.dumps(changed).encode(), body)


def mutate_data(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """Truncate the file anywhere (header or data) or extend it by junk."""
    if rng.random() < 0.6:
        keep = rng.choice([0, 4, 8, 9, rng.randrange(len(data)), len(data) - 1, len(data) - rng.randrange(1, 64)])
        return f"truncate to {keep} of {len(data)} bytes", data[:keep]
    extra = bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 8, 64, 1000])))
    return f"extend by {len(extra)} bytes", data + extra


# ------------------------------------------------------------------------------------------------- the families


def _runtime(rng: random.Random) -> str:
    return "real" if rng.random() < 0.7 else "simulated"


def header_cases(rng: random.Random, target: Target, n: int) -> Iterator[Case]:
    original = target.files[QUANT_WEIGHTS]
    for i in range(n):
        what, data = mutate_header(rng, original)
        yield Case(i, what, QUANT_WEIGHTS, data, False, _runtime(rng))


def data_cases(rng: random.Random, target: Target, n: int) -> Iterator[Case]:
    original = target.files[QUANT_WEIGHTS]
    for i in range(n):
        what, data = mutate_data(rng, original)
        yield Case(i, what, QUANT_WEIGHTS, data, False, _runtime(rng))


def _json_cases(rng: random.Random, target: Target, n: int, rel: str, text_share: float) -> Iterator[Case]:
    original = target.files[rel]
    doc = json.loads(original)
    for i in range(n):
        if rng.random() < text_share:
            what, data = mutate_json_text(rng, original)
        else:
            what, changed = mutate_json(rng, doc)
            data = _dump(changed)
        yield Case(i, what, rel, data, False, _runtime(rng), semantic=rel != QUANT_JSON)


def manifest_cases(rng: random.Random, target: Target, n: int) -> Iterator[Case]:
    yield from _json_cases(rng, target, n, QUANT_JSON, 0.1)


def model_config_cases(rng: random.Random, target: Target, n: int) -> Iterator[Case]:
    sub = json.loads(target.files[QUANT_JSON])["model_subfolder"]
    yield from _json_cases(rng, target, n, f"{sub}/config.json", 0.1)


def verified_cases(rng: random.Random, target: Target, n: int) -> Iterator[Case]:
    """Any damage, including what only a hash can see (a flipped data byte, a valid config edit), with verify."""
    sub = json.loads(target.files[QUANT_JSON])["model_subfolder"]
    for i in range(n):
        roll = rng.random()
        if roll < 0.3:
            data = bytearray(target.files[QUANT_WEIGHTS])
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
            yield Case(i, f"flip a bit of byte {at}", QUANT_WEIGHTS, bytes(data), True, _runtime(rng))
            continue
        if roll < 0.45:
            what, data = mutate_header(rng, target.files[QUANT_WEIGHTS])
            yield Case(i, what, QUANT_WEIGHTS, data, True, _runtime(rng))
            continue
        rel = rng.choice([QUANT_JSON, f"{sub}/config.json", "scheduler/scheduler_config.json"])
        what, changed = mutate_json(rng, json.loads(target.files[rel]))
        yield Case(i, what, rel, _dump(changed), True, _runtime(rng))


def record_cases(rng: random.Random, target: Target, n: int) -> Iterator[Case]:
    """Damage to integrity.json itself, with verify: a bad record fails with one line, never reads elsewhere."""
    record = json.loads(target.files[INTEGRITY_FILE])
    names = list(record["files"])
    for i in range(n):
        roll = rng.random()
        changed = json.loads(json.dumps(record))
        if roll < 0.25:
            name = rng.choice(["../" + names[0], "/etc/hostname", "unet", "transformer", "scheduler", "missing.json",
                               "./" + names[0], names[0] + "/", "a//b", "/dev/zero", "x\ny"])
            changed["files"][name] = "0" * 64
            what = f"list {name!r}"
        elif roll < 0.4:
            name = rng.choice(names)
            changed["files"][name] = changed["files"][name].upper()
            what = f"upper-case digest of {name}"
        else:
            what, changed = mutate_json(rng, record)
        if rng.random() < 0.1:
            what, data = mutate_json_text(rng, target.files[INTEGRITY_FILE])
        else:
            data = _dump(changed)
        yield Case(i, what, INTEGRITY_FILE, data, True, _runtime(rng))


FAMILIES: dict[str, tuple[Callable[[random.Random, Target, int], Iterator[Case]], int]] = {
    "safetensors-header": (header_cases, 220),
    "safetensors-data": (data_cases, 60),
    "manifest": (manifest_cases, 220),
    "model-config": (model_config_cases, 75),
    "verified": (verified_cases, 250),
    "integrity-record": (record_cases, 80),
}
"""Cases per family before each target's share (2.4 shares in all): 2173 cases."""


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loader_fuzz(family: str, targets: dict[str, Target]) -> None:
    generator, n = FAMILIES[family]
    _family(targets, generator, n)
