"""Smooth random pictures and how ComfyUI would have saved them, for the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def pictures(count: int, seed: int, size: tuple[int, int] = (40, 48)) -> torch.Tensor:
    """Smooth random pictures as a ComfyUI IMAGE ``[count, H, W, 3]``: low-frequency noise, upsampled."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 5, 6, generator=generator)
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1).contiguous()


def save_photos(folder: Path, images: torch.Tensor) -> Path:
    """Write an IMAGE batch as PNGs the way ComfyUI's Save Image quantises (``clip(255 x)`` then truncate)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(images):
        pixels = np.clip(255.0 * frame.numpy(), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo_{i}.png")
    return folder
