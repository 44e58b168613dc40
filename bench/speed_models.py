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

from ..devtools.unet_configs import ldm_unet_config


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


def _heads(count: int) -> dict[str, int]:
    return {"num_heads": count, "num_head_channels": -1}


def _spec(name: str, unet: dict[str, Any], heads: dict[str, int], latent_side: int, pooled_dim: int | None = None):
    """A model of ComfyUI UNet config ``unet``: SDXL when it takes a pooled text vector, else SD1.5."""
    family = "SD15" if pooled_dim is None else "SDXL"
    return ModelSpec(name, family, unet, heads, unet["context_dim"], pooled_dim, latent_side)


SDXL_UNET = ldm_unet_config(
    320, [1, 2, 4], [0, 2, 10], context_dim=2048, res_blocks=2, middle_depth=10, linear=True, adm_in_channels=2816
)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _spec("tiny", ldm_unet_config(32, [1, 2], [1, 1], context_dim=32), _heads(4), latent_side=32),
        _spec("sd1-width", ldm_unet_config(320, [1], [1], context_dim=768), _heads(8), latent_side=32),
        _spec("sd15", ldm_unet_config(320, [1, 2, 4, 4], [1, 1, 1, 0], context_dim=768, res_blocks=2), _heads(8), 64),
        _spec("sdxl", SDXL_UNET, {"num_heads": -1, "num_head_channels": 64}, latent_side=128, pooled_dim=1280),
    )
}


WEIGHT_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
"""How the benchmark's base weights may be stored (``--weights``): fp8 as Flux users load checkpoints."""


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
