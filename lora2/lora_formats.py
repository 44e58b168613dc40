"""Read the LoRA tensor layouts in circulation into (up, down, scale) per adapted weight.

One table of key suffixes (:data:`lora2.lora_keys.SUFFIXES`) covers the formats ComfyUI, kohya, A1111,
diffusers and PEFT write: ``.lora_up/.lora_down`` (kohya, ComfyUI-native ``diffusion_model.*``),
``.lora_B/.lora_A`` (PEFT and diffusers), ``.lora.up/.lora.down`` and ``_lora.up/_lora.down`` (older diffusers attention
processors), ``.lora_linear_layer.up/.down`` (transformers-style) and ``.lora_B.default`` (PEFT with a
named adapter). ``<key>.alpha`` gives kohya's scale ``alpha / rank``; without it the scale is 1, which
is what ComfyUI and diffusers assume too. Formats whose ΔW is not ``up @ down`` (LoCon's Tucker
``lora_mid``, DoRA's ``dora_scale``) are refused by name rather than read wrongly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .adapter import check_factor_shapes
from .errors import LoRA2Error
from .lora_keys import ALPHA_SUFFIX, SUFFIXES, UNSUPPORTED, LoRAFormat, detect_format


@dataclass
class ParsedLoRA:
    """What a LoRA state dict holds: per key prefix ``(up, down, scale)``, its format, and leftovers."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    format: LoRAFormat
    ignored: list[str] = field(default_factory=list)


def parse_lora(tensors: dict[str, torch.Tensor], source: str = "this file") -> ParsedLoRA:
    """Pair every up/down tensor by its key prefix; ``source`` names the file in error messages."""
    for suffix, what in UNSUPPORTED.items():
        bad = next((k for k in tensors if k.endswith(suffix)), None)
        if bad is not None:
            raise LoRA2Error(f"{source} uses {what} ({bad}); only plain LoRA (up @ down) can be read")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    used: set[str] = set()
    formats: list[tuple[str, LoRAFormat]] = []
    for name, up_suffix, down_suffix in SUFFIXES:
        for key in sorted(tensors):
            if key in used or not key.endswith(up_suffix):
                continue
            prefix = key[: -len(up_suffix)]
            down_key = prefix + down_suffix
            if down_key not in tensors:
                raise LoRA2Error(f"{source}: {key} has no matching {down_key}")
            up, down = _factors(tensors, key, down_key, source)
            alpha_key = prefix + ALPHA_SUFFIX
            alpha = _alpha(tensors[alpha_key], f"{source}: '{alpha_key}'") if alpha_key in tensors else None
            scale = 1.0 if alpha is None else alpha / down.shape[0]
            used.update({key, down_key, alpha_key})
            pairs[prefix] = (up, down, scale)
            formats.append((prefix, name))
    if not pairs:
        raise LoRA2Error(f"{source} holds no LoRA weights (no up/down pairs such as '<key>.lora_up.weight')")
    return ParsedLoRA(pairs, detect_format(formats), sorted(set(tensors) - used))


COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Factor dtypes kept as stored; others (fp8 ...) are widened to float32 once, since they cannot be computed with."""


def _factors(tensors: dict[str, torch.Tensor], up_key: str, down_key: str, source: str) -> tuple[torch.Tensor, ...]:
    """The pair in the file's own dtype, refused by file and key when it is not a finite LoRA pair.

    Not widened to float32: a float16 file would take three times its size in memory (the file's
    tensors, then two float32 copies) for numbers every consumer widens per use anyway.
    """
    up, down = tensors[up_key], tensors[down_key]
    check_factor_shapes(up, down, f"{source}: '{up_key}' {_shape(up)} / '{down_key}' {_shape(down)}")
    up, down = (t if t.dtype in COMPUTE_DTYPES else t.float() for t in (up, down))
    for key, tensor in ((up_key, up), (down_key, down)):
        if not bool(torch.isfinite(tensor).all()):
            raise LoRA2Error(f"{source}: '{key}' holds NaN or infinite values; the file is damaged, replace it")
    return up, down


def _shape(tensor: object) -> tuple[int, ...] | str:
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__


def _alpha(tensor: torch.Tensor, where: str) -> float:
    """A kohya ``.alpha``: one finite number (a vector would scale every rank position differently)."""
    if not isinstance(tensor, torch.Tensor) or tensor.numel() != 1 or tensor.is_complex():
        raise LoRA2Error(f"{where} must hold one number, found shape {_shape(tensor)}; the file is damaged")
    value = float(tensor.double().reshape(()))
    if not math.isfinite(value):
        raise LoRA2Error(f"{where} is {value}; alpha must be a finite number")
    return value


def fold_scale_(up: torch.Tensor, down: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``scale`` into the factors (√ on each side, in place) so that ``ΔW = up @ down``.

    In place because the factors are the file's freshly read tensors: a scaled copy of each would
    double what loading holds. In float16/bfloat16 the product is rounded once to the factor's dtype,
    the precision the file was written in.
    """
    if scale == 1.0:
        return up, down
    root = abs(scale) ** 0.5
    return up.mul_(root if scale > 0 else -root), down.mul_(root)
