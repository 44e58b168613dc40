"""The versions of one image that get encoded: clean, randomly augmented, and mirrored (kornia).

Latents are encoded once and cached, so augmentation happens before encoding and is frozen into a
fixed set of versions per image (``DatasetSpec.versions_per_image``), from which training samples one
at random each time the image comes up:

* version 0 is the clean image: whatever else is on, the model always sees the real photo;
* versions ``1 … variants-1`` are random crops (a window of ``crop_min_scale … 1`` of each side at a
  random place, resized back to the bucket) and/or colour jitters (brightness, contrast, saturation,
  hue, in that order), each drawn from its own generator seeded by ``(seed, image content, version)``,
  so the same file gives the same pixels in any dataset, in any order, on any machine;
* with ``flip`` every version is also encoded mirrored. Why encode the mirror rather than flip the
  latent at batch time: a VAE's convolutions are not mirror-symmetric, so the flipped latent of an
  image is not the latent of the flipped image, and the model would learn the difference; one extra
  VAE pass per version, once, is cheap, and the latent is small next to the image (kohya does the same).

Random parameters come from a ``torch.Generator`` and are applied with kornia's functional ops, so the
global random state is never touched.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import kornia
import torch

from .dataset_spec import DatasetSpec


def variant_generator(seed: int, content_hash: str, variant: int) -> torch.Generator:
    """A generator for one version of one image, independent of every other image and version."""
    digest = hashlib.sha256(f"{seed}:{content_hash}:{variant}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def versions(pixels: torch.Tensor, spec: DatasetSpec, content_hash: str) -> Iterator[torch.Tensor]:
    """Every version of ``pixels`` (``[3, H, W]``) to encode, in storage order.

    Order: variant 0, its mirror (with ``flip``), variant 1, its mirror, …
    """
    for variant in range(spec.variants):
        image = pixels if variant == 0 else augment(pixels, spec, variant_generator(spec.seed, content_hash, variant))
        yield image
        if spec.flip:
            yield kornia.geometry.transform.hflip(image)


def augment(pixels: torch.Tensor, spec: DatasetSpec, generator: torch.Generator) -> torch.Tensor:
    """One random augmentation of ``pixels`` (``[3, H, W]`` in [0, 1]) with the switched-on ops."""
    image = pixels.unsqueeze(0)
    if spec.crop:
        image = random_crop(image, spec.crop_min_scale, generator)
    if spec.color:
        image = color_jitter(image, spec.color_strength, generator)
    return image.squeeze(0).clamp_(0.0, 1.0)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def random_crop(image: torch.Tensor, min_scale: float, generator: torch.Generator) -> torch.Tensor:
    """A window of ``min_scale … 1`` of each side at a random place, resized back (antialiased)."""
    _, _, height, width = image.shape
    scale = _uniform(generator, min_scale, 1.0)
    crop_h = max(1, min(height, round(height * scale)))
    crop_w = max(1, min(width, round(width * scale)))
    top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
    left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
    window = image[:, :, top : top + crop_h, left : left + crop_w]
    if window.shape[-2:] == image.shape[-2:]:
        return window.clone()
    return kornia.geometry.transform.resize(window, (height, width), interpolation="bilinear", antialias=True)


def color_jitter(image: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Small random brightness (±s), contrast and saturation (×(1±s)) and hue (±s/2 rad) changes."""
    brightness = _uniform(generator, -strength, strength)
    contrast = _uniform(generator, 1 - strength, 1 + strength)
    saturation = _uniform(generator, 1 - strength, 1 + strength)
    hue = _uniform(generator, -strength / 2, strength / 2)
    image = kornia.enhance.adjust_brightness(image, brightness)
    image = kornia.enhance.adjust_contrast(image, contrast)
    image = kornia.enhance.adjust_saturation(image, saturation).clamp(0.0, 1.0)
    return kornia.enhance.adjust_hue(image, max(-math.pi, min(math.pi, hue))).clamp(0.0, 1.0)
