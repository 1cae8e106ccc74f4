"""Load a diffusion model from a built-in name or a diffusers folder on disk.

A folder has the layout of ``DDPMPipeline.save_pretrained``: ``unet/`` or ``transformer/`` (config.json and
safetensors weights) plus ``scheduler/scheduler_config.json``. Weights are only read from safetensors, never
unpickled. An optional ``qdiffuse.json`` at the root states conditioning facts the diffusers config cannot, such as
which class index is the null class for classifier-free guidance.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdiffuse.errors import ModelLoadError
from qdiffuse.models.denoiser import MODEL_KINDS, Denoiser

MODEL_SUBFOLDERS = ("unet", "transformer")
META_FILE = "qdiffuse.json"


@dataclass
class LoadedModel:
    """A denoiser with the scheduler config it was trained with and where it came from."""

    denoiser: Denoiser
    scheduler_config: dict[str, Any]
    source: str
    subfolder: str
    meta: dict[str, Any] = field(default_factory=dict)


def resolve_model_path(model: str | Path) -> Path:
    """A built-in model name or a folder path -> the folder."""
    path = Path(model)
    if path.exists():
        return path
    from qdiffuse.models import builtin

    if str(model) in builtin.BUILTIN_MODELS:
        return builtin.builtin_path(str(model))
    from qdiffuse.models.twins import TWINS

    names = ", ".join([*builtin.BUILTIN_MODELS, *TWINS])
    raise ModelLoadError(f"model {str(model)!r} is neither a folder nor a built-in model ({names})")


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{what} is missing: {path}; the folder must hold it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{what} {path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    except RecursionError:
        raise ModelLoadError(f"{what} {path} nests too deeply to be a config; restore the file") from None
    except OSError as exc:
        raise ModelLoadError(f"{what} {path} cannot be read ({exc.strerror or exc}); it must be a file") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what} {path} must hold a JSON object")
    return data


def find_model_subfolder(folder: Path) -> str:
    for sub in MODEL_SUBFOLDERS:
        if (folder / sub / "config.json").is_file():
            return sub
    raise ModelLoadError(
        f"{folder} is not a diffusers model folder: it needs unet/config.json or transformer/config.json "
        "(the layout DDPMPipeline.save_pretrained writes)"
    )


ParameterHook = Callable[[nn.Module, str, "nn.Parameter | None"], None]
_hooks = threading.local()
_hook_lock = threading.Lock()
_hook_users = 0
_original_register = nn.Module.register_parameter


def _register_with_hooks(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _original_register(module, name, param)
    for hook in getattr(_hooks, "stack", ()):
        hook(module, name, param)


@contextmanager
def register_parameter_hook(hook: ParameterHook) -> Iterator[None]:
    """Call ``hook(module, name, param)`` after every parameter this thread registers while the block runs.

    Every parameter of every module passes through ``nn.Module.register_parameter``; it is wrapped while any
    thread has a hook, and a hook sees only its own thread's modules, so models built in parallel threads do not
    see each other."""
    global _hook_users
    with _hook_lock:
        if _hook_users == 0:
            nn.Module.register_parameter = _register_with_hooks  # type: ignore[method-assign]
        _hook_users += 1
    stack = getattr(_hooks, "stack", None)
    if stack is None:
        stack = _hooks.stack = []
    stack.append(hook)
    try:
        yield
    finally:
        stack.remove(hook)
        with _hook_lock:
            _hook_users -= 1
            if _hook_users == 0:
                nn.Module.register_parameter = _original_register  # type: ignore[method-assign]


def _to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    if param is not None and param.device.type != "meta":
        module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no storage); buffers stay real.

    Buffers that diffusers computes at construction and never saves (a DiT's position embedding) must survive,
    which a plain ``torch.device("meta")`` context would lose. Each parameter is allocated once, moved to meta
    and freed, so building even a large skeleton holds at most one real parameter at a time.
    """
    with register_parameter_hook(_to_meta):
        yield


def build_model(config: dict[str, Any], where: str, meta: bool = False) -> nn.Module:
    """Instantiate a diffusers model class from its config dict, without weights (``meta``: parameters on the
    meta device, to be filled by the caller)."""
    import diffusers

    class_name = config.get("_class_name")
    if not isinstance(class_name, str) or class_name not in MODEL_KINDS:
        raise ModelLoadError(
            f"{where}: model class {class_name!r} is not supported; use one of {', '.join(MODEL_KINDS)}"
        )
    cls = getattr(diffusers, class_name)
    try:
        with warnings.catch_warnings(), (parameters_on_meta() if meta else nullcontext()):
            warnings.simplefilter("ignore")
            return cls.from_config(config)
    except Exception as exc:  # diffusers raises many types for bad configs
        raise ModelLoadError(f"{where}: cannot build {class_name} from its config ({exc})") from None


def load_model_folder(
    model: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None
) -> LoadedModel:
    """Load the FP model from a built-in name, a twin's name or a diffusers folder, in ``dtype`` (fp32, bf16,
    fp16; None or ``auto``: the dtype its weights are stored in, fp16 on a CPU as float32)."""
    from qdiffuse.models.dtypes import auto_dtype, check_dtype_supported, parse_dtype, stored_dtype
    from qdiffuse.models.twins import TWIN_META_KEY, TWINS, apply_twin

    dtype = parse_dtype(dtype)
    if str(model) in TWINS and not Path(model).exists():
        spec = TWINS[str(model)]
        base = load_model_folder(spec.base, device, dtype)
        apply_twin(base.denoiser.model, spec)
        base.meta[TWIN_META_KEY] = spec.to_dict()
        return LoadedModel(base.denoiser, base.scheduler_config, spec.name, base.subfolder, base.meta)
    folder = resolve_model_path(model)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder; pass a diffusers model folder or a built-in name")
    sub = find_model_subfolder(folder)
    config = read_json(folder / sub / "config.json", "model config")
    module = build_model(config, str(folder / sub))
    weights = sorted((folder / sub).glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(
            f"{folder / sub} holds no .safetensors weights; qdiffuse never unpickles .bin files — "
            "re-save the model with save_pretrained(safe_serialization=True)"
        )
    dtype = dtype or auto_dtype(stored_dtype(weights), device)
    check_dtype_supported(dtype, device)
    load_safetensors_into(module, weights, str(folder / sub), dtype)
    module.to(device).eval()
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json", "scheduler config")
    from qdiffuse.sampling.schedulers import check_schedule

    check_schedule(scheduler_config)
    meta = read_json(folder / META_FILE, "qdiffuse.json") if (folder / META_FILE).is_file() else {}
    denoiser = Denoiser.from_model(module, meta)
    source = str(folder.resolve()) if Path(model).exists() else str(model)
    return LoadedModel(denoiser, scheduler_config, source, sub, meta)


def load_safetensors_into(
    module: nn.Module, files: list[Path], where: str, dtype: torch.dtype = torch.float32
) -> None:
    """Load weights strictly (every parameter present, no unknown keys, readable files), the module's float
    parameters and buffers in ``dtype``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(
                f"{path} is not a readable safetensors file ({exc}); re-save or re-download it"
            ) from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelLoadError(f"{where}: weights do not match the config ({detail}); the folder is inconsistent")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ModelLoadError(
                f"{where}: weight {key} has shape {tuple(tensor.shape)}, config expects "
                f"{tuple(expected[key].shape)}"
            )
    if dtype != torch.float32:  # parameters only: buffers stay as built, as diffusers' own torch_dtype leaves them
        for sub in module.modules():
            for name, param in sub._parameters.items():
                if param is not None and param.is_floating_point():
                    sub._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
    module.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=True)


__all__ = ["LoadedModel", "load_model_folder", "resolve_model_path", "build_model", "read_json"]
