"""ComfyUI's VAE, CLIP and CONDITIONING as the plain encoders and tensors a LoRA² dataset is built from."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...lora2.errors import LoRA2Error


def conditioning_to_dict(conditioning: list) -> dict[str, torch.Tensor]:
    """CONDITIONING ``[[cross_attn, {pooled_output: ..., ...}], ...]`` (first entry) to tensors by name."""
    if not conditioning:
        raise LoRA2Error("the conditioning input is empty; connect a CLIP Text Encode node")
    cross_attn, extras = conditioning[0][0], conditioning[0][1]
    result = {"cross_attn": cross_attn}
    for key, value in extras.items():
        if torch.is_tensor(value):
            result[key] = value
        elif isinstance(value, (int, float)) and key == "guidance":
            result[key] = torch.tensor([float(value)])
    return result


def clip_text_encoder(clip) -> Callable[[str], dict[str, torch.Tensor]]:
    def encode(caption: str) -> dict[str, torch.Tensor]:
        tokens = clip.tokenize(caption)
        return conditioning_to_dict(clip.encode_from_tokens_scheduled(tokens))

    return encode


def vae_image_encoder(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    def encode(images: torch.Tensor) -> torch.Tensor:
        pixels = images.permute(0, 2, 3, 1).contiguous()  # ComfyUI IMAGE is [B, H, W, C] in [0, 1]
        return vae.encode(pixels[..., :3]).float().cpu()

    return encode
