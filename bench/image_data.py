"""Images as "latents" without a VAE, fixed caption embeddings, and a briefly pre-trained base.

No VAE weights can be downloaded here, so images reach the tiny models through a fixed, seeded,
deterministic encoder: average-pool to twice the latent size, fold each 2×2 block into channels
(12 = 3 colours × 4 positions), project those channels with a fixed random orthogonal matrix onto the
model's latent channels, and normalise the whole set to zero mean and unit variance. It keeps an
image's layout and colours (what a denoiser learns from photos) and the unit scale the noise
schedules assume. Flux latents are then packed into 2×2 patch tokens, as Flux does.

Captions are fixed seeded random embeddings, one per subject (a "text encoder" with one caption per
subject), plus a pooled vector for SDXL/Flux.

The photos are the shared DreamBooth set (``../shared/data/dreambooth_256``, one folder per subject);
when it is absent, seeded synthetic images stand in (smooth colour fields with a few bright blobs).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..lora2.errors import LoRA2Error
from .tiny_diffusion import CONTEXT_DIM, LATENT_SIZE, POOLED_DIM, TOKENS, Family, build_model

PHOTO_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambooth_256"
"""The shared DreamBooth photos (read-only; never copied into the repository)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PRETRAIN_STEPS = 300
PRETRAIN_BATCH = 8
PRETRAIN_LR = 1e-3
CACHE_VERSION = 1
"""Bump when the pre-training recipe changes, so stale cached bases are not reused."""


@dataclass
class Batch:
    """What ``lora2.train.Trainer`` reads from a batch."""

    latents: torch.Tensor
    conditioning: dict[str, torch.Tensor]


@dataclass
class ImageSet:
    """Encoded images with their subject index (captions are per subject)."""

    latents: torch.Tensor
    """``[N, *family.latent_shape()]``."""
    subjects: torch.Tensor
    """``[N]`` index into ``names``."""
    names: list[str]
    source: str
    """``"dreambooth"`` or ``"synthetic"``: what the images are."""

    def select(self, keep: torch.Tensor) -> ImageSet:
        return ImageSet(self.latents[keep], self.subjects[keep], self.names, self.source)


def photo_dir() -> Path | None:
    """The DreamBooth folder, or None when it is not on this machine."""
    override = os.environ.get("LORA2_DREAMBOOTH_DIR")
    path = Path(override) if override else PHOTO_DIR
    return path if path.is_dir() and any(p.is_dir() for p in path.iterdir()) else None


def photo_files(root: Path) -> dict[str, list[Path]]:
    """``{subject: sorted image paths}`` for every subject folder under ``root``."""
    subjects = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            subjects[folder.name] = files
    return subjects


@cache
def _load_rgb(path: Path, size: int) -> torch.Tensor:
    """``[3, size, size]`` in [-1, 1], centre-cropped square then area-resized."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
        width, height = image.size
    pixels = rgb.view(height, width, 3).permute(2, 0, 1).float() / 127.5 - 1.0
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    pixels = pixels[:, top : top + side, left : left + side]
    return F.adaptive_avg_pool2d(pixels[None], size)[0]


def synthetic_images(count: int, seed: int, size: int = 2 * LATENT_SIZE) -> torch.Tensor:
    """``[count, 3, size, size]`` seeded stand-ins for photos: smooth colour fields plus bright blobs."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    images = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    grid = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    for _ in range(3):
        centre = torch.rand(count, 2, 1, 1, generator=generator) * 1.6 - 0.8
        radius = 0.1 + 0.3 * torch.rand(count, 1, 1, generator=generator)
        colour = torch.rand(count, 3, 1, 1, generator=generator) * 2 - 1
        blob = torch.exp(-((xx - centre[:, 0]) ** 2 + (yy - centre[:, 1]) ** 2) / radius**2)
        images = images + blob[:, None] * colour
    return images.clamp(-1, 1)


def channel_projection(channels: int, seed: int, inputs: int = 12) -> torch.Tensor:
    """A fixed ``[channels, inputs]`` matrix with orthonormal rows (or columns, when widening)."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    q, _ = torch.linalg.qr(torch.randn(max(channels, inputs), min(channels, inputs), generator=generator))
    return q.T if channels < inputs else q


def encode(images: torch.Tensor, family: Family, seed: int = 0) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [-1, 1] → unit-variance latents ``[N, *family.latent_shape()]``."""
    pooled = F.adaptive_avg_pool2d(images, 2 * LATENT_SIZE)
    folded = F.pixel_unshuffle(pooled, 2)  # [N, 12, L, L]
    latents = torch.einsum("ci,nihw->nchw", channel_projection(family.latent_channels, seed), folded)
    latents = latents - latents.mean(dim=(0, 2, 3), keepdim=True)
    latents = latents / latents.std().clamp_min(1e-6)
    return pack(latents) if family.packed else latents


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` → Flux's ``[N, (H/2)(W/2), 4C]`` sequence of 2×2 patches."""
    n, c, h, w = latents.shape
    patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def load_images(family: Family, seed: int = 0, synthetic_subjects: int = 8, per_subject: int = 4) -> ImageSet:
    """The DreamBooth photos when present (every subject), else seeded synthetic ones; encoded."""
    root = photo_dir()
    if root is None:
        count = synthetic_subjects * per_subject
        images = synthetic_images(count, seed)
        subjects = torch.arange(count) // per_subject
        names = [f"synthetic{i}" for i in range(synthetic_subjects)]
        return ImageSet(encode(images, family, seed), subjects, names, "synthetic")
    files = photo_files(root)
    names = list(files)
    images = [_load_rgb(path, 2 * LATENT_SIZE) for name in names for path in files[name]]
    subjects = torch.tensor([i for i, name in enumerate(names) for _ in files[name]])
    return ImageSet(encode(torch.stack(images), family, seed), subjects, names, "dreambooth")


def caption_embeddings(names: list[str], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed per-subject ``[S, TOKENS, CONTEXT_DIM]`` token and ``[S, POOLED_DIM]`` pooled embeddings.

    Seeded from the subject's name (not its position), so removing a subject never changes another's.
    """
    tokens, pooled = [], []
    for name in names:
        digest = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
        generator = torch.Generator().manual_seed(digest % (2**63))
        tokens.append(torch.randn(TOKENS, CONTEXT_DIM, generator=generator))
        pooled.append(torch.randn(POOLED_DIM, generator=generator))
    return torch.stack(tokens), torch.stack(pooled)


def make_batch(images: ImageSet, index: torch.Tensor, family: Family, seed: int) -> Batch:
    """The batch of images ``index`` with their subjects' caption conditioning."""
    text, pooled = caption_embeddings(images.names, seed)
    subjects = images.subjects[index]
    return Batch(images.latents[index], family.conditioning(text[subjects], pooled[subjects]))


def batch_stream(images: ImageSet, family: Family, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless seeded shuffled epochs over ``images``, in batches of ``batch_size``."""
    generator = torch.Generator().manual_seed(seed + 1)
    count = len(images.subjects)
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1 if count >= batch_size else 1, batch_size):
            yield make_batch(images, order[start : start + batch_size], family, seed)


def cache_dir() -> Path:
    """Where pre-trained bases are kept between runs (``LORA2_BENCH_CACHE`` or the temp directory)."""
    path = Path(os.environ.get("LORA2_BENCH_CACHE") or Path(tempfile.gettempdir()) / "comfyui_lora2_bench")
    path.mkdir(parents=True, exist_ok=True)
    return path


def without_subjects(images: ImageSet, exclude: Sequence[str]) -> ImageSet:
    """``images`` minus every image of the subjects named in ``exclude`` (``names`` keeps them all, so
    subject indices and caption embeddings stay the same); unknown names raise naming the subject."""
    unknown = sorted(set(exclude) - set(images.names))
    if unknown:
        raise LoRA2Error(f"cannot hold out subject(s) {unknown}: the {images.source} images have {images.names}")
    dropped = torch.tensor([images.names.index(name) for name in exclude], dtype=images.subjects.dtype)
    return images.select(~torch.isin(images.subjects, dropped))


def pretraining_key(
    model_name: str,
    seed: int,
    images: ImageSet,
    note: str = "",
    exclude: Sequence[str] = (),
    steps: int = PRETRAIN_STEPS,
) -> str:
    """The cache name of a pre-trained base: everything that changes its weights.

    ``images`` are the images before ``exclude`` is applied. The held-out subjects enter the key by
    name, on top of the fingerprint of the images actually trained on, so a base pre-trained with a
    subject held out is never reused where it was not (and vice versa). With no ``exclude`` and the
    default steps the key is the one this function has always produced, so existing caches stay valid.
    """
    trained_on = without_subjects(images, exclude) if exclude else images
    fingerprint = {
        "version": CACHE_VERSION,
        "model": model_name,
        "seed": seed,
        "source": trained_on.source,
        "names": trained_on.names,
        "latents": hashlib.sha256(trained_on.latents.numpy().tobytes()).hexdigest(),
        "recipe": [steps, PRETRAIN_BATCH, PRETRAIN_LR],
        "note": note,
    }
    if exclude:
        fingerprint["exclude"] = sorted(exclude)
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:20]


def pretrain(model: nn.Module, family: Family, images: ImageSet, seed: int, steps: int = PRETRAIN_STEPS) -> None:
    """Full fine-tune of every weight with Adam on the ordinary ε / flow loss, in place.

    A few hundred steps are enough to give the weights the structure of a trained denoiser (the
    attention starts attending to the caption and the image layout), which is what separates a
    "pretrained" base from a random one for LoRA²; it is not meant to generate good images.
    """
    rule = family.rule()
    denoise = family.denoiser(model)
    model.requires_grad_(True).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=PRETRAIN_LR)
    generator = torch.Generator().manual_seed(seed + 7)
    stream = batch_stream(images, family, PRETRAIN_BATCH, seed)
    for _ in range(steps):
        batch = next(stream)
        noise = torch.randn(batch.latents.shape, generator=generator)
        prepared = rule.prepare(batch.latents, noise, generator)
        output = denoise(prepared.model_input, prepared.timestep, batch.conditioning)
        loss = (output - prepared.target).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval().requires_grad_(False)


def base_model(
    model_name: str,
    family: Family,
    seed: int,
    base: str,
    images: ImageSet,
    note: str = "",
    log: Callable[[str], None] = print,
    exclude: Sequence[str] = (),
    steps: int = PRETRAIN_STEPS,
) -> nn.Module:
    """The seeded tiny model; for ``base="pretrained"`` also pre-trained on ``images`` (cached on disk).

    ``exclude`` names subjects whose images the pre-training never sees (a held-out subject for
    personalisation); ``steps`` is the pre-training length. Both go into the cache key
    (:func:`pretraining_key`), and so does ``note``.
    """
    model = build_model(model_name, seed)
    if base == "random":
        return model
    path = cache_dir() / f"{model_name}_{pretraining_key(model_name, seed, images, note, exclude, steps)}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    trained_on = without_subjects(images, exclude) if exclude else images
    held_out = f", holding out {', '.join(exclude)}" if exclude else ""
    log(
        f"pre-training the {model_name} base on {len(trained_on.subjects)} {images.source} images"
        f" ({steps} steps{held_out})"
    )
    pretrain(model, family, trained_on, seed, steps)
    temporary = path.with_suffix(".tmp")
    torch.save(model.state_dict(), temporary)
    temporary.replace(path)
    return model
