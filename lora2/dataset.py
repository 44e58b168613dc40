"""LoRA² training data: a folder of captioned images, encoded once into cached latents and embeddings.

The pipeline, one module per step::

    folder = resolve_folder("my_dog", input_root)                 # dataset_files
    items = scan_folder(folder, "a photo of {trigger}", "sks dog")  # dataset_files
    data = build_dataset(items, DatasetSpec(resolution=512, flip=True), vae_encode, text_encode,
                         cache_dir, model_key="sd15:<hash>")      # this module
    for batch in data.batches(batch_size=2, generator=torch.Generator().manual_seed(0)): ...

``build_dataset`` assigns buckets (:mod:`lora2.dataset_images`), makes each image's versions
(:mod:`lora2.dataset_augment`), encodes what the caches (:mod:`lora2.dataset_cache`) do not already
hold, and returns a :class:`~lora2.dataset_batches.CachedDataset`. The encoders are plain callables so
that this module never needs ComfyUI: the node wraps its VAE and CLIP objects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .dataset_augment import versions
from .dataset_batches import Batch, CachedDataset, CachedItem, check_conditioning, collate_conditioning
from .dataset_cache import MemoryCache, TensorCache, file_sha256, latents_key, text_key
from .dataset_files import IMAGE_EXTENSIONS, ImageItem, resolve_folder, scan_folder
from .dataset_images import Bucket, assign_bucket, fit_to_bucket, load_image, make_buckets
from .dataset_spec import DatasetSpec
from .errors import LoRA2Error

__all__ = [
    "IMAGE_EXTENSIONS",
    "Batch",
    "Bucket",
    "CachedDataset",
    "CachedItem",
    "DatasetSpec",
    "EncodingCancelled",
    "ImageEncoder",
    "ImageItem",
    "MemoryCache",
    "TextEncoder",
    "assign_bucket",
    "build_dataset",
    "collate_conditioning",
    "make_buckets",
    "resolve_folder",
    "scan_folder",
]

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
"""``[B, 3, H, W]`` float32 in [0, 1] on CPU -> latents ``[B, C, H/f, W/f]`` (any device and dtype)."""
TextEncoder = Callable[[str], dict[str, torch.Tensor]]
"""caption -> named tensors, each with batch dimension 1 (e.g. ``cross_attn`` ``[1, 77, 768]``)."""


class EncodingCancelled(LoRA2Error):
    """``should_stop`` asked to stop; everything encoded so far is cached and is reused next time."""


def item_buckets(items: Sequence[ImageItem], spec: DatasetSpec) -> list[Bucket]:
    """Each item's bucket: nearest aspect ratio, or the one square when bucketing is off."""
    if spec.bucketing:
        buckets = make_buckets(spec.resolution, spec.bucket_step, spec.max_ratio)
    else:
        side = spec.resolution // spec.bucket_step * spec.bucket_step
        buckets = [(side, side)]
    return [assign_bucket(item.width, item.height, buckets) for item in items]


@dataclass
class _Job:
    """One distinct image to encode (identical files in several places are encoded once)."""

    key: str
    path: Path
    sha256: str
    bucket: Bucket


class _Progress:
    def __init__(self, total: int, callback: Callable[[int, int], None] | None) -> None:
        self.done, self.total, self.callback = 0, total, callback

    def advance(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)


def build_dataset(
    items: Sequence[ImageItem],
    spec: DatasetSpec,
    encode_images: ImageEncoder,
    encode_text: TextEncoder,
    cache_dir: Path | None,
    model_key: str,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    memory_cache: MemoryCache | None = None,
    encode_batch_size: int = 4,
) -> CachedDataset:
    """Encode ``items`` (or fetch them from the caches) into a :class:`CachedDataset`.

    Args:
        model_key: identifies the VAE and text encoder (part of every cache key; must not be empty).
        progress: called with ``(done, total)`` after each distinct caption and image.
        should_stop: polled before every encoder call; True raises :class:`EncodingCancelled`.
        memory_cache: kept by the caller between runs; None keeps nothing in memory.
        encode_batch_size: images per ``encode_images`` call (versions of one bucket share calls).
    """
    if not items:
        raise LoRA2Error("there are no images to encode; scan_folder found none")
    if not model_key.strip():
        raise LoRA2Error("model_key is empty; pass a string that identifies the VAE and text encoder")
    if encode_batch_size < 1:
        raise LoRA2Error(f"encode_batch_size must be at least 1, got {encode_batch_size}")
    cache = TensorCache(memory_cache, cache_dir)
    captions = list(dict.fromkeys(item.caption for item in items))
    buckets = item_buckets(items, spec)
    jobs: dict[str, _Job] = {}
    item_keys = []
    for item, bucket in zip(items, buckets, strict=True):
        sha = file_sha256(item.path)
        key = latents_key(sha, spec.pixel_settings(bucket), model_key)
        jobs.setdefault(key, _Job(key, item.path, sha, bucket))
        item_keys.append(key)
    counter = _Progress(len(captions) + len(jobs), progress)
    stop = _stopper(should_stop, counter)
    with torch.no_grad():
        embeddings = {c: _embedding(c, encode_text, cache, model_key, stop, counter) for c in captions}
        check_conditioning(list(embeddings.items()))
        latents = _latents(list(jobs.values()), spec, encode_images, cache, model_key, stop, counter, encode_batch_size)
    cached = [
        CachedItem(item.path, item.caption, item.repeats, bucket, latents[key], embeddings[item.caption])
        for item, bucket, key in zip(items, buckets, item_keys, strict=True)
    ]
    return CachedDataset(cached, spec)


def _stopper(should_stop: Callable[[], bool] | None, counter: _Progress) -> Callable[[], None]:
    def stop() -> None:
        if should_stop is not None and should_stop():
            raise EncodingCancelled(
                f"dataset encoding was cancelled after {counter.done} of {counter.total}; "
                "what was encoded is cached and will be reused"
            )

    return stop


def _embedding(
    caption: str,
    encode_text: TextEncoder,
    cache: TensorCache,
    model_key: str,
    stop: Callable[[], None],
    counter: _Progress,
) -> dict[str, torch.Tensor]:
    key = text_key(caption, model_key)
    entry = cache.get(key)
    if entry is None:
        stop()
        output = encode_text(caption)
        if not isinstance(output, dict) or not output:
            raise LoRA2Error(f"the text encoder returned {type(output).__name__} for {caption!r}; expected a dict")
        for name, value in output.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise LoRA2Error(
                    f"the text encoder's output {name!r} for {caption!r} is {type(value).__name__}; "
                    "every value must be a tensor under a string key"
                )
        entry = cache.put(key, output, {"caption": caption, "model_key": model_key})
    counter.advance()
    return entry


def _latents(
    jobs: list[_Job],
    spec: DatasetSpec,
    encode_images: ImageEncoder,
    cache: TensorCache,
    model_key: str,
    stop: Callable[[], None],
    counter: _Progress,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Latents ``[versions, C, h, w]`` per job key; encodes the missing ones bucket by bucket."""
    done: dict[str, torch.Tensor] = {}
    missing = []
    for job in jobs:
        entry = cache.get(job.key)
        if entry is not None and entry["latents"].shape[0] == spec.versions_per_image:
            done[job.key] = entry["latents"]
            counter.advance()
        else:
            missing.append(job)
    missing.sort(key=lambda job: job.bucket)
    parts: dict[str, list[torch.Tensor]] = {}
    pending: list[tuple[_Job, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        stop()
        pixels = torch.stack([p for _, p in pending])
        output = encode_images(pixels)
        _check_latents(output, pixels, pending[0][0])
        for (job, _), latent in zip(pending, output.detach().to("cpu", torch.float32), strict=True):
            parts.setdefault(job.key, []).append(latent)
            if len(parts[job.key]) == spec.versions_per_image:
                done[job.key] = _store(job, torch.stack(parts.pop(job.key)), spec, cache, model_key)
                counter.advance()
        pending.clear()

    for job in missing:
        if pending and pending[0][0].bucket != job.bucket:
            flush()
        pixels = fit_to_bucket(load_image(job.path), job.bucket)
        for version in versions(pixels, spec, job.sha256):
            pending.append((job, version))
            if len(pending) == batch_size:
                flush()
    flush()
    return done


def _check_latents(output: object, pixels: torch.Tensor, job: _Job) -> None:
    if not isinstance(output, torch.Tensor) or output.ndim != 4 or output.shape[0] != pixels.shape[0]:
        shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise LoRA2Error(
            f"the image encoder returned {shape} for images {list(pixels.shape)} (bucket {job.bucket}, e.g. "
            f"'{job.path}'); it must return latents [B, C, h, w] with one latent per image"
        )
    if not torch.isfinite(output).all():
        raise LoRA2Error(f"the image encoder returned NaN or infinite latents for bucket {job.bucket} ('{job.path}')")


def _store(job: _Job, latents: torch.Tensor, spec: DatasetSpec, cache: TensorCache, model_key: str) -> torch.Tensor:
    info = {
        "source": str(job.path),
        "image_sha256": job.sha256,
        "spec": spec.to_dict(),
        "pixels": spec.pixel_settings(job.bucket),
        "model_key": model_key,
    }
    return cache.put(job.key, {"latents": latents}, info)["latents"]
