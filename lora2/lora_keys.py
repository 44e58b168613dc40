"""LoRA key spellings, in one place: which tool wrote a file, and how components are named in files.

Readers (:mod:`lora2.lora_formats`) pair tensors through :data:`SUFFIXES`; writers name components with
:func:`default_key` unless a key is already foreign (:func:`is_foreign_key`); the ComfyUI layer skips
text-encoder components by :data:`TEXT_ENCODER_PREFIXES`. A file's format is a :class:`LoRAFormat`,
decided by :func:`detect_format`: the spelling most of its pairs use, ties going to the earlier row
of :data:`SUFFIXES` (never to set or hash order, so a file reads the same in every process).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from enum import StrEnum


class LoRAFormat(StrEnum):
    """Who wrote a LoRA file, as its key spelling tells (a ``str``: it is stored as ``Adapter.source``)."""

    KOHYA = "kohya"
    """``<key>.lora_up.weight`` / ``.lora_down.weight`` (+ ``.alpha``): kohya, A1111, most trainers."""
    COMFYUI = "comfyui"
    """kohya's suffixes on ComfyUI's own module paths (``diffusion_model.…``)."""
    PEFT = "peft"
    """``.lora_B`` / ``.lora_A`` (optionally ``.default``): PEFT and current diffusers."""
    DIFFUSERS = "diffusers"
    """``.lora.up`` / ``.lora.down`` and ``_lora.up``: older diffusers attention processors."""
    TRANSFORMERS = "transformers"
    """``.lora_linear_layer.up`` / ``.down``: transformers-style layers."""


SUFFIXES: tuple[tuple[LoRAFormat, str, str], ...] = (
    (LoRAFormat.KOHYA, ".lora_up.weight", ".lora_down.weight"),
    (LoRAFormat.PEFT, ".lora_B.weight", ".lora_A.weight"),
    (LoRAFormat.PEFT, ".lora_B.default.weight", ".lora_A.default.weight"),
    (LoRAFormat.DIFFUSERS, ".lora.up.weight", ".lora.down.weight"),
    (LoRAFormat.DIFFUSERS, "_lora.up.weight", "_lora.down.weight"),
    (LoRAFormat.TRANSFORMERS, ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (LoRAFormat.PEFT, ".lora_B", ".lora_A"),
)
"""(format, up suffix, down suffix), most specific first; the order also breaks ties in :func:`detect_format`."""
UNSUPPORTED = {".lora_mid.weight": "LoCon/Tucker 'lora_mid'", ".dora_scale": "DoRA 'dora_scale'"}
"""Suffixes of formats whose ΔW is not ``up @ down``: refused by name rather than read wrongly."""
ALPHA_SUFFIX = ".alpha"

FOREIGN_PREFIXES = ("lora_", "lycoris_", "diffusion_model.", "unet.", "transformer.", "text_encoder", "base_model.")
"""Component names that are already LoRA key prefixes (read from another tool's file): kept as they are,
so a pruned or re-saved foreign LoRA stays readable by whatever read it before."""
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te1_", "te2_", "lora_te1", "lora_te2", "clip_")
"""Key prefixes of text-encoder components in foreign files (LoRA² adapts the diffusion model only)."""


def is_foreign_key(name: str) -> bool:
    return name.startswith(FOREIGN_PREFIXES)


def default_key(module_name: str) -> str:
    """kohya's naming, ``lora_unet_`` + the module path with dots as underscores (foreign keys kept)."""
    if is_foreign_key(module_name):
        return module_name
    return "lora_unet_" + module_name.replace(".", "_")


def detect_format(pairs: Iterable[tuple[str, LoRAFormat]]) -> LoRAFormat:
    """The format of a file from its ``(key prefix, format of that pair)``: the most common spelling, a tie
    going to the earlier row of :data:`SUFFIXES`; kohya suffixes on ComfyUI module paths are ComfyUI's."""
    pairs = list(pairs)
    counts = Counter(kind for _, kind in pairs)
    rank = {kind: index for index, (kind, _, _) in reversed(list(enumerate(SUFFIXES)))}
    kind = min(counts, key=lambda k: (-counts[k], rank[k]))
    if kind is LoRAFormat.KOHYA and any(prefix.startswith("diffusion_model.") for prefix, _ in pairs):
        return LoRAFormat.COMFYUI
    return kind
