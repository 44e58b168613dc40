"""Reading a LoRA file's metadata: LoRA²'s ``lora2`` JSON entry and kohya's ``ss_*`` fields, validated.

Two policies, because the two kinds of metadata mean different things:

* ``lora2`` is ours and describes the tensors (which module each key adapts, ν per key, the config the
  ranks came from, the history the heatmap draws). If it is not what we write, the tensors cannot be
  trusted to mean what it says, so :func:`parse_lora2_info` raises :class:`LoRA2Error` naming the file and
  the field rather than letting a ``JSONDecodeError`` or ``AttributeError`` surface three calls later.
* ``ss_*`` is kohya's training record, written by many tools in many dialects, and nothing in it
  changes ΔW: a field that does not parse (``ss_steps = "many"``) is logged and ignored, and the LoRA
  still loads.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from .config import LoRA2Config
from .errors import LoRA2Error

log = logging.getLogger("LoRA²")

FORMAT_VERSION = 1


@dataclass
class Lora2Info:
    """The validated ``lora2`` entry (empty for files other tools wrote)."""

    modules: dict[str, str] = field(default_factory=dict)
    """file key -> module name."""
    nu: dict[str, float] = field(default_factory=dict)
    config: LoRA2Config | None = None
    history: dict[str, Any] | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    state_id: str | None = None
    """Pairs the LoRA with the ``.lora2state`` written with it (see :mod:`lora2.lora_file`)."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mapping(info: dict[str, Any], name: str, check, what: str, source: str) -> dict[str, Any]:
    value = info.get(name, {})
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and check(v) for k, v in value.items()):
        raise LoRA2Error(f"{source}: the 'lora2' metadata field '{name}' must map LoRA keys to {what}")
    return value


def _optional(info: dict[str, Any], name: str, kind: type, source: str) -> Any:
    value = info.get(name)
    if value is not None and not isinstance(value, kind):
        raise LoRA2Error(f"{source}: the 'lora2' metadata field '{name}' must be a {kind.__name__} or null")
    return value


def _history(value: Any, source: str) -> dict[str, Any] | None:
    """The rank/loss history as ``lora2.train.History.to_dict`` writes it, or None."""
    if value is None:
        return None
    where = f"{source}: the 'lora2' metadata field 'history'"
    if not isinstance(value, dict):
        raise LoRA2Error(f"{where} must be an object with 'loss' and 'ranks' lists")
    components = value.get("components", [])
    loss, ranks = value.get("loss", []), value.get("ranks", [])
    if not isinstance(components, list) or not all(isinstance(c, str) for c in components):
        raise LoRA2Error(f"{where}: 'components' must be a list of names")
    if not isinstance(loss, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in loss):
        raise LoRA2Error(f"{where}: 'loss' must be a list of numbers")
    if not isinstance(ranks, list) or not all(
        isinstance(row, list) and all(isinstance(r, int) and not isinstance(r, bool) for r in row) for row in ranks
    ):
        raise LoRA2Error(f"{where}: 'ranks' must be a list of integer lists, one per step")
    for name in ("eval_steps", "eval_loss", "validation_steps"):
        series = value.get(name, [])
        if not isinstance(series, list) or not all(_is_number(x) for x in series):
            raise LoRA2Error(f"{where}: '{name}' must be a list of numbers")
    return value


def _config(value: Any, source: str) -> LoRA2Config | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise LoRA2Error(f"{source}: the 'lora2' metadata field 'config' must be an object or null")
    try:
        return LoRA2Config.from_dict(value)
    except (LoRA2Error, TypeError, ValueError, AttributeError) as exc:
        # another version of the pack may have other config fields; the tensors do not depend on them
        log.warning("LoRA²: %s: ignoring its LoRA² config, which this version cannot read (%s)", source, exc)
        return None


def parse_lora2_info(metadata: dict[str, str], source: str) -> Lora2Info:
    """The ``lora2`` entry of ``metadata``, validated field by field (absent: an empty :class:`Lora2Info`)."""
    text = metadata.get("lora2")
    if text is None:
        return Lora2Info()
    try:
        info = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise LoRA2Error(f"{source}: the 'lora2' metadata is not valid JSON ({exc}); the file is damaged") from None
    if not isinstance(info, dict):
        raise LoRA2Error(f"{source}: the 'lora2' metadata must be a JSON object, found {type(info).__name__}")
    version = info.get("version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise LoRA2Error(f"{source}: the 'lora2' metadata field 'version' must be an integer")
    if version > FORMAT_VERSION:
        raise LoRA2Error(f"{source} was written by a newer ComfyUI-LoRA² (format {version}); update the pack")
    modules = _mapping(info, "modules", lambda v: isinstance(v, str) and v, "module names", source)
    if len(set(modules.values())) != len(modules):
        raise LoRA2Error(f"{source}: the 'lora2' metadata field 'modules' maps two LoRA keys to one module")
    return Lora2Info(
        modules=modules,
        nu={k: float(v) for k, v in _mapping(info, "nu", _is_number, "finite numbers", source).items()},
        config=_config(info.get("config"), source),
        history=_history(info.get("history"), source),
        source=_optional(info, "source", str, source),
        extra=_optional(info, "extra", dict, source) or {},
        state_id=_optional(info, "state_id", str, source),
    )


def kohya_steps(metadata: dict[str, str], source: str) -> int:
    """``ss_steps`` as a count; a value that is not one is logged and read as 0 (see the module docstring)."""
    text = metadata.get("ss_steps")
    if text is None or not str(text).strip():
        return 0
    try:
        steps = int(float(str(text).strip()))
    except (ValueError, OverflowError):
        steps = -1
    if steps < 0:
        log.warning("LoRA²: %s has ss_steps = %r, not a step count; ignoring that field", source, text)
        return 0
    return steps


def kohya_base_model(metadata: dict[str, str]) -> str:
    """``ss_base_model_version`` (what the file says it was trained on), ``unknown`` when absent or blank."""
    text = str(metadata.get("ss_base_model_version", "")).strip()
    return text or "unknown"
