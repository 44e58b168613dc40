"""How a training image becomes pixels: resolution, bucketing and augmentation, validated once.

Worked example (the defaults): ``resolution=512`` with bucketing gives the buckets of
:func:`~lora2.dataset_images.make_buckets` (``384×640 … 640×384``, each at most 512² pixels, sides
multiples of 64, never more elongated than 2:1); each image is scaled to cover its bucket and
center-cropped. ``variants=1`` with no augmentation switched on encodes exactly one latent per image.

Why augmentation lives here and not in the training loop: latents are encoded once and cached, so the
only pixels training ever sees are the ones encoded now. Each image therefore yields ``variants``
versions: version 0 is the clean image, versions ``1 … variants-1`` are seeded random crops and/or
colour jitters; with ``flip`` every version is also encoded mirrored (see :mod:`lora2.dataset_augment`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .errors import LoRA2Error

MAX_VARIANTS = 64


@dataclass(frozen=True)
class DatasetSpec:
    """Preprocessing settings of a dataset. Validates itself on construction."""

    resolution: int = 512
    """Training side length: buckets hold at most ``resolution²`` pixels (or exactly that square)."""
    bucketing: bool = True
    """Aspect-ratio buckets; False center-crops every image to ``resolution × resolution``."""
    bucket_step: int = 64
    """Bucket sides are multiples of this (64 keeps an SD/SDXL latent divisible by the UNet's 8)."""
    max_ratio: float = 2.0
    """Most elongated bucket allowed (long side / short side)."""
    flip: bool = False
    """Also encode every version mirrored left-right (switch off for text, logos, asymmetric subjects)."""
    crop: bool = False
    """Random crops (versions 1…): a window of ``crop_min_scale … 1`` of each side, resized back."""
    crop_min_scale: float = 0.9
    color: bool = False
    """Random colour jitter (versions 1…): brightness, contrast, saturation and hue."""
    color_strength: float = 0.1
    """Jitter size: brightness ±s, contrast and saturation ×(1 ± s), hue ±s/2 radians."""
    variants: int = 1
    """Versions per image: 0 is clean, the others are random augmentations; needs crop or color if > 1."""
    seed: int = 0
    """Seed of the random augmentations (each image and version gets its own stream from it)."""

    def __post_init__(self) -> None:
        if self.bucket_step < 8:
            raise LoRA2Error(f"bucket_step must be at least 8 pixels, got {self.bucket_step}")
        if self.resolution < self.bucket_step:
            raise LoRA2Error(f"resolution ({self.resolution}) must be at least bucket_step ({self.bucket_step})")
        if self.max_ratio < 1.0:
            raise LoRA2Error(f"max_ratio must be at least 1 (a square), got {self.max_ratio}")
        if not 0.25 <= self.crop_min_scale <= 1.0:
            raise LoRA2Error(f"crop_min_scale must be in [0.25, 1], got {self.crop_min_scale}")
        if not 0.0 <= self.color_strength <= 0.5:
            raise LoRA2Error(f"color_strength must be in [0, 0.5], got {self.color_strength}")
        if not 1 <= self.variants <= MAX_VARIANTS:
            raise LoRA2Error(f"variants must be in [1, {MAX_VARIANTS}], got {self.variants}")
        if self.variants > 1 and not self.random_augmentation:
            raise LoRA2Error(
                f"variants={self.variants} needs crop or color augmentation switched on; without them every "
                "version would be the clean image (set variants to 1, or switch crop/color on)"
            )

    @property
    def random_augmentation(self) -> bool:
        """Whether versions 1… differ from the clean image."""
        return self.crop or self.color

    @property
    def versions_per_image(self) -> int:
        """Latents encoded per image: ``variants``, twice when mirrored copies are encoded too."""
        return self.variants * (2 if self.flip else 1)

    def pixel_settings(self, bucket: tuple[int, int]) -> dict[str, Any]:
        """Exactly the settings that change an image's encoded pixels (its cache key part).

        The bucket replaces ``resolution``/``bucketing``/``max_ratio``: changing those re-encodes only
        the images whose bucket moved. Settings of switched-off augmentations are left out, so e.g.
        the seed matters only when something random is on.
        """
        settings: dict[str, Any] = {"bucket": list(bucket), "flip": self.flip, "variants": self.variants}
        if self.crop:
            settings["crop_min_scale"] = self.crop_min_scale
        if self.color:
            settings["color_strength"] = self.color_strength
        if self.random_augmentation:
            settings["seed"] = self.seed
        return settings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
