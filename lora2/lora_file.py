"""Adapters to and from safetensors files: kohya-style LoRA weights, plus LoRA²'s own metadata.

The weights file is an ordinary LoRA that every loader reads: per component
``<key>.lora_down.weight`` ``[r, in(, kh, kw)]``, ``<key>.lora_up.weight`` ``[out, r(, 1, 1)]`` and an
explicit ``<key>.alpha``. Importance is already folded into the factors (see :mod:`lora2.adapter`).

Why ``alpha = 1`` for every component (scale ``1/r``, with ``√r`` folded into each factor) rather than
``alpha = r``: loaders that turn per-module ranks into one config (diffusers/PEFT: the most common rank
and alpha, plus per-module patterns) honour the rank pattern but not always the alpha pattern, which
silently rescales every component whose rank is not the most common one. One alpha for all modules
leaves nothing to get wrong, and every loader then computes exactly ``ΔW = up @ down``.

The ``ss_*`` metadata follows kohya's trainer (``ss_network_dim`` is ``Dynamic`` because every
component has its own rank); the ``lora2`` entry is JSON with the ranks, ν,
config, module names and rank history, so a heatmap can be redrawn from the file alone.

Training state for resume goes to a separate file (``<name>.lora2state``, safetensors inside): extra
keys in the LoRA itself would make ComfyUI's loader warn "lora key not loaded", and the extension keeps
it out of ComfyUI's LoRA lists. Optimizer state is flattened into tensors plus JSON; nothing is
pickled. Every write goes to a temporary file in the target folder first and is renamed into place, so a
crash never leaves half a file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapter import Adapter, Component, ResumeState
from .config import LoRA2Config
from .errors import LoRA2Error
from .lora_formats import fold_scale, parse_lora

FORMAT_VERSION = 1
FILE_ALPHA = 1.0
"""The ``.alpha`` written for every component (see the module docstring)."""
STATE_SUFFIX = ".lora2state"


FOREIGN_PREFIXES = ("lora_", "lycoris_", "diffusion_model.", "unet.", "transformer.", "text_encoder", "base_model.")
"""Component names that are already LoRA key prefixes (read from another tool's file): kept as they are,
so a pruned or re-saved foreign LoRA stays readable by whatever read it before."""


def is_foreign_key(name: str) -> bool:
    return name.startswith(FOREIGN_PREFIXES)


def default_key(module_name: str) -> str:
    """kohya's naming, ``lora_unet_`` + the module path with dots as underscores (foreign keys kept)."""
    if is_foreign_key(module_name):
        return module_name
    return "lora_unet_" + module_name.replace(".", "_")


def write_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path`` (atomic on one filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def file_factors(component: Component) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(up, down, alpha)`` as written to files (alpha = 1, so scale 1/r and √r in each factor).

    LoRA² Apply patches models with exactly these, so that it and a stock loader reading the file
    compute the same numbers, not just the same ΔW.
    """
    root = float(component.rank) ** 0.5
    return component.up * root, component.down * root, FILE_ALPHA


def adapter_tensors(
    adapter: Adapter, key_for: Callable[[str], str] = default_key, dtype: torch.dtype = torch.float16
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya-style tensors and metadata of ``adapter`` (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    keys: dict[str, str] = {}
    for name, component in adapter.components.items():
        key = key_for(name)
        if key in keys.values():
            raise LoRA2Error(f"two components map to the LoRA key {key!r}; the key mapping is not one-to-one")
        keys[name] = key
        up, down, alpha = file_factors(component)
        tensors[f"{key}.lora_up.weight"] = up.to(dtype)
        tensors[f"{key}.lora_down.weight"] = down.to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    info = {
        "version": FORMAT_VERSION,
        "ranks": {keys[n]: c.rank for n, c in adapter.components.items()},
        "nu": {keys[n]: c.nu for n, c in adapter.components.items() if c.nu is not None},
        "modules": {keys[n]: n for n in adapter.components},
        "config": adapter.config.to_dict() if adapter.config is not None else None,
        "history": adapter.history,
        "source": adapter.source,
        "extra": adapter.extra,
    }
    ranks = [c.rank for c in adapter.components.values()]
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "Dynamic",
        "ss_network_alpha": str(FILE_ALPHA),
        "ss_base_model_version": adapter.base_model,
        "ss_steps": str(adapter.steps),
        "ss_training_comment": "LoRA² adaptive-rank LoRA (ComfyUI-LoRA²)",
        "ss_mean_rank": f"{sum(ranks) / max(len(ranks), 1):.2f}",
        "lora2": json.dumps(info),
    }
    return tensors, metadata


def save_adapter(
    path: Path, adapter: Adapter, key_for: Callable[[str], str] = default_key, dtype: torch.dtype = torch.float16
) -> None:
    """Write ``adapter`` as a standard LoRA file (and its resume state beside it, when it has one)."""
    tensors, metadata = adapter_tensors(adapter, key_for, dtype)
    write_safetensors_atomic(Path(path), tensors, metadata)
    if adapter.resume is not None:
        save_resume_state(state_path(path), adapter.resume)


def state_path(path: Path) -> Path:
    """Where the resume state of the LoRA file ``path`` lives."""
    path = Path(path)
    return path.with_name(path.stem + STATE_SUFFIX)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and metadata with safetensors (never pickle); errors name the file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except FileNotFoundError:
        raise LoRA2Error(f"LoRA file '{path}' does not exist") from None
    except Exception as exc:
        raise LoRA2Error(f"'{path}' is not a readable safetensors file ({exc}); only safetensors is supported") from exc
    return tensors, metadata


def load_adapter(path: Path, with_resume: bool = True) -> Adapter:
    """Read a LoRA file: ours (ranks, ν, config, history come back) or any layout :mod:`lora_formats` knows.

    Components of LoRA² files get their module names back; other files keep their key prefixes as
    names (``lora_unet_...``, ``diffusion_model....``, ``unet....``), which the nodes map onto a model
    with ComfyUI's own key map.
    """
    tensors, metadata = read_safetensors(Path(path))
    info = json.loads(metadata["lora2"]) if "lora2" in metadata else {}
    modules: dict[str, str] = info.get("modules", {})
    nus: dict[str, float] = info.get("nu", {})
    parsed = parse_lora(tensors, f"'{path}'")
    components = {}
    for key, (up, down, scale) in parsed.pairs.items():
        up, down = fold_scale(up, down, scale)
        components[modules.get(key, key)] = Component(up=up, down=down, nu=nus.get(key))
    extra = dict(info.get("extra", {}))
    if parsed.ignored:
        extra["ignored_keys"] = parsed.ignored
    config = LoRA2Config.from_dict(info["config"]) if info.get("config") else None
    adapter = Adapter(
        components=components,
        base_model=metadata.get("ss_base_model_version", "unknown"),
        steps=int(metadata.get("ss_steps", "0") or 0),
        config=config,
        history=info.get("history"),
        source=info.get("source", parsed.format),
        extra=extra,
    )
    if with_resume and state_path(path).exists():
        adapter.resume = load_resume_state(state_path(path))
    return adapter


# ----------------------------------------------------------------------------- resume state
def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in layout["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": layout["param_groups"]}


def save_resume_state(path: Path, resume: ResumeState) -> None:
    tensors = {f"handle.{k}": v for k, v in resume.handle_state.items()}
    tensors["generator"] = resume.generator_state
    layout = None
    if resume.optimizer_state is not None:
        optimizer_tensors, layout = _flatten_optimizer(resume.optimizer_state)
        tensors.update(optimizer_tensors)
    metadata = {"lora2_resume": json.dumps({"optimizer": layout, "train_config": resume.train_config})}
    write_safetensors_atomic(Path(path), tensors, metadata)


def load_resume_state(path: Path) -> ResumeState:
    tensors, metadata = read_safetensors(Path(path))
    if "lora2_resume" not in metadata:
        raise LoRA2Error(f"'{path}' is not a LoRA² training state (no 'lora2_resume' metadata)")
    info = json.loads(metadata["lora2_resume"])
    handle_state = {k[len("handle.") :]: v for k, v in tensors.items() if k.startswith("handle.")}
    optimizer_tensors = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
    optimizer = _unflatten_optimizer(optimizer_tensors, info["optimizer"]) if info["optimizer"] else None
    return ResumeState(handle_state, optimizer, tensors["generator"], info["train_config"])
