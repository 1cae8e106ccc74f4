"""How much error each 4-bit format puts on a built-in model's own layer inputs and weights.

A format-only comparison, with no calibration method, policy or runtime in between: the FP model samples with DDIM,
every ``nn.Linear`` / ``nn.Conv2d`` input is captured on those inputs, and each tensor is quantize-dequantized along
its reduction (channel) dimension by INT4 (one min-max range per tensor), QuaRTZ (dynamic stage-1 scales per 64,
LZS per 16 or 32, round to nearest), NVFP4 and MXFP4. Printed per format: the SQNR of the inputs, of the weights
(along their input dimension), and of the layer's output when only its input is quantized, as the median over the
layers and the worst layer, and the same for synthetic distributions. Higher is better.

    python benchmarks/format_error.py fmnist-dit
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import Tensor, nn

from qdiffuse.calibration.collect import collect_calibration
from qdiffuse.formats.fp4 import fake_quant_mxfp4, fake_quant_nvfp4
from qdiffuse.formats.integer import fake_quant_int, int_bounds, int_qparams
from qdiffuse.formats.quartz import fake_quant_quartz
from qdiffuse.pipeline import load_any


def int4_per_tensor(x: Tensor) -> Tensor:
    scale, zero_point = int_qparams(x.amin(), x.amax(), 4, symmetric=True)
    return fake_quant_int(x, scale, zero_point, *int_bounds(4, symmetric=True))


FORMATS: dict[str, Callable[[Tensor], Tensor]] = {
    "int4 per tensor": int4_per_tensor,
    "quartz G16": lambda x: fake_quant_quartz(x, lzs_group=16, rounding="nearest"),
    "quartz G32": lambda x: fake_quant_quartz(x, lzs_group=32, rounding="nearest"),
    "nvfp4": fake_quant_nvfp4,
    "mxfp4": fake_quant_mxfp4,
}


def sqnr_db(x: Tensor, y: Tensor) -> float:
    return float(10 * torch.log10(x.pow(2).mean() / (x - y).pow(2).mean().clamp_min(1e-30)))


def channels_last(x: Tensor, layer: nn.Module) -> Tensor:
    """The layer's reduction dimension last: formats group along it."""
    return x.movedim(1, -1) if isinstance(layer, nn.Conv2d) else x


def capture_inputs(model: nn.Module, run: Callable[[], None]) -> dict[str, tuple[nn.Module, Tensor]]:
    captured: dict[str, tuple[nn.Module, Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and getattr(module, "groups", 1) == 1:

            def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                captured.setdefault(name, (mod, args[0].detach()))

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return captured


def summarize(rows: list[float]) -> str:
    t = torch.tensor(rows)
    return f"median {t.median():6.2f}  worst {t.min():6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Built-in model name or diffusers folder.")
    parser.add_argument(
        "--num",
        type=int,
        default=64,
        help="Trajectory points over the DDIM 50 steps (twice as many denoiser inputs with guidance).",
    )
    parser.add_argument("--guidance", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    print("synthetic, 4096 x 256, grouped along the last dimension (SQNR dB)")
    synthetic = {
        "gaussian": torch.randn(4096, 256),
        "laplace": torch.distributions.Laplace(0.0, 1.0).sample((4096, 256)),
        "student-t 3": torch.distributions.StudentT(3.0).sample((4096, 256)),
    }
    for dist, x in synthetic.items():
        print(f"  {dist:12s} " + "  ".join(f"{f} {sqnr_db(x, q(x)):5.2f}" for f, q in FORMATS.items()))

    fp = load_any(args.model)
    inputs = collect_calibration(
        fp.denoiser, fp.scheduler_config, n_steps=args.num // 4, n_per_step=4, guidance=args.guidance
    )
    labels = inputs.labels if inputs.labels is not None else None
    captured = capture_inputs(fp.denoiser.model, lambda: fp.denoiser.forward_raw(inputs.x, inputs.t, labels))
    print(f"\n{args.model}: {len(captured)} layers, {len(inputs.x)} denoiser inputs (SQNR dB over the layers)")
    for fname, quant in FORMATS.items():
        act, wgt, out = [], [], []
        for layer, x in captured.values():
            xs = channels_last(x, layer)
            xq = quant(xs)
            act.append(sqnr_db(xs, xq))
            w = channels_last(layer.weight.detach(), layer)
            wgt.append(sqnr_db(w, quant(w)))
            xq_back = xq.movedim(-1, 1) if isinstance(layer, nn.Conv2d) else xq
            with torch.no_grad():
                out.append(sqnr_db(layer(x), layer(xq_back)))
        print(f"  {fname:16s} inputs {summarize(act)} | weights {summarize(wgt)} | outputs {summarize(out)}")


if __name__ == "__main__":
    main()
