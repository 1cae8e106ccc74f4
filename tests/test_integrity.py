"""Content hashes of quantized folders and the manifest's claims: tampering fails with one line, naming the file.

``verify=True`` (the default) checks integrity.json before anything else, so any edit fails on its hash; with
``verify=False`` the claim checks (scheme, bits, code sizes and shapes, the stored tensors' layout) still catch an
edit that contradicts the stored tensors, and a folder whose content is consistent loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import denoiser_outputs, probe_inputs, tiny_folder, tiny_quantized_folder

from qdiffuse.api import quantize
from qdiffuse.config import QuantConfig
from qdiffuse.errors import ModelLoadError
from qdiffuse.integrity import (
    ALGORITHM,
    INTEGRITY_FILE,
    file_digest,
    has_record,
    record_files,
    verify_folder,
    write_integrity,
)
from qdiffuse.io import QUANT_JSON, QUANT_WEIGHTS, load_quantized, save_quantized
from qdiffuse.models.loading import load_model_folder
from qdiffuse.progress import set_progress_enabled

set_progress_enabled(False)

NO_VERIFY = "--no-verify"


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared W4A8 UNet folder (4-bit and 8-bit layers, shortcut splits, a qdiffuse.json); never modified."""
    return tiny_quantized_folder("unet", "w4a8", tmp_path_factory)


@pytest.fixture(scope="module")
def expected(original: Path) -> tuple[tuple[Any, ...], torch.Tensor]:
    loaded = load_quantized(original)
    inputs = probe_inputs(loaded)
    return inputs, denoiser_outputs(loaded, inputs)


@pytest.fixture
def folder(original: Path, tmp_path: Path) -> Path:
    """A private copy a test may damage."""
    return Path(shutil.copytree(original, tmp_path / "q"))


def _edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = folder / QUANT_JSON
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def _load_error(folder: Path, *words: str, verify: bool = True) -> str:
    with pytest.raises(ModelLoadError) as exc:
        load_quantized(folder, verify=verify)
    message = str(exc.value)
    assert message and "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


# ------------------------------------------------------------------------------------------------- the record


def test_record_covers_every_file_with_its_sha256(original: Path) -> None:
    record = json.loads((original / INTEGRITY_FILE).read_text())
    assert record["algorithm"] == ALGORITHM == "sha256"
    on_disk = {
        p.relative_to(original).as_posix()
        for p in original.rglob("*")
        if p.is_file() and p.name != INTEGRITY_FILE and not p.name.startswith(".")  # fsutil's output marker
    }
    assert set(record["files"]) == on_disk
    read_by_the_loader = {QUANT_JSON, QUANT_WEIGHTS, "unet/config.json", "scheduler/scheduler_config.json"}
    assert read_by_the_loader | {"qdiffuse.json"} <= on_disk
    for name, digest in record["files"].items():
        assert digest == hashlib.sha256((original / name).read_bytes()).hexdigest(), name
    assert verify_folder(original) == set(record["files"])


def test_extra_files_given_to_save_are_covered(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    loaded = load_model_folder(tiny_folder("dit", tmp_path_factory))
    config = QuantConfig.from_scheme("w8a8", calib_steps=2, calib_per_step=2, calib_num_inference_steps=4,
                                     outliers="off", guard_db=0)
    quantize(loaded.denoiser, loaded.scheduler_config, config)
    extra = {"cost.json": '{"bops_reduction": 4.0}', "noise/ddim-4-eta0-g1.json": "{}"}
    out = save_quantized(loaded, tmp_path / "q", extra_files=extra)
    record = json.loads((out / INTEGRITY_FILE).read_text())
    assert set(extra) <= set(record["files"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # still one atomic folder, no stray temp files
    load_quantized(out)


def test_file_digest_streams_large_files_fast(tmp_path: Path) -> None:
    """Hashing must not matter next to loading: 64 MiB in well under a second, in constant memory."""
    path = tmp_path / "big.bin"
    block = bytes(range(256)) * 4096
    with open(path, "wb") as f:
        for _ in range(64):
            f.write(block)
    start = time.perf_counter()
    digest = file_digest(path)
    assert time.perf_counter() - start < 2.0
    assert digest == hashlib.sha256(block * 64).hexdigest()


# ---------------------------------------------------------------------------------------------- tampering


def _weight_bits_4_to_8(manifest: dict[str, Any]) -> None:
    assert manifest["config"]["weight"]["bits"] == 4
    manifest["config"]["weight"]["bits"] = 8


def _layer_bits_4_to_2(manifest: dict[str, Any]) -> None:
    name = next(n for n, e in manifest["layers"].items() if e["bits"] == 4)
    manifest["layers"][name]["bits"] = 2


def _scheme_label(manifest: dict[str, Any]) -> None:
    assert manifest["config"]["scheme"] == "w4a8"
    manifest["config"]["scheme"] = "w8a8"


TAMPERING = {
    "config-weight-bits-4-to-8": (_weight_bits_4_to_8, ("scheme 'w4a8'", "int8-sym-channel")),
    "layer-bits-4-to-2": (_layer_bits_4_to_2, ("down_blocks.0.resnets.0.conv1", "2-bit", "int4-sym-channel")),
    "scheme-w4a8-to-w8a8": (_scheme_label, ("scheme 'w8a8'", "int4-sym-channel")),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_manifest_fails_on_its_hash(case: str, folder: Path) -> None:
    _edit_manifest(folder, TAMPERING[case][0])
    _load_error(folder, QUANT_JSON, "does not match", "re-run qdiffuse quantize", NO_VERIFY)


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_manifest_fails_its_claim_checks_without_verify(case: str, folder: Path) -> None:
    edit, words = TAMPERING[case]
    _edit_manifest(folder, edit)
    message = _load_error(folder, *words, verify=False)
    assert "sha256" not in message


def test_flipped_byte_in_the_weights(folder: Path) -> None:
    path = folder / QUANT_WEIGHTS
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x10  # in the tensor data: it parses, only the hash can tell
    path.write_bytes(bytes(data))
    _load_error(folder, QUANT_WEIGHTS, "does not match", NO_VERIFY)


def test_missing_file_named(folder: Path) -> None:
    (folder / "scheduler" / "scheduler_config.json").unlink()
    _load_error(folder, "scheduler_config.json", "missing", NO_VERIFY)


def test_extra_unlisted_file_is_ignored(folder: Path, expected: tuple[tuple[Any, ...], torch.Tensor]) -> None:
    (folder / "README.md").write_text("my notes\n")
    (folder / "unet" / "notes.txt").write_text("more notes\n")
    inputs, want = expected
    assert torch.equal(denoiser_outputs(load_quantized(folder), inputs), want)


def test_old_folder_without_a_record_loads_with_a_warning(
    folder: Path, expected: tuple[tuple[Any, ...], torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    (folder / INTEGRITY_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="qdiffuse.integrity"):
        loaded = load_quantized(folder)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and INTEGRITY_FILE in r.getMessage()]
    assert len(warnings) == 1 and "older qdiffuse" in warnings[0].getMessage()
    inputs, want = expected
    assert torch.equal(denoiser_outputs(loaded, inputs), want)


def test_old_folder_without_a_tensor_record_still_loads(
    folder: Path, expected: tuple[tuple[Any, ...], torch.Tensor]
) -> None:
    """Manifests from before the stored-tensor layout was recorded have no "tensors"; the other checks still run."""
    _edit_manifest(folder, lambda m: m.pop("tensors"))
    (folder / INTEGRITY_FILE).unlink()
    inputs, want = expected
    assert torch.equal(denoiser_outputs(load_quantized(folder), inputs), want)


def test_no_verify_loads_a_consistent_folder_whose_hash_changed(
    folder: Path, expected: tuple[tuple[Any, ...], torch.Tensor]
) -> None:
    """A reformatted manifest and a hand-edited note: every byte hash changes, the content does not."""
    manifest = json.loads((folder / QUANT_JSON).read_text())
    manifest["calibration"]["note"] = "re-indented and annotated by hand"
    (folder / QUANT_JSON).write_text(json.dumps(manifest, indent=4, sort_keys=True))
    _load_error(folder, QUANT_JSON, "does not match", NO_VERIFY)
    inputs, want = expected
    assert torch.equal(denoiser_outputs(load_quantized(folder, verify=False), inputs), want)


def test_no_verify_still_checks_the_stored_tensors(folder: Path) -> None:
    """A header that relabels a float tensor as int32 (the byte counts still add up) fails on the tensor record."""
    import struct

    path = folder / QUANT_WEIGHTS
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert header["conv_out.bias"]["dtype"] == "F32"
    header["conv_out.bias"]["dtype"] = "I32"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    _load_error(folder, "conv_out.bias", "int32", "float32", verify=False)


@pytest.mark.parametrize(
    "flag", ["dynamic_activations", "quartz_static"], ids=["dynamic-activations", "quartz-static"]
)
def test_config_flag_that_contradicts_the_stored_ranges(flag: str, folder: Path) -> None:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["config"][flag] = not manifest["config"][flag]

    _edit_manifest(folder, edit)
    if flag == "dynamic_activations":
        _load_error(folder, "calibrated ranges", "dynamic", verify=False)
    else:  # no QuaRTZ activations here: the flag changes nothing, and the folder loads
        load_quantized(folder, verify=False)


def test_config_that_builds_a_huge_model_fails_fast(folder: Path) -> None:
    """2**40 blocks would build for hours before any shape check; the parameter budget stops it at once."""
    path = folder / "unet" / "config.json"
    config = json.loads(path.read_text())
    config["layers_per_block"] = 2**40
    path.write_text(json.dumps(config))
    start = time.perf_counter()
    _load_error(folder, "config.json", verify=False)
    assert time.perf_counter() - start < 10


# ------------------------------------------------------------------------------------------ a damaged record


@pytest.mark.parametrize(
    "record, words",
    [
        (b"{not json", ("unreadable",)),
        (b"[" * 100_000 + b"]" * 100_000, ("unreadable",)),
        (json.dumps({"algorithm": "md5", "files": {}}).encode(), ("sha256",)),
        (json.dumps({"algorithm": "sha256", "files": []}).encode(), ("sha256",)),
        (json.dumps({"algorithm": "sha256", "files": {"../outside": "00"}}).encode(), ("invalid entry",)),
        (json.dumps({"algorithm": "sha256", "files": {"/etc/hostname": "00"}}).encode(), ("invalid entry",)),
    ],
    ids=["not-json", "deep-nesting", "other-algorithm", "files-not-a-map", "path-outside", "absolute-path"],
)
def test_damaged_record(record: bytes, words: tuple[str, ...], folder: Path) -> None:
    (folder / INTEGRITY_FILE).write_bytes(record)
    _load_error(folder, INTEGRITY_FILE, NO_VERIFY, *words)


def test_record_that_lists_a_folder_or_omits_a_file_the_loader_reads(folder: Path) -> None:
    record = json.loads((folder / INTEGRITY_FILE).read_text())
    record["files"]["unet"] = "0" * 64
    (folder / INTEGRITY_FILE).write_text(json.dumps(record))
    _load_error(folder, "not a regular file", NO_VERIFY)
    del record["files"]["unet"]
    del record["files"]["unet/config.json"]
    (folder / INTEGRITY_FILE).write_text(json.dumps(record))
    _load_error(folder, "does not cover unet/config.json", NO_VERIFY)


# ------------------------------------------------------------------------------- writers that add files later


def _noise_stats(steps: int) -> Any:
    """Statistics as the store writes them; real ones are measured by sampling, which this test does not need."""
    from qdiffuse.noise.stats import NoiseStats, StepStats

    step = StepStats(timestep=500, k=0.1, mu=[0.0], sigma_q=0.01, snr_q=30.0, snr_f=20.0, normality_p=0.5,
                     k_raw=0.1, count=8)
    return NoiseStats(settings={"sampler": "ddim", "steps": steps, "eta": 0.0, "guidance": 1.0}, steps={500: step})


def test_noise_statistics_added_later_keep_the_folder_verifiable(
    folder: Path, expected: tuple[tuple[Any, ...], torch.Tensor]
) -> None:
    from qdiffuse.noise.store import save_stats, stats_relpath

    first, second = _noise_stats(4), _noise_stats(8)
    save_stats(folder, first)
    save_stats(folder, second)
    record = json.loads((folder / INTEGRITY_FILE).read_text())["files"]
    for stats in (first, second):
        rel = stats_relpath(stats)
        assert record[rel] == file_digest(folder / rel)
    inputs, want = expected
    assert torch.equal(denoiser_outputs(load_quantized(folder), inputs), want)
    (folder / stats_relpath(first)).write_text("{}")  # now the listed statistics are damaged
    _load_error(folder, stats_relpath(first).split("/")[-1], "does not match", NO_VERIFY)


def test_rewritten_file_gets_a_new_digest_and_removed_one_is_dropped(folder: Path) -> None:
    (folder / "cost.json").write_text('{"bops_reduction": 1}')
    record_files(folder, ["cost.json"])
    assert verify_folder(folder) is not None and "cost.json" in verify_folder(folder)
    (folder / "cost.json").write_text('{"bops_reduction": 2}')
    record_files(folder, [folder / "cost.json"])  # an absolute path inside the folder works too
    verify_folder(folder)
    (folder / "cost.json").unlink()
    record_files(folder, ["cost.json"])
    assert "cost.json" not in verify_folder(folder)
    assert not list(folder.glob(".integrity*"))  # the record is replaced atomically, no temp files left


def test_writers_do_not_add_a_record_to_an_old_folder(folder: Path) -> None:
    """A record of the new file alone would make an unverified folder look verified."""
    from qdiffuse.noise.store import save_stats

    (folder / INTEGRITY_FILE).unlink()
    save_stats(folder, _noise_stats(4))
    assert not has_record(folder)
    write_integrity(folder)  # what re-saving does: now everything is covered
    assert verify_folder(folder) is not None


# ------------------------------------------------------------------------------------ real folders pass checks


ROUND_TRIPS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "unet-w8a8-auto-outliers-and-guard": ("unet", "w8a8", {}),
    "dit-w4-mixed": ("dit", "w4-mixed", {"outliers": "off"}),
    "dit-w4a4-g32": ("dit", "w4a4-g32", {"outliers": "off", "method": "minmax"}),
    "dit-w4a8-dynamic": ("dit", "w4a8", {"outliers": "off", "guard_db": 0, "dynamic_activations": True}),
    "dit-quartz-variant": ("dit", "quartz-w4a8", {"outliers": "off", "guard_db": 0, "lzs_group": 32,
                                                 "lzs_rounding": "truncate"}),
    "dit-mxfp4": ("dit", "mxfp4", {"outliers": "off"}),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_claim_checks_accept_real_folders(case: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """Every check must hold for what save_quantized writes: outlier handling, the guard, mixed precision,
    per-call ranges and QuaRTZ variants included."""
    kind, scheme, overrides = ROUND_TRIPS[case]
    loaded = load_model_folder(tiny_folder(kind, tmp_path_factory))
    config = QuantConfig.from_scheme(scheme, calib_steps=2, calib_per_step=4, calib_num_inference_steps=4,
                                     **overrides)
    quantize(loaded.denoiser, loaded.scheduler_config, config, runtime="simulated")
    inputs = probe_inputs(loaded)
    want = denoiser_outputs(loaded, inputs)
    out = save_quantized(loaded, tmp_path / "q")
    assert torch.equal(denoiser_outputs(load_quantized(out, runtime="simulated"), inputs), want)
    assert torch.equal(denoiser_outputs(load_quantized(out, runtime="simulated", verify=False), inputs), want)
    load_quantized(out)  # the real runtime too
