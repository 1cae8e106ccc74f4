"""Peak resident memory of loading a model: the FP folder against its quantized folders on the real runtime.

    python benchmarks/load_memory.py --work /tmp/load-memory [--layers 12 --width 1152]

Builds a random-weight ``DiTTransformer2DModel`` (by default 12 blocks of DiT-XL/2's width 1152, 323M
parameters), saves it as a diffusers folder, quantizes it (minmax, 4 random calibration inputs: ranges do not
change memory) at W8A8 and W4A8, saves both, and then loads each folder in a fresh process and reports that
process's peak RSS (``VmHWM``) above the RSS it had after importing torch and diffusers, plus the bytes the
loaded model holds (``qdiffuse.kernels.model_bytes``). A loader that made an FP32 copy of the weights first
would peak at least at the FP32 size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys
import torch, diffusers  # noqa: F401  (the baseline includes the libraries)
from qdiffuse.kernels import model_bytes
def high_water():  # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak across exec
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
base = high_water()
folder, quantized = sys.argv[1], sys.argv[2] == "1"
if quantized:
    from qdiffuse.io import load_quantized
    model = load_quantized(folder).denoiser.model
else:
    from qdiffuse.models.loading import load_model_folder
    model = load_model_folder(folder).denoiser.model
peak = high_water()
print(json.dumps({"peak_above_baseline": peak - base, "held": model_bytes(model)["total"]}))
"""


def build(work: Path, layers: int, width: int) -> dict[str, Path]:
    import torch
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    from qdiffuse.api import quantize
    from qdiffuse.calibration.collect import CalibrationSet
    from qdiffuse.config import QuantConfig
    from qdiffuse.io import save_quantized
    from qdiffuse.models.loading import load_model_folder
    from qdiffuse.progress import set_progress_enabled

    set_progress_enabled(False)
    fp = work / "fp"
    if not fp.exists():
        heads = width // 72
        model = DiTTransformer2DModel(
            num_layers=layers, num_attention_heads=heads, attention_head_dim=72, in_channels=4, out_channels=8,
            patch_size=2, sample_size=32, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        )
        model.save_pretrained(fp / "transformer")
        DDPMScheduler(num_train_timesteps=1000).save_pretrained(fp / "scheduler")
    folders = {"fp32": fp}
    for scheme in ("w8a8", "w4a8"):
        out = work / scheme
        if not out.exists():
            loaded = load_model_folder(fp)
            gen = torch.Generator().manual_seed(0)
            calib = CalibrationSet(torch.randn(4, 4, 32, 32, generator=gen), torch.tensor([900, 600, 300, 50]),
                                   torch.tensor([1, 2, 3, 1000]))
            quantize(loaded.denoiser, loaded.scheduler_config, QuantConfig.from_scheme(scheme), calib=calib)
            save_quantized(loaded, out)
        folders[scheme] = out
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=1152)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folders = build(args.work, args.layers, args.width)
    print("| folder | peak RSS while loading, above baseline (MiB) | held by the loaded model (MiB) |")
    print("|---|---|---|")
    for name, folder in folders.items():
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder), "0" if name == "fp32" else "1"],
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        row = json.loads(out)
        print(f"| {name} | {row['peak_above_baseline'] / 2**20:.0f} | {row['held'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
