"""The models the speed benchmark trains: ComfyUI's own UNet classes built from configs, random weights.

Why ComfyUI's classes and not diffusers': the peer being measured is ComfyUI's TrainLoraNode, which
only runs on a ComfyUI MODEL, and LoRA² Train is measured as the node a user runs, on the same object.
No weights are downloaded: every parameter is filled from a seeded generator (``comfy.ops`` layers skip
initialisation, so this is required, not cosmetic).

* ``tiny``: the test suite's SD1.5 shape (32 channels, two levels; 1.06 M parameters).
* ``sd1-width``: real SD1.x widths (320 channels, context 768, 8 heads) at one level, 25.8 M
  parameters: the per-layer cost of SD1.5 on a CPU budget.
* ``sd15`` / ``sdxl``: the full architectures (860 M / 2.6 B parameters), for a GPU.

Import only after ComfyUI is on ``sys.path`` (see ``speed_worker.boot_host``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

SD15_BASE: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: its UNet config, its family class and the shapes of its inputs."""

    name: str
    family: str
    """``SD15`` or ``SDXL`` (``comfy.supported_models`` class)."""
    unet_config: dict[str, Any]
    extra_config: dict[str, Any]
    context_dim: int
    pooled_dim: int | None
    latent_side: int
    """Default latent height and width (image side / 8)."""


MODELS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(
        "tiny",
        "SD15",
        {
            **SD15_BASE,
            "model_channels": 32,
            "channel_mult": [1, 2],
            "num_res_blocks": [1, 1],
            "transformer_depth": [1, 1],
            "transformer_depth_output": [1, 1, 1, 1],
            "transformer_depth_middle": 1,
            "context_dim": 32,
            "use_linear_in_transformer": False,
        },
        {"num_heads": 4, "num_head_channels": -1},
        context_dim=32,
        pooled_dim=None,
        latent_side=32,
    ),
    "sd1-width": ModelSpec(
        "sd1-width",
        "SD15",
        {
            **SD15_BASE,
            "model_channels": 320,
            "channel_mult": [1],
            "num_res_blocks": [1],
            "transformer_depth": [1],
            "transformer_depth_output": [1, 1],
            "transformer_depth_middle": 1,
            "context_dim": 768,
            "use_linear_in_transformer": False,
        },
        {"num_heads": 8, "num_head_channels": -1},
        context_dim=768,
        pooled_dim=None,
        latent_side=32,
    ),
    "sd15": ModelSpec(
        "sd15",
        "SD15",
        {
            **SD15_BASE,
            "model_channels": 320,
            "channel_mult": [1, 2, 4, 4],
            "num_res_blocks": [2, 2, 2, 2],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            "transformer_depth_middle": 1,
            "context_dim": 768,
            "use_linear_in_transformer": False,
        },
        {"num_heads": 8, "num_head_channels": -1},
        context_dim=768,
        pooled_dim=None,
        latent_side=64,
    ),
    "sdxl": ModelSpec(
        "sdxl",
        "SDXL",
        {
            **SD15_BASE,
            "num_classes": "sequential",
            "adm_in_channels": 2816,
            "model_channels": 320,
            "num_res_blocks": [2, 2, 2],
            "transformer_depth": [0, 0, 2, 2, 10, 10],
            "channel_mult": [1, 2, 4],
            "transformer_depth_middle": 10,
            "use_linear_in_transformer": True,
            "context_dim": 2048,
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        },
        {"num_heads": -1, "num_head_channels": 64},
        context_dim=2048,
        pooled_dim=1280,
        latent_side=128,
    ),
}


def fill_seeded_(module: torch.nn.Module, seed: int) -> None:
    """N(0, 1/fan_in) matrices, 1 ± 0.02 norm scales, 0 ± 0.02 biases: activations stay O(1) with depth."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 0:
                continue
            if param.device not in generators:  # drawn where the weights live: SDXL fills in seconds on a GPU
                generators[param.device] = torch.Generator(param.device).manual_seed(seed)
            noise = torch.randn(param.shape, generator=generators[param.device], device=param.device)
            if param.ndim >= 2:
                value = noise / param[0].numel() ** 0.5
            elif name.endswith(("weight", "scale")):
                value = 1.0 + 0.02 * noise
            else:
                value = 0.02 * noise
            param.copy_(value.to(param.dtype))


def build_model(name: str, seed: int, weight_dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A ComfyUI MODEL (ModelPatcher) of ``name``, weights seeded, stored in ``weight_dtype``.

    Stored in bf16/fp16/fp8 the ``comfy.ops`` layers cast each weight to the compute dtype as they run,
    as they do for a checkpoint stored that way: the weights are never held in float32 as a whole.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    spec = MODELS[name]
    base = getattr(comfy.supported_models, spec.family)

    class BenchFamily(base):  # the family's behaviour, with head settings that fit the width
        unet_extra_config = spec.extra_config

    family = BenchFamily(copy.deepcopy(spec.unet_config))  # ComfyUI pops from its lists
    compute = torch.float32 if weight_dtype == torch.float32 else torch.bfloat16
    family.set_inference_dtype(weight_dtype, compute if weight_dtype != compute else None)
    model = family.get_model({}, device=torch.device(device) if device != "cpu" else None)
    fill_seeded_(model.diffusion_model, seed)
    model.eval()
    load = torch.device(device) if device != "cpu" else comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=load)


def conditioning(name: str, images: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Per image, random text conditioning of the model's widths: ``cross_attn`` (and SDXL's pool)."""
    spec = MODELS[name]
    generator = torch.Generator().manual_seed(seed + 1)
    result = []
    for _ in range(images):
        entry = {"cross_attn": torch.randn(1, 77, spec.context_dim, generator=generator)}
        if spec.pooled_dim is not None:
            entry["pooled_output"] = torch.randn(1, spec.pooled_dim, generator=generator)
        result.append(entry)
    return result


def latents(name: str, images: int, seed: int, side: int | None = None) -> torch.Tensor:
    """``[images, 4, side, side]`` seeded latents (VAE space: the nodes apply ``process_latent_in``)."""
    side = side or MODELS[name].latent_side
    return torch.randn(images, 4, side, side, generator=torch.Generator().manual_seed(seed + 2))
