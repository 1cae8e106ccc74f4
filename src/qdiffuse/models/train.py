"""Training of the built-in diffusion models (ε-prediction DDPM with classifier-free-guidance label dropout).

The result is a diffusers pipeline folder, so the models we ship are ordinary diffusers models::

    out_dir/
      model_index.json      as DDPMPipeline.save_pretrained writes it (DiT: a DiTPipeline index without a VAE,
                            loadable with ``DiffusionPipeline.from_pretrained(folder, vae=None)``; the DiT works
                            in pixel space, so DiTPipeline's latent decoding does not apply)
      unet/ or transformer/ config.json + diffusion_pytorch_model.safetensors (EMA weights, fp16)
      scheduler/            DDPMScheduler config
      qdiffuse.json         what a sampler needs to know: classes, null class, image size, value range, recipe
      train_log.json        loss curve
      README.md             model card

The weights are stored in fp16 to keep the wheel small; ``from_pretrained`` upcasts them to float32 unless
``torch_dtype`` asks otherwise.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDPMPipeline, UNet2DModel
from diffusers.models.modeling_utils import ModelMixin

from qdiffuse.errors import ConfigError, DataError, ModelLoadError, OutputError
from qdiffuse.fsutil import MARKER, MODEL_FOLDER, check_output_path
from qdiffuse.models.architectures import (
    IMAGE_SIZE,
    IN_CHANNELS,
    MODEL_NAMES,
    NULL_CLASS,
    NUM_CLASSES,
    build_model,
    build_scheduler,
    denoise,
    model_class,
    model_subfolder,
    prepare_for_training,
)
from qdiffuse.models.fmnist import FMNIST_CLASSES, load_fmnist, resolve_data_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """Default hyper-parameters of one model on one kind of hardware."""

    steps: int
    batch_size: int
    lr: float
    ema_decay: float = 0.999


#: Default recipes per model name and hardware ("cpu" or "gpu"). The fmnist-tiny CPU recipe takes about an hour on
#: one core; fmnist-ddpm is meant for a GPU (its CPU recipe takes hours). The fmnist-dit CPU recipe (43 min on one
#: core) is the first of the three stages of the shipped model; the other two continue it with ``--init-from``
#: (BENCHMARKS.md gives the commands). The GPU recipes are sized for a single modern GPU.
RECIPES: dict[str, dict[str, Recipe]] = {
    "fmnist-tiny": {
        "cpu": Recipe(steps=1800, batch_size=64, lr=1.5e-3, ema_decay=0.998),
        "gpu": Recipe(steps=20_000, batch_size=128, lr=1e-3, ema_decay=0.9995),
    },
    "fmnist-ddpm": {
        "cpu": Recipe(steps=1500, batch_size=64, lr=1e-3, ema_decay=0.995),
        "gpu": Recipe(steps=40_000, batch_size=128, lr=5e-4, ema_decay=0.9995),
    },
    "fmnist-dit": {
        "cpu": Recipe(steps=2000, batch_size=32, lr=1e-3, ema_decay=0.998),
        "gpu": Recipe(steps=40_000, batch_size=128, lr=3e-4, ema_decay=0.9995),
    },
}

_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
#: Root-level metadata file that ``qdiffuse.models.loading`` reads (null class, class names, recipe).
META_FILE = "qdiffuse.json"
_FID_PLACEHOLDER = "FP FID: not yet measured"


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return dev


def _hardware(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(dev)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU: {cpu}, {threads} thread{'s' if threads != 1 else ''}"


def _check_out_dir(out_dir: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Fail before training, not after it, when the result could not be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output path {out_dir} is a file; choose a folder path that does not exist")
    if out_dir.exists() and not overwrite:
        raise OutputError(f"output folder {out_dir} already exists; choose another path or pass --overwrite")
    # missing parent folders are made only when the finished model is written, so a failed run leaves none
    existing = next(p for p in out_dir.parents if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise OutputError(f"folder {existing} is not a writable folder; choose a writable output folder")
    if out_dir.parent.exists():
        check_output_path(out_dir, overwrite, MODEL_FOLDER, inputs)


def _validate(
    steps: int, batch_size: int, lr: float, cond_drop: float, ema_decay: float, log_every: int
) -> None:
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"learning rate must be a positive number, got {lr}")
    if not 0.0 <= cond_drop < 1.0:
        raise ConfigError(f"cond_drop must be in [0, 1), got {cond_drop}")
    if not 0.0 <= ema_decay < 1.0:
        raise ConfigError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if log_every < 1:
        raise ConfigError(f"log_every must be at least 1, got {log_every}")


def _check_dataset(images: torch.Tensor, labels: torch.Tensor) -> None:
    shape = (IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise DataError(
            f"training images must have shape [N, {IN_CHANNELS}, 32, 32], got {tuple(images.shape)}"
        )
    if labels.shape != (images.shape[0],) or labels.dtype != torch.int64:
        raise DataError(
            f"training labels must be int64 of shape [{images.shape[0]}], got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    if images.shape[0] == 0:
        raise DataError("the training set is empty; pass a data folder with Fashion-MNIST images")
    if not torch.isfinite(images).all():
        raise DataError("training images contain NaN or inf values; fix the data")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"training labels must lie in 0…{NUM_CLASSES - 1}; fix the data")


def _lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Linear warm-up, then constant or cosine decay to zero (a short run then ends on settled weights)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _stages_text(meta: dict[str, Any]) -> str:
    stages = meta.get("stages", [])
    if len(stages) < 2:
        return ""
    parts = [
        f"{s['steps']} × batch {s['batch_size']} at lr {s['lr']} ({s['wall_time_s'] / 60:.1f} min)" for s in stages
    ]
    return f" in {len(stages)} stages: " + ", then ".join(parts)


def _load_for_continuing(name: str, folder: Path) -> tuple[ModelMixin, list[dict[str, Any]]]:
    """Weights (fp32) and training history of a folder written by :func:`train_diffusion` for ``name``."""
    sub = model_subfolder(name)
    if not (folder / sub / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no {sub}/config.json; pass a folder written by `qdiffuse train {name}`")
    reference = build_model(name).config
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        model = model_class(name).from_pretrained(folder, subfolder=sub, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load {folder / sub} ({exc}); pass a folder written by `qdiffuse train`") from exc
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    def plain(value: Any) -> Any:  # saved configs hold lists where constructors were given tuples
        return json.loads(json.dumps(value))

    differing = [
        k for k, v in reference.items() if not k.startswith("_") and plain(model.config.get(k)) != plain(v)
    ]
    if differing:
        raise ConfigError(
            f"{folder} holds a different architecture than {name} ({', '.join(differing[:3])}); "
            f"continue it with the model name it was trained as"
        )
    prepare_for_training(model, reinitialise=False)
    previous: list[dict[str, Any]] = []
    meta_path = folder / META_FILE
    if meta_path.is_file():
        try:
            previous = list(json.loads(meta_path.read_text()).get("stages", []))
        except (json.JSONDecodeError, AttributeError):
            previous = []
    return model, previous


def _prepend_log(folder: Path, log: dict[str, Any]) -> dict[str, Any]:
    """Keep the loss curve of the stages a continued run started from, so the log covers the whole training."""
    try:
        before = json.loads((folder / "train_log.json").read_text())
        merged = {key: [*before[key], *log[key]] for key in ("step", "loss", "lr")}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return log
    return {**log, **merged}


def _model_card(meta: dict[str, Any]) -> str:
    classes = ", ".join(f"{i} {c}" for i, c in enumerate(FMNIST_CLASSES))
    last = " (last stage)" if len(meta.get("stages", [])) > 1 else ""
    return f"""# {meta["name"]}

Class-conditional diffusion model (`{meta["model_class"]}`) trained from scratch on Fashion-MNIST
(60 000 training images, 28×28 padded to 32×32, values in [-1, 1]) with qdiffuse's `train` command.

- Data: Fashion-MNIST train split ({meta["num_train_images"]} images), random horizontal flips
- Classes: {classes}
- Null class {NULL_CLASS} for classifier-free guidance (labels dropped with p={meta["cond_drop"]})
- Objective: ε-prediction, DDPM schedule with 1000 linear betas 1e-4…0.02
- Steps: {meta["steps"]}{_stages_text(meta)}
- Batch: {meta["batch_size"]}{last}
- Optimiser{last}: AdamW, lr {meta["lr"]}, {meta["warmup_steps"]} warm-up steps, {meta["lr_schedule"]} schedule
- EMA decay{last}: {meta["ema_decay"]}
- Wall time: {meta["wall_time_s"] / 60:.1f} min
- Hardware: {meta["hardware"]}
- Recipe: {meta["recipe"]}
- Parameters: {meta["parameters"]:,}
- Weights: EMA, stored in float16
- Seed: {meta["seed"]}
- {_FID_PLACEHOLDER}

## Use

```python
import torch
from diffusers import {meta["model_class"]}, DDIMScheduler

model = {meta["model_class"]}.from_pretrained(
    "<this folder>", subfolder="{meta["subfolder"]}", torch_dtype=torch.float32
)
scheduler = DDIMScheduler.from_pretrained("<this folder>", subfolder="scheduler")
```

Call the model with `class_labels` (0…9, or {NULL_CLASS} for the unconditional branch); combine
ε = ε_null + w (ε_class − ε_null) for classifier-free guidance (w ≈ 2–3).
"""


def _write_folder(
    tmp: Path, model: ModelMixin, meta: dict[str, Any], log: dict[str, Any]
) -> None:
    scheduler = build_scheduler()
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # the fp16 cast warns about modules it has no reason to keep
    try:
        model = model.to("cpu", dtype=torch.float16, memory_format=torch.contiguous_format).eval()
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    if isinstance(model, UNet2DModel):
        # Exactly what diffusers writes, so DDPMPipeline.from_pretrained(out_dir) works without qdiffuse.
        DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
    else:
        model.save_pretrained(tmp / "transformer", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        index = {
            "_class_name": "DiTPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", type(scheduler).__name__],
            "transformer": ["diffusers", type(model).__name__],
            "vae": [None, None],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    weights = tmp / meta["subfolder"] / _WEIGHTS_FILE
    if not weights.is_file():
        raise OutputError(f"diffusers did not write {weights}; check free disk space and retry")
    # A model continued with --init-from remembers the folder it was loaded from; that path means nothing to
    # whoever receives this folder.
    config_file = tmp / meta["subfolder"] / "config.json"
    config = json.loads(config_file.read_text())
    if config.pop("_name_or_path", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    (tmp / "README.md").write_text(_model_card(meta))
    # diffusers writes weights through a private temp file (mode 0600); shipped files must be world-readable.
    for path in [tmp, *tmp.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _commit(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished folder into place; an existing one is swapped out only once the new one is whole."""
    (tmp / MARKER).write_text(MODEL_FOLDER.name + "\n")
    old = None
    if out_dir.exists():
        if not overwrite:
            raise OutputError(f"output folder {out_dir} appeared during training; choose another path")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def train_diffusion(
    name: str,
    data_dir: str | Path | None,
    out_dir: str | Path,
    steps: int,
    batch_size: int,
    lr: float,
    device: str,
    seed: int,
    cond_drop: float = 0.1,
    ema_decay: float = 0.999,
    progress: bool = True,
    *,
    overwrite: bool = False,
    warmup_steps: int | None = None,
    lr_schedule: str = "cosine",
    log_every: int = 50,
    recipe: str | None = None,
    dataset: tuple[torch.Tensor, torch.Tensor] | None = None,
    init_from: str | Path | None = None,
) -> Path:
    """Train built-in model ``name`` on Fashion-MNIST and write a diffusers folder to ``out_dir``; return it.

    ``data_dir`` holds the four IDX .gz files (``None``: the Debian package's location). ``device`` is
    ``cpu``, ``cuda[:N]`` or ``auto``; the thread count is left to the caller (``torch.set_num_threads``).
    ``cond_drop`` is the probability of replacing a label by the null class (CFG); ``ema_decay`` the EMA decay
    of the stored weights, ramped up as ``min(ema_decay, (1+s)/(10+s))`` so short runs do not keep their
    random initialisation. ``warmup_steps`` defaults to 5% of ``steps`` (at most 500). ``recipe`` is the label
    written to the model card ("CPU recipe"/"GPU recipe"; default from the device). ``dataset`` =
    ``(images [N,1,32,32] in [-1,1], labels int64 [N])`` replaces the files, for tests and custom data. The
    folder is built next to ``out_dir`` and renamed into place only when complete; an existing ``out_dir`` is
    refused unless ``overwrite``. ``init_from`` continues training from the weights of a folder this function
    wrote for the same model (e.g. to train a CPU model further); its earlier stages are kept in the card.
    """
    if name not in MODEL_NAMES:
        raise ConfigError(f"unknown built-in model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    _validate(steps, batch_size, lr, cond_drop, ema_decay, log_every)
    if lr_schedule not in ("cosine", "constant"):
        raise ConfigError(f"unknown lr schedule {lr_schedule!r}; use 'cosine' or 'constant'")
    dev = _resolve_device(device)
    out_dir = Path(out_dir).expanduser().resolve()
    _check_out_dir(out_dir, overwrite, [Path(init_from)] if init_from else [])
    warmup = min(500, max(1, steps // 20)) if warmup_steps is None else max(1, int(warmup_steps))

    torch.manual_seed(seed)
    previous: list[dict[str, Any]] = []
    if init_from is None:
        model = build_model(name)
        prepare_for_training(model)
    else:
        model, previous = _load_for_continuing(name, Path(init_from).expanduser())

    if dataset is None:
        images, labels = load_fmnist("train", data_dir)
        data_source = str(resolve_data_dir(data_dir))
    else:
        images, labels = dataset
        data_source = "in-memory dataset"
    _check_dataset(images, labels)
    images, labels = images.to(dev), labels.to(dev)
    n = images.shape[0]
    gen = torch.Generator(device=dev).manual_seed(seed)
    # channels_last lets oneDNN/cuDNN pick their fast convolution paths (≈1.3× per step on CPU).
    model = model.to(dev, memory_format=torch.channels_last).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    scheduler = build_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.to(dev)
    num_t = scheduler.config.num_train_timesteps
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=dev.type in ("cpu", "cuda"))
    n_params = sum(p.numel() for p in model.parameters())

    log_steps: list[int] = []
    log_loss: list[float] = []
    log_lr: list[float] = []
    running, running_n = 0.0, 0
    perm = torch.randperm(n, generator=gen, device=dev)
    cursor = 0

    bar = None
    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn(f"training {name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        task = bar.add_task("train", total=steps, loss="-")
        bar.start()

    start = time.perf_counter()
    try:
        for step in range(steps):
            if cursor + batch_size > n:
                perm = torch.randperm(n, generator=gen, device=dev)
                cursor = 0
            idx = perm[cursor : cursor + batch_size]
            cursor += batch_size
            x0, y = images[idx].contiguous(memory_format=torch.channels_last), labels[idx]
            b = x0.shape[0]
            flip = torch.rand(b, generator=gen, device=dev) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            drop = torch.rand(b, generator=gen, device=dev) < cond_drop
            y = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
            t = torch.randint(0, num_t, (b,), generator=gen, device=dev)
            noise = torch.randn(x0.shape, generator=gen, device=dev)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1.0 - a).sqrt() * noise

            cur_lr = lr * _lr_factor(step, steps, warmup, lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = cur_lr
            loss = torch.nn.functional.mse_loss(denoise(model, xt, t, y).float(), noise)
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"training diverged at step {step} (loss {loss.item()}); lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                    pe.lerp_(pm, 1.0 - decay)
                for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
                    be.copy_(bm)

            running += loss.item()
            running_n += 1
            if running_n == log_every or step == steps - 1:
                mean = running / running_n
                log_steps.append(step + 1)
                log_loss.append(round(mean, 6))
                log_lr.append(cur_lr)
                logger.info("%s step %d/%d loss %.4f lr %.2e %.1fs", name, step + 1, steps, mean, cur_lr,
                            time.perf_counter() - start)
                running, running_n = 0.0, 0
                if bar is not None:
                    bar.update(task, loss=f"{mean:.4f}")
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    wall = time.perf_counter() - start

    meta: dict[str, Any] = {
        "name": name,
        "model_class": model_class(name).__name__,
        "subfolder": model_subfolder(name),
        "num_classes": NUM_CLASSES,
        "null_class": NULL_CLASS,
        "class_names": FMNIST_CLASSES,
        "image_size": IMAGE_SIZE,
        "in_channels": IN_CHANNELS,
        "value_range": [-1.0, 1.0],
        "dataset": "Fashion-MNIST" if dataset is None else "custom",
        "data_source": data_source,
        "num_train_images": n,
        "steps": steps + sum(stage["steps"] for stage in previous),
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup,
        "lr_schedule": lr_schedule,
        "cond_drop": cond_drop,
        "ema_decay": ema_decay,
        "seed": seed,
        "wall_time_s": round(wall + sum(stage["wall_time_s"] for stage in previous), 1),
        "hardware": _hardware(dev),
        "recipe": recipe or ("GPU recipe" if dev.type == "cuda" else "CPU recipe"),
        "parameters": n_params,
        "weights_dtype": "float16",
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        # Filled in by hand once measured, with the bench command and settings, as the card's FP FID line is.
        "fp_fid": None,
    }
    stage = {k: meta[k] for k in ("batch_size", "lr", "warmup_steps", "lr_schedule", "ema_decay", "hardware")}
    meta["stages"] = [*previous, {"steps": steps, "wall_time_s": round(wall, 1), **stage}]
    done_before = sum(stage["steps"] for stage in previous)
    log = {
        "name": name,
        "log_every": log_every,
        "step": [s + done_before for s in log_steps],
        "loss": log_loss,
        "lr": log_lr,
        "wall_time_s": meta["wall_time_s"],
    }
    if init_from is not None:
        log = _prepend_log(Path(init_from).expanduser(), log)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _write_folder(tmp, ema, meta, log)
        _commit(tmp, out_dir, overwrite)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(
            f"cannot write model folder {out_dir} ({exc}); check the path and free disk space"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def recipe_for(name: str, hardware: str) -> Recipe:
    """The default :class:`Recipe` of ``name`` on ``hardware`` ("cpu" or "gpu")."""
    if name not in RECIPES:
        raise ConfigError(f"unknown built-in model {name!r}; choose one of {', '.join(RECIPES)}")
    if hardware not in RECIPES[name]:
        raise ConfigError(f"unknown hardware {hardware!r}; use one of {', '.join(RECIPES[name])}")
    return RECIPES[name][hardware]


__all__ = ["RECIPES", "Recipe", "recipe_for", "train_diffusion"]
