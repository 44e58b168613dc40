"""Which layers of a model get a LoRA² component: presets over common naming schemes, or a regex.

The presets know the attention and feed-forward names of the model families ComfyUI loads, so one
preset means the same thing on SD1.5/SDXL UNets (``attn1.to_q``, ``ff.net.0.proj``), diffusers
models, Flux (``img_attn.qkv``, ``single_blocks.N.linear1``), SD3/MMDiT (``attn.qkv``, ``mlp.fc1``)
and Hugging Face transformers (``q_proj``, ``fc1``):

* ``attn`` (the default and the paper's choice): the q, k, v and output projections of attention,
  each its own component; fused ``qkv`` projections count as one component.
* ``attn+ff``: plus the feed-forward layers of the same blocks.
* ``all-linear``: every ``nn.Linear``.
* ``all``: every ``nn.Linear`` and non-grouped ``nn.Conv2d`` (LoCon-style).
* anything else is a regular expression searched in the module's dotted name (``re.search``),
  over the layer kinds in ``LoRA2Config.module_types``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from .errors import LoRA2Error

_ATTENTION_LEAVES = re.compile(
    r"(^|\.)(to_q|to_k|to_v|to_out(\.0)?|q_proj|k_proj|v_proj|o_proj|out_proj|add_q_proj|add_k_proj|add_v_proj"
    r"|to_add_out|query|key|value)$"
)
"""Leaf names that are attention projections wherever they appear."""
_ATTENTION_CONTEXT_LEAVES = re.compile(r"(attn|attention)[^.]*\.(qkv|proj|q|k|v|o|out|wq|wk|wv|wo)$")
"""Ambiguous leaf names (``qkv``, ``proj``, ...) that count only inside a module named like attention."""
_FLUX_SINGLE_BLOCK = re.compile(r"single_(transformer_)?blocks\.\d+\.(linear1|linear2)$")
"""Flux single-stream blocks fuse q, k, v (and the MLP) into ``linear1`` and the outputs into ``linear2``."""
_FEED_FORWARD = re.compile(
    r"((^|\.)(ff|ff_context|feed_forward|mlp|img_mlp|txt_mlp)\.(net\.)?\d+(\.proj)?$)"
    r"|((^|\.)(mlp|ff|feed_forward)\.(fc1|fc2|w1|w2|w3|c_fc|c_proj|up_proj|down_proj|gate_proj)$)"
    r"|((^|\.)(fc1|fc2|up_proj|down_proj|gate_proj)$)"
)

PRESETS = ("attn", "attn+ff", "all-linear", "all")


def _is_attention(name: str) -> bool:
    return bool(
        _ATTENTION_LEAVES.search(name) or _ATTENTION_CONTEXT_LEAVES.search(name) or _FLUX_SINGLE_BLOCK.search(name)
    )


def _is_feed_forward(name: str) -> bool:
    return bool(_FEED_FORWARD.search(name))


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return "conv2d"
    return None


def _matcher(targets: str, module_types: tuple[str, ...]):
    if targets == "attn":
        return lambda name, kind: kind == "linear" and _is_attention(name)
    if targets == "attn+ff":
        return lambda name, kind: kind == "linear" and (_is_attention(name) or _is_feed_forward(name))
    if targets == "all-linear":
        return lambda name, kind: kind == "linear"
    if targets == "all":
        return lambda name, kind: kind in ("linear", "conv2d")
    try:
        pattern = re.compile(targets)
    except re.error as exc:
        raise LoRA2Error(
            f"targets {targets!r} is neither a preset {PRESETS} nor a valid regular expression: {exc}"
        ) from exc
    return lambda name, kind: kind in module_types and bool(pattern.search(name))


def select_targets(
    model: nn.Module, targets: str, exclude: str | None = None, module_types: tuple[str, ...] = ("linear", "conv2d")
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(dotted name, layer)`` for every layer the preset or regex picks, in model order.

    Raises :class:`LoRA2Error` naming a few of the model's layers when nothing matches, so the user
    can write a regex that does.
    """
    matches = _matcher(targets, module_types)
    excluded = re.compile(exclude) if exclude else None
    found = 0
    candidates: list[str] = []
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None or not name:
            continue
        candidates.append(name)
        if excluded is not None and excluded.search(name):
            continue
        if matches(name, kind):
            found += 1
            yield name, module
    if not found:
        sample = ", ".join(candidates[:8]) or "none"
        raise LoRA2Error(
            f"targets {targets!r} matched no layer of this model. Its Linear/Conv2d layers start with: {sample}. "
            f"Pick another preset {PRESETS} or a regular expression on these names."
        )
