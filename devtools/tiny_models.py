"""Seeded tiny models shaped like SD1.5, SDXL and Flux, built in-process without any weights download.

Why: no reachable registry ships diffusion weights, and real-width models are far too slow for CPU
tests. These go through ComfyUI's own ``supported_models`` / ``model_base`` classes, so sampling,
patching and LoRA key mapping run the real code paths on a model of about a million parameters.

``comfy.ops`` layers skip initialisation (their tensors are ``torch.empty``), so every parameter is
filled here from a seeded generator: same seed, same model, on any machine. Import this module only
after ``comfy_host.boot`` (it imports ComfyUI).

Conditioning each family needs (what ``*_conditioning`` builds; ``CONDITIONING`` is
``[[cross_attn, extras], ...]``):

- SD1.5: ``cross_attn`` ``[B, 77, 32]``; no extras.
- SDXL: ``cross_attn`` ``[B, 77, 32]`` and ``extras["pooled_output"]`` ``[B, 32]``; the model's ``y``
  (``adm_in_channels`` = 32 + 6 * 256 = 1568) is the pooled vector plus Fourier embeddings of
  ``height``/``width``/``crop_h``/``crop_w``/``target_height``/``target_width`` (defaults 768/0).
- Flux: ``cross_attn`` ``[B, T, 32]`` (any T), ``extras["pooled_output"]`` ``[B, 32]`` (``vec_in_dim``)
  and ``extras["guidance"]`` (a float, 3.5 when absent: the model is guidance-distilled); latents have
  16 channels (use ``EmptySD3LatentImage``) and H, W divisible by 2 (patch size).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.supported_models
import comfy.taesd.taesd
import torch

from .unet_configs import ldm_unet_config

CONTEXT_DIM = 32
POOLED_DIM = 32
SDXL_ADM_CHANNELS = POOLED_DIM + 6 * 256

SD15_UNET_CONFIG: dict[str, Any] = ldm_unet_config(32, [1, 2], [1, 1], context_dim=CONTEXT_DIM)

SDXL_UNET_CONFIG: dict[str, Any] = ldm_unet_config(
    32, [1, 2], [0, 1], context_dim=CONTEXT_DIM, linear=True, adm_in_channels=SDXL_ADM_CHANNELS
)  # like SDXL, no attention at the highest resolution

FLUX_CONFIG: dict[str, Any] = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": POOLED_DIM,
    "context_in_dim": CONTEXT_DIM,
    "hidden_size": 64,
    "mlp_ratio": 4.0,
    "num_heads": 4,  # head dim 16 = sum(axes_dim)
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [4, 6, 6],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": True,
}


class TinySD15(comfy.supported_models.SD15):
    """SD1.5 family with 4 heads (the stock 8 would not divide 32 channels usefully)."""

    unet_extra_config: ClassVar[dict[str, Any]] = {"num_heads": 4, "num_head_channels": -1}


class TinySDXL(comfy.supported_models.SDXL):
    """SDXL family with 16-channel heads (the stock 64 would leave 32 channels with zero heads)."""

    unet_extra_config: ClassVar[dict[str, Any]] = {"num_heads": -1, "num_head_channels": 16}


class TinyFlux(comfy.supported_models.Flux):
    """Flux (dev, guidance-embedded) family; the config above is complete, nothing extra."""

    unet_extra_config: ClassVar[dict[str, Any]] = {}


def fill_seeded_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter of ``module`` from a generator seeded with ``seed``; returns it.

    Matrices and kernels get N(0, 1/fan_in) so activations stay O(1) through the depth (no NaNs at
    fp16); 1-D ``weight``/``scale`` parameters (norms) get 1 + N(0, 0.02²); other 1-D tensors
    (biases) N(0, 0.02²). 0-D parameters (e.g. TAESD's ``vae_scale``) are ordinary tensors with real
    values already and are kept.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 0:
                continue
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim >= 2:
                fan_in = param[0].numel()
                value = noise / fan_in**0.5
            elif name.endswith(("weight", "scale")):
                value = 1.0 + 0.02 * noise
            else:
                value = 0.02 * noise
            param.copy_(value.to(param.dtype))
    return module


def _patcher(model_config: Any, seed: int) -> comfy.model_patcher.ModelPatcher:
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    fill_seeded_(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def tiny_sd15_model(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """SD1.5-shaped UNet (1.06 M params, 4-channel latents, context 32) as a ComfyUI MODEL."""
    return _patcher(TinySD15(SD15_UNET_CONFIG), seed)


def tiny_sdxl_model(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """SDXL-shaped UNet (linear transformer in/out, label_emb on 1568-dim ``y``) as a ComfyUI MODEL."""
    return _patcher(TinySDXL(SDXL_UNET_CONFIG), seed)


def tiny_flux_model(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """Flux-shaped DiT (1 double + 1 single block, hidden 64, 16-channel latents) as a ComfyUI MODEL."""
    return _patcher(TinyFlux(FLUX_CONFIG), seed)


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def sd15_conditioning(seed: int = 0, batch: int = 1, tokens: int = 77) -> list[list[Any]]:
    """Random SD1.5 CONDITIONING: ``[[cross_attn [B, tokens, 32], {}]]``."""
    g = torch.Generator().manual_seed(seed)
    return [[_randn((batch, tokens, CONTEXT_DIM), g), {}]]


def sdxl_conditioning(seed: int = 0, batch: int = 1, tokens: int = 77, size: int = 1024) -> list[list[Any]]:
    """Random SDXL CONDITIONING with ``pooled_output`` and the size/crop fields SDXL embeds into ``y``."""
    g = torch.Generator().manual_seed(seed)
    extras = {
        "pooled_output": _randn((batch, POOLED_DIM), g),
        "width": size,
        "height": size,
        "crop_w": 0,
        "crop_h": 0,
        "target_width": size,
        "target_height": size,
    }
    return [[_randn((batch, tokens, CONTEXT_DIM), g), extras]]


def flux_conditioning(seed: int = 0, batch: int = 1, tokens: int = 16, guidance: float = 3.5) -> list[list[Any]]:
    """Random Flux CONDITIONING: T5-like tokens, CLIP-like ``pooled_output`` and distilled ``guidance``."""
    g = torch.Generator().manual_seed(seed)
    extras = {"pooled_output": _randn((batch, POOLED_DIM), g), "guidance": guidance}
    return [[_randn((batch, tokens, CONTEXT_DIM), g), extras]]


def tiny_taesd_state_dict(latent_channels: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random TAESD state dict; ``comfy.sd.VAE`` detects it by its ``taesd_decoder.*`` keys."""
    model = fill_seeded_(comfy.taesd.taesd.TAESD(latent_channels=latent_channels), seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_vae(latent_channels: int = 4, seed: int = 0) -> comfy.sd.VAE:
    """A ComfyUI VAE (TAESD architecture, 8x down/up-scaling) for 4- (SD) or 16-channel (Flux) latents."""
    vae = comfy.sd.VAE(sd=tiny_taesd_state_dict(latent_channels, seed))
    vae.throw_exception_if_invalid()
    return vae


def write_tiny_taesd(path: str | os.PathLike[str], latent_channels: int = 4, seed: int = 0) -> str:
    """Write a random TAESD as fp16 safetensors (~5 MB), loadable by the stock ``VAELoader``."""
    import safetensors.torch

    state = {k: v.half().contiguous() for k, v in tiny_taesd_state_dict(latent_channels, seed).items()}
    safetensors.torch.save_file(state, os.fspath(path))
    return os.fspath(path)


# The smallest UNets ComfyUI's model detection accepts: real widths (320 channels), one level.
REAL_WIDTH_ONE_LEVEL: dict[str, Any] = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "channel_mult": [1],
    "num_res_blocks": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
}
REAL_WIDTH_FAMILIES: dict[str, dict[str, Any]] = {
    # detected as supported_models.SD15: context 768, conv proj_in/out, 8 heads
    "sd15": {"context_dim": 768, "use_linear_in_transformer": False, "num_heads": 8, "num_head_channels": -1},
    # detected as supported_models.SD20: context 1024 (the width of stock LotusConditioning), linear proj
    "sd20": {"context_dim": 1024, "use_linear_in_transformer": True, "num_heads": -1, "num_head_channels": 64},
}


def write_tiny_unet(path: str | os.PathLike[str], family: str = "sd15", seed: int = 0) -> str:
    """Write a one-level, real-width UNet as fp16 safetensors for the stock ``UNETLoader``.

    ``sd15``: 25.8 M params, 51.6 MB. Generated at run time (never committed), ~1 s on one core.
    """
    import safetensors.torch

    config = {**REAL_WIDTH_ONE_LEVEL, **REAL_WIDTH_FAMILIES[family]}
    unet = openaimodel.UNetModel(**config, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    fill_seeded_(unet, seed)
    state = {k: v.detach().half().contiguous() for k, v in unet.state_dict().items()}
    safetensors.torch.save_file(state, os.fspath(path))
    return os.fspath(path)


def write_tiny_sd15_unet(path: str | os.PathLike[str], seed: int = 0) -> str:
    """The smallest UNet ComfyUI detects as SD1.x (``write_tiny_unet(path, "sd15")``)."""
    return write_tiny_unet(path, "sd15", seed)


@dataclass(frozen=True)
class TinyFamily:
    """Everything a test needs to sample one model family: model, conditioning, latent shape, VAE."""

    name: str
    model: Callable[[int], comfy.model_patcher.ModelPatcher]
    conditioning: Callable[..., list[list[Any]]]
    latent_channels: int
    empty_latent_node: str  # stock node making latents with the right channel count


FAMILIES: dict[str, TinyFamily] = {
    "sd15": TinyFamily("sd15", tiny_sd15_model, sd15_conditioning, 4, "EmptyLatentImage"),
    "sdxl": TinyFamily("sdxl", tiny_sdxl_model, sdxl_conditioning, 4, "EmptyLatentImage"),
    "flux": TinyFamily("flux", tiny_flux_model, flux_conditioning, 16, "EmptySD3LatentImage"),
}
