"""Tiny seeded diffusers models shaped like SD1.5, SDXL and Flux, and how each one is called.

Why diffusers and not ComfyUI's classes: the benchmarks run on the plain engine (``lora2.train``),
which takes any ``(x, t, conditioning) -> output`` callable; diffusers builds these models from a
config in-process, with no host to boot. The shapes keep what matters to LoRA²'s targets: the SD1.5
UNet has cross-attention transformers at two levels plus the middle and conv ``proj_in``/``proj_out``;
the SDXL UNet has no attention at the highest level, two transformer layers per block at the lower one,
linear projections and the ``text_time`` added conditions; the Flux transformer has two double-stream
and two single-stream blocks on packed 2×2 latent patches. All are small enough to train on one CPU
thread in about a minute.

Every model is initialised from ``torch.manual_seed(seed)`` inside :func:`build_model`, so the same
seed gives the same weights on any machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, FluxTransformer2DModel, UNet2DConditionModel
from torch import nn

from ..devtools.unet_configs import sd15_unet_config, sdxl_unet_config
from ..lora2.noise import DDPMRule, FlowRule

MODELS = ("sd15", "sdxl", "flux")
CONTEXT_DIM = 32
"""Width of the text embeddings (the "CLIP/T5" tokens) every model cross-attends to."""
POOLED_DIM = 32
TOKENS = 8
"""Tokens per caption embedding."""
LATENT_SIZE = 16
"""Latent height and width (a 128 px image at the usual 8× VAE factor)."""
SDXL_TIME_DIM = 8
SDXL_TIME_IDS = (256.0, 256.0, 0.0, 0.0, 256.0, 256.0)
"""SDXL's size/crop conditions: original size, crop offset, target size."""
FLUX_GUIDANCE = 3.5

Conditioning = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """A model family: its latent layout, noise rule and calling convention."""

    name: str
    latent_channels: int
    packed: bool
    """True for Flux: latents are ``[B, tokens, 4·C]`` sequences of 2×2 patches, not images."""

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent as the model consumes it (no batch dimension)."""
        if self.packed:
            side = LATENT_SIZE // 2
            return (side * side, self.latent_channels * 4)
        return (self.latent_channels, LATENT_SIZE, LATENT_SIZE)

    def rule(self) -> DDPMRule | FlowRule:
        """The family's training noise rule: DDPM ε on the scaled-linear schedule, or rectified flow."""
        if self.packed:
            return FlowRule(shift=1.0, timestep_scale=1.0)  # diffusers' Flux takes t in [0, 1]
        return DDPMRule(ddpm_scheduler().alphas_cumprod)

    def conditioning(self, text: torch.Tensor, pooled: torch.Tensor) -> Conditioning:
        """The conditioning dict for a batch of caption embeddings ``[B, T, CONTEXT_DIM]``."""
        batch = text.shape[0]
        if self.name == "sd15":
            return {"cross_attn": text}
        if self.name == "sdxl":
            time_ids = torch.tensor(SDXL_TIME_IDS).expand(batch, -1).clone()
            return {"cross_attn": text, "text_embeds": pooled, "time_ids": time_ids}
        return {"cross_attn": text, "pooled": pooled, "guidance": torch.full((batch,), FLUX_GUIDANCE)}

    def denoiser(self, model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]:
        """``(x, t, conditioning) -> output`` for ``model``, the signature ``lora2.train.Trainer`` wants."""
        if self.name == "sd15":
            return lambda x, t, c: model(x, t, encoder_hidden_states=c["cross_attn"]).sample
        if self.name == "sdxl":
            return lambda x, t, c: (
                model(
                    x,
                    t,
                    encoder_hidden_states=c["cross_attn"],
                    added_cond_kwargs={"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]},
                ).sample
            )
        img_ids, txt_ids = flux_ids()

        def flux(x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
            timestep = t.to(x.dtype).expand(x.shape[0]) if t.ndim == 0 else t.to(x.dtype)
            return model(
                hidden_states=x,
                encoder_hidden_states=c["cross_attn"],
                pooled_projections=c["pooled"],
                timestep=timestep,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=c["guidance"],
            ).sample

        return flux


FAMILIES = {
    "sd15": Family("sd15", latent_channels=4, packed=False),
    "sdxl": Family("sdxl", latent_channels=4, packed=False),
    "flux": Family("flux", latent_channels=16, packed=True),
}


def family(name: str) -> Family:
    return FAMILIES[name]


def ddpm_scheduler() -> DDPMScheduler:
    """SD's training schedule: 1000 steps, scaled-linear betas 0.00085 → 0.012."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def flux_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """Flux's RoPE positions: (0, row, column) per image token, zeros for the text tokens."""
    side = LATENT_SIZE // 2
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return img_ids, torch.zeros(TOKENS, 3)


def _sd15() -> UNet2DConditionModel:
    config = sd15_unet_config(
        (32, 64, 64),
        (True, True, False),
        cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=8,
        sample_size=LATENT_SIZE,
        norm_num_groups=16,
    )
    return UNet2DConditionModel(**config)


def _sdxl() -> UNet2DConditionModel:
    config = sdxl_unet_config(
        (32, 64),
        transformer_layers=(1, 2),
        attention_head_dim=(8, 16),
        cross_attention_dim=CONTEXT_DIM,
        pooled_dim=POOLED_DIM,
        time_embed_dim=SDXL_TIME_DIM,
        sample_size=LATENT_SIZE,
        norm_num_groups=16,
    )
    return UNet2DConditionModel(**config)


def _flux() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=FAMILIES["flux"].latent_channels * 4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=CONTEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


BUILDERS: dict[str, Callable[[], nn.Module]] = {"sd15": _sd15, "sdxl": _sdxl, "flux": _flux}


def build_model(name: str, seed: int) -> nn.Module:
    """The named tiny model with seeded default initialisation, frozen and in eval mode.

    diffusers zero-initialises some output layers (Flux's ``proj_out``, the UNet's ``conv_out`` is
    not); a zero output layer would hide every planted update, so any all-zero matrix is refilled
    with a seeded N(0, 1/fan_in).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BUILDERS[name]()
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim >= 2 and not param.any():
                    param.normal_(0.0, param[0].numel() ** -0.5)
    return model.eval().requires_grad_(False)
