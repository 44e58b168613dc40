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
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapter import Adapter, Component, ResumeState
from .errors import LoRA2Error
from .lora_formats import fold_scale_, parse_lora
from .lora_keys import default_key
from .lora_metadata import FORMAT_VERSION, kohya_base_model, kohya_steps, parse_lora2_info
from .paths import atomic_write

log = logging.getLogger("LoRA²")

FILE_ALPHA = 1.0
"""The ``.alpha`` written for every component (see the module docstring)."""
STATE_SUFFIX = ".lora2state"


FILE_KEYS = "file_keys"
"""``adapter.extra[FILE_KEYS]``: component name -> the LoRA key it was read from (or trained for). It rides
in ``extra`` because every step between Load and Save (prune, copies) carries ``extra`` along, so a file
re-saved without the MODEL connected keeps the names the tools that read it before expect."""


def lora_key(adapter: Adapter, name: str, key_for: Callable[[str], str] = default_key) -> str:
    """The one key-naming rule: the key the component was read from or trained for, else ``key_for``'s.

    Every writer goes through here (Save with or without the MODEL, Train's checkpoints), so a key
    survives Load -> Prune -> Save unchanged, whatever spelling its file used.
    """
    remembered = adapter.extra.get(FILE_KEYS)
    if isinstance(remembered, dict) and isinstance(remembered.get(name), str):
        return remembered[name]
    return key_for(name)


def with_file_keys(adapter: Adapter, key_for: Callable[[str], str]) -> Adapter:
    """``adapter`` remembering ``key_for``'s key of every component (what Train does with the model's names)."""
    keys = {name: lora_key(adapter, name, key_for) for name in adapter.components}
    adapter.extra = {**adapter.extra, FILE_KEYS: keys}
    return adapter


def write_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (see :func:`lora2.paths.atomic_write`)."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(Path(path), lambda temporary: save_file(contiguous, str(temporary), metadata=metadata))


def file_factors(component: Component) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(up, down, alpha)`` as written to files (alpha = 1, so scale 1/r and √r in each factor).

    LoRA² Apply patches models with exactly these, so that it and a stock loader reading the file
    compute the same numbers, not just the same ΔW.
    """
    root = float(component.rank) ** 0.5
    return component.up * root, component.down * root, FILE_ALPHA


def adapter_tensors(
    adapter: Adapter,
    key_for: Callable[[str], str] = default_key,
    dtype: torch.dtype = torch.float16,
    state_id: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya-style tensors and metadata of ``adapter`` (see the module docstring); keys by :func:`lora_key`."""
    tensors: dict[str, torch.Tensor] = {}
    keys: dict[str, str] = {}
    for name, component in adapter.components.items():
        key = lora_key(adapter, name, key_for)
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
        "extra": {k: v for k, v in adapter.extra.items() if k not in (FILE_KEYS, "ignored_keys")},
        "state_id": state_id,
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
    """Write ``adapter`` as a standard LoRA file (and its resume state beside it, when it has one).

    A ``.lora2state`` already beside ``path`` belongs to the file being replaced: it is removed first, so
    a later Load can never attach an old run's state to the new weights. The two files carry one random
    ``state_id``; a crash between the two writes leaves a pair whose ids differ, which Load refuses too.
    """
    path = Path(path)
    state_id = secrets.token_hex(8) if adapter.resume is not None else None
    tensors, metadata = adapter_tensors(adapter, key_for, dtype, state_id)
    state_path(path).unlink(missing_ok=True)
    write_safetensors_atomic(path, tensors, metadata)
    if adapter.resume is not None:
        save_resume_state(state_path(path), adapter.resume, state_id)


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
    with ComfyUI's own key map. Header, metadata and every tensor are validated: a damaged file raises
    :class:`LoRA2Error` naming the file and the key (see :mod:`lora_formats`, :mod:`lora_metadata`).
    """
    source = f"'{path}'"
    tensors, metadata = read_safetensors(Path(path))
    info = parse_lora2_info(metadata, source)
    parsed = parse_lora(tensors, source)
    components, keys = {}, {}
    for key, (up, down, scale) in parsed.pairs.items():
        up, down = fold_scale_(up, down, scale)
        name = info.modules.get(key, key)
        if name in components:
            raise LoRA2Error(f"{source}: two LoRA keys belong to the module {name!r}; the file is damaged")
        components[name] = Component(up=up, down=down, nu=info.nu.get(key))
        keys[name] = key
    extra = {**info.extra, FILE_KEYS: keys}
    if parsed.ignored:
        extra["ignored_keys"] = parsed.ignored
    adapter = Adapter(
        components=components,
        base_model=kohya_base_model(metadata),
        steps=kohya_steps(metadata, source),
        config=info.config,
        history=info.history,
        source=info.source or parsed.format,
        extra=extra,
    )
    if with_resume and state_path(path).exists():
        adapter.resume = _paired_state(Path(path), info.state_id)
    return adapter


def _paired_state(path: Path, state_id: str | None) -> ResumeState | None:
    """The ``.lora2state`` beside ``path`` when it was written with it; a stale one is left unattached."""
    resume, saved_id = _read_resume_state(state_path(path))
    if saved_id != state_id:
        log.warning(
            "LoRA²: '%s' was not written with '%s' (left by an earlier file of that name); it is not attached. "
            "Delete it, or resume from the run's own checkpoint",
            state_path(path),
            path.name,
        )
        return None
    return resume


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


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], layout: Any, source: str) -> dict[str, Any]:
    if not isinstance(layout, dict) or not isinstance(layout.get("param_groups"), list):
        raise LoRA2Error(f"{source}: the optimizer layout in 'lora2_resume' is damaged (no 'param_groups' list)")
    scalars = layout.get("scalars", {})
    if not isinstance(scalars, dict) or not all(isinstance(v, dict) for v in scalars.values()):
        raise LoRA2Error(f"{source}: the optimizer layout in 'lora2_resume' is damaged ('scalars')")
    state: dict[int, dict[str, Any]] = {}
    try:
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
        for index, values in scalars.items():
            state.setdefault(int(index), {}).update(values)
    except ValueError:
        raise LoRA2Error(f"{source}: optimizer entries must be named 'optimizer.<index>.<name>'") from None
    return {"state": state, "param_groups": layout["param_groups"]}


def save_resume_state(path: Path, resume: ResumeState, state_id: str | None = None) -> None:
    """Write ``resume`` to ``path`` (tensors, and JSON for what is not a tensor; nothing pickled)."""
    tensors = {f"handle.{k}": v for k, v in resume.handle_state.items()}
    tensors["generator"] = resume.generator_state
    layout = None
    if resume.optimizer_state is not None:
        optimizer_tensors, layout = _flatten_optimizer(resume.optimizer_state)
        tensors.update(optimizer_tensors)
    info = {"optimizer": layout, "train_config": resume.train_config, "state_id": state_id}
    write_safetensors_atomic(Path(path), tensors, {"lora2_resume": json.dumps(info)})


def _read_resume_state(path: Path) -> tuple[ResumeState, str | None]:
    source = f"'{path}'"
    tensors, metadata = read_safetensors(Path(path))
    if "lora2_resume" not in metadata:
        raise LoRA2Error(f"{source} is not a LoRA² training state (no 'lora2_resume' metadata)")
    try:
        info = json.loads(metadata["lora2_resume"])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise LoRA2Error(f"{source}: the 'lora2_resume' metadata is not valid JSON ({exc}); it is damaged") from None
    if not isinstance(info, dict) or not isinstance(info.get("train_config"), dict):
        raise LoRA2Error(f"{source}: the 'lora2_resume' metadata has no 'train_config' object; the file is damaged")
    generator = tensors.get("generator")
    if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8 or generator.dim() != 1:
        raise LoRA2Error(f"{source} has no random generator state ('generator', uint8); the file is damaged")
    handle_state = {k[len("handle.") :]: v for k, v in tensors.items() if k.startswith("handle.")}
    optimizer_tensors = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
    layout = info.get("optimizer")
    optimizer = _unflatten_optimizer(optimizer_tensors, layout, source) if layout else None
    state_id = info.get("state_id") if isinstance(info.get("state_id"), str) else None
    return ResumeState(handle_state, optimizer, generator, info["train_config"]), state_id


def load_resume_state(path: Path) -> ResumeState:
    """Read a ``.lora2state``; a damaged one raises :class:`LoRA2Error` naming the file."""
    return _read_resume_state(path)[0]
