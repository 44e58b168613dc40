"""Aspect-ratio buckets, and decoding an image into the pixels of its bucket.

Why buckets: a batch must share one latent size, and squashing a 2:3 portrait into a square either
distorts it or crops away the subject. kohya's answer, used here: a set of sizes of (about) the same
pixel area but different shapes; each image goes to the bucket with the nearest aspect ratio, is
scaled so that it *covers* the bucket (no borders, no distortion) and the overhang is cut equally from
both sides (center crop). Nearest is measured on ``log(width / height)``, so 2:1 and 1:2 are equally far
from a square.

Pixels are float32 ``[3, H, W]`` in ``[0, 1]``: grayscale and palette images become RGB, transparent
ones are composited on white (a transparent background is usually meant as "no background", and white
is what a viewer shows), and the EXIF orientation is applied so photos stand the way they are viewed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import LoRA2Error

Bucket = tuple[int, int]
"""``(width, height)`` in pixels."""


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[Bucket]:
    """kohya-style buckets: for every width (a multiple of ``step``) the tallest height, also a multiple
    of ``step``, whose area stays within ``resolution²``, kept when its long/short ratio is at most
    ``max_ratio``. Sorted by aspect ratio, from tallest to widest; always holds the square.
    """
    if step < 1 or resolution < step:
        raise LoRA2Error(f"resolution ({resolution}) must be at least the bucket step ({step}), and step at least 1")
    if max_ratio < 1.0:
        raise LoRA2Error(f"max_ratio must be at least 1, got {max_ratio}")
    area = resolution * resolution
    side = resolution // step * step
    buckets = {(side, side)}
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        if height >= step and max(width, height) / min(width, height) <= max_ratio:
            buckets.add((width, height))
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def assign_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket nearest to ``width:height`` in log aspect ratio (ties: the larger bucket)."""
    if not buckets:
        raise LoRA2Error("there are no buckets to assign images to; check resolution and max_ratio")
    if width < 1 or height < 1:
        raise LoRA2Error(f"an image of {width}×{height} pixels cannot be bucketed")
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def load_image(path: Path) -> Image.Image:
    """Decode ``path`` fully into an RGB image (EXIF-rotated, transparency on white); errors name it."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
            return to_rgb(image)
    except Exception as exc:  # Pillow's decoders raise many types on damaged files; each one means "unreadable"
        reason = f"{type(exc).__name__}: {exc}"
        raise LoRA2Error(f"image '{path}' cannot be decoded ({reason}); replace or remove it") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB of any PIL mode; transparent pixels are composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        scale = 1 / 256 if image.mode.startswith("I;16") or np.asarray(image).max() > 255 else 1
        image = Image.fromarray((np.asarray(image, dtype=np.float64) * scale).clip(0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> torch.Tensor:
    """Scale ``image`` to cover ``bucket`` (Lanczos), center-crop it; float32 ``[3, H, W]`` in [0, 1]."""
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    scaled_w = max(width, round(image.width * scale))
    scaled_h = max(height, round(image.height * scale))
    if (scaled_w, scaled_h) != image.size:
        image = image.resize((scaled_w, scaled_h), Image.Resampling.LANCZOS)
    left = (scaled_w - width) // 2
    top = (scaled_h - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float().div_(255.0)
