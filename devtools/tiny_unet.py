"""A seeded tiny diffusers UNet and its toy data: the plain-Python (no ComfyUI) training harness.

Why here: the core's training loop, resume and validation are tested from plain Python on the same
two-level SD1.5-shaped UNet (16/32 channels, cross-attention width 16) and the same four-latent toy data
set, so every test sees the same model and batches for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from ..lora2.noise import DDPMRule
from ..lora2.run import TrainingTarget
from .unet_configs import sd15_unet_config

CONFIG = sd15_unet_config((16, 32), (True, False), cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)


@dataclass
class Batch:
    latents: torch.Tensor
    conditioning: dict[str, torch.Tensor]


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**CONFIG).requires_grad_(False)


def data(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(4, 4, 8, 8, generator=generator)
    conditioning = torch.randn(4, 5, 16, generator=generator)

    def batches():
        index = 0
        while True:
            pick = [index % 4, (index + 1) % 4]
            index += 2
            yield Batch(latents[pick], {"cross_attn": conditioning[pick]})

    return latents, conditioning, batches


def denoiser_for(unet: UNet2DConditionModel):
    return lambda x, t, cond: unet(x, t, encoder_hidden_states=cond["cross_attn"]).sample


RULE = DDPMRule(DDPMScheduler(num_train_timesteps=1000).alphas_cumprod)


def training_target(seed: int = 0) -> TrainingTarget:
    """A fresh :func:`tiny_unet` and the toy data of ``seed`` as ``lora2.run``'s target: each batch is
    ``batch_size`` latents drawn at random with the run's own generator."""
    unet = tiny_unet()
    latents, conditioning, _ = data(seed)

    def batches(batch_size: int, generator: torch.Generator):
        while True:
            pick = torch.randperm(len(latents), generator=generator)[:batch_size]
            yield Batch(latents[pick], {"cross_attn": conditioning[pick]})

    return TrainingTarget(module=unet, denoiser=denoiser_for(unet), rule=RULE, batches=batches)
