"""Adapters on ComfyUI models: ModelPatcher patches, and the LoRA key spellings ComfyUI maps to weights.

The patches are ComfyUI's own ``LoRAAdapter`` objects, so LoRA² Apply and the stock LoRA loader change a
model identically; key names come from ComfyUI's tables, so files name modules the way A1111, kohya and
diffusers expect for that model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import comfy.lora
import comfy.utils
from comfy.weight_adapter.lora import LoRAAdapter

from ...lora2.adapter import Adapter
from ...lora2.errors import LoRA2Error
from ...lora2.lora_file import file_factors
from ...lora2.lora_keys import TEXT_ENCODER_PREFIXES, is_foreign_key
from .model import base_model, model_family

log = logging.getLogger("LoRA²")


def weight_key(component: str) -> str:
    return f"diffusion_model.{component}.weight"


def patch_targets(model, names) -> tuple[dict[str, object], list[str]]:
    """Where each component goes in ``model``: our module names directly, any other spelling (kohya,
    diffusers, PEFT, ComfyUI-native) through ComfyUI's own LoRA key map. Returns targets and leftovers."""
    weights = set(base_model(model).state_dict())
    key_map = None
    targets, unresolved = {}, []
    for name in names:
        if weight_key(name) in weights:
            targets[name] = weight_key(name)
            continue
        key_map = key_map if key_map is not None else lora_key_map(model)
        if name in key_map:
            targets[name] = key_map[name]
        else:
            unresolved.append(name)
    return targets, unresolved


def apply_adapter(model, adapter: Adapter, strength: float):
    """A clone of ``model`` with the adapter as LoRA patches (merged into the weights when loaded).

    The patches are the same ``LoRAAdapter`` objects ComfyUI's own LoRA loader builds from a file
    LoRA² Save writes (same factors, same alpha), so Apply and the stock loader change a model identically. Text-encoder
    components of foreign files are skipped: this applies to the MODEL only.
    """
    clone = model.clone()
    if strength == 0.0 or not adapter.components:
        return clone
    targets, unresolved = patch_targets(model, adapter.components)
    text = [n for n in unresolved if n.startswith(TEXT_ENCODER_PREFIXES)]
    unknown = [n for n in unresolved if n not in text]
    if text:
        log.info("LoRA² Apply: skipping %d text-encoder components (the MODEL is adapted only)", len(text))
    if unknown:
        raise LoRA2Error(
            f"{len(unknown)} adapter components match no weight of this model (first: {unknown[0]}); "
            f"the adapter was made for {adapter.base_model}, this model is {model_family(model)}"
        )
    patches = {}
    for name, target in targets.items():
        up, down, alpha = file_factors(adapter.components[name])
        patches[target] = LoRAAdapter(set(), (up, down, alpha, None, None, None))
    clone.add_patches(patches, strength)
    return clone


def diffusers_names(unet_config: dict) -> dict[str, str]:
    """ComfyUI UNet module path -> its diffusers name, for modules that have exactly one.

    ComfyUI's table gives SDXL's added-conditioning MLP two diffusers names (``label_emb.0.0`` is
    ``add_embedding.linear_1`` in SDXL and ``class_embedding.linear_1`` in other UNets); such modules keep
    their own path, ``lora_unet_label_emb_0_0``, which is what kohya writes for SDXL and what diffusers'
    converter maps to ``add_embedding`` (a guessed diffusers name would be dropped by one of them).
    """
    if "num_res_blocks" not in unet_config:
        return {}
    names: dict[str, set[str]] = {}
    for diffusers_key, comfy_key in comfy.utils.unet_to_diffusers(unet_config).items():
        if diffusers_key.endswith(".weight"):
            names.setdefault(comfy_key[: -len(".weight")], set()).add(diffusers_key[: -len(".weight")])
    return {module: next(iter(found)) for module, found in names.items() if len(found) == 1}


def kohya_key_for(model) -> Callable[[str], str]:
    """Component name -> kohya LoRA key: diffusers-derived names for UNets (what A1111, kohya and
    diffusers read), ``lora_unet_<module path>`` otherwise; ComfyUI maps both back to the weight."""
    by_module = diffusers_names(base_model(model).model_config.unet_config)

    def key_for(component: str) -> str:
        if is_foreign_key(component):
            return component
        name = by_module.get(component, component)
        return "lora_unet_" + name.replace(".", "_")

    return key_for


def lora_key_map(model) -> dict[str, str]:
    """ComfyUI's own map from every LoRA key spelling it accepts to the model's weight keys."""
    return comfy.lora.model_lora_keys_unet(base_model(model), {})
