"""The encoded dataset and its stream of training batches.

Batching rule (kohya's): training runs in epochs. In each epoch every image appears ``repeats`` times;
its copies are shuffled *within its bucket*, cut into batches of ``batch_size`` (the last batch of a
bucket may be smaller, rather than padded with duplicates), and the batches of all buckets are shuffled
together. So every batch has one latent size, and over an epoch an image with 10 repeats is seen
exactly ten times as often as one with 1. Each time an image is drawn, one of its encoded versions
(clean, augmented, mirrored) is picked uniformly at random. :meth:`CachedDataset.batches` runs epoch
after epoch forever, because the trainer counts steps, not epochs.

Token-length rule: captions longer than the text encoder's window give longer embeddings (CLIP: 77
tokens per chunk, so 154, 231 …). Within a batch, sequences (dimension 1 of every tensor with two or
more dimensions) are brought to a common length the way ComfyUI batches conditioning at sampling
time (``CONDCrossAttn.concat``): repeated whole to the least common multiple of the lengths, which
leaves cross-attention's output unchanged, as long as that is at most 4× the shortest. Beyond that
(variable-length encoders), shorter ones are zero-padded at the end to the longest. Nothing is trimmed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .dataset_images import Bucket
from .dataset_spec import DatasetSpec
from .errors import LoRA2Error

MAX_REPEAT_FACTOR = 4
"""ComfyUI's limit on how many times a shorter embedding is repeated to match a longer one."""


@dataclass
class Batch:
    """One training batch: every latent has the same size."""

    latents: torch.Tensor
    """``[B, C, h, w]``."""
    conditioning: dict[str, torch.Tensor]
    """The text encoder's outputs, batched along dimension 0."""
    captions: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """A copy on ``device``; floating-point tensors are also cast to ``dtype`` when given."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)

        return Batch(move(self.latents), {k: move(v) for k, v in self.conditioning.items()}, list(self.captions))


@dataclass
class CachedItem:
    """One image, encoded: all its versions' latents and its caption's embeddings (on CPU)."""

    source: Path
    caption: str
    repeats: int
    bucket: Bucket
    latents: torch.Tensor
    """``[versions, C, h, w]`` (see :func:`lora2.dataset_augment.versions` for the order)."""
    conditioning: dict[str, torch.Tensor]
    """Each with a leading batch dimension of 1."""


class CachedDataset:
    """Encoded images with their captions and repeats; a source of single-bucket batches."""

    def __init__(self, items: Sequence[CachedItem], spec: DatasetSpec) -> None:
        if not items:
            raise LoRA2Error("the dataset has no images")
        self.items = list(items)
        self.spec = spec
        shapes: dict[Bucket, tuple[int, ...]] = {}
        for item in self.items:
            shape = tuple(item.latents.shape[1:])
            if shapes.setdefault(item.bucket, shape) != shape:
                raise LoRA2Error(
                    f"image '{item.source}' encoded to latents {list(shape)}, unlike others of bucket "
                    f"{item.bucket} ({list(shapes[item.bucket])}); the image encoder must keep one size per bucket"
                )
        check_conditioning([(item.caption, item.conditioning) for item in self.items])

    def __len__(self) -> int:
        """Samples per epoch: every image counted ``repeats`` times."""
        return sum(item.repeats for item in self.items)

    @property
    def num_images(self) -> int:
        return len(self.items)

    def bucket_summary(self) -> dict[Bucket, int]:
        """Images per bucket ``(width, height)``, in bucket order."""
        summary: dict[Bucket, int] = {}
        for item in sorted(self.items, key=lambda i: i.bucket[0] / i.bucket[1]):
            summary[item.bucket] = summary.get(item.bucket, 0) + 1
        return summary

    def describe(self) -> str:
        """One line for a node's UI: images, samples per epoch, buckets."""
        buckets = ", ".join(f"{w}×{h}: {n}" for (w, h), n in self.bucket_summary().items())
        versions = self.items[0].latents.shape[0]
        return (
            f"{self.num_images} images, {len(self)} samples per epoch, {versions} encoded version(s) each; "
            f"buckets {buckets}"
        )

    def epoch(self, batch_size: int, generator: torch.Generator) -> list[list[int]]:
        """One epoch's batches as item indices (see the module docstring for the rule)."""
        if batch_size < 1:
            raise LoRA2Error(f"batch_size must be at least 1, got {batch_size}")
        by_bucket: dict[Bucket, list[int]] = {}
        for index, item in enumerate(self.items):
            by_bucket.setdefault(item.bucket, []).extend([index] * item.repeats)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            pool = by_bucket[bucket]
            order = torch.randperm(len(pool), generator=generator).tolist()
            shuffled = [pool[i] for i in order]
            batches.extend(shuffled[start : start + batch_size] for start in range(0, len(shuffled), batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """Batches forever, epoch after epoch; reproducible from the generator's state."""
        while True:
            for indices in self.epoch(batch_size, generator):
                yield self.collate(indices, generator)

    def collate(self, indices: Sequence[int], generator: torch.Generator) -> Batch:
        """The batch of these items, each with one of its versions picked at random."""
        items = [self.items[i] for i in indices]
        picks = [int(torch.randint(item.latents.shape[0], (), generator=generator)) for item in items]
        latents = torch.stack([item.latents[pick] for item, pick in zip(items, picks, strict=True)])
        conditioning = collate_conditioning([item.conditioning for item in items])
        return Batch(latents, conditioning, [item.caption for item in items])


def check_conditioning(entries: Sequence[tuple[str, dict[str, torch.Tensor]]]) -> None:
    """Every caption's embeddings must batch together: same keys, batch dimension 1, and shapes that
    differ at most in the sequence length (dimension 1 of tensors with two or more dimensions)."""
    first_caption, first = entries[0]
    for caption, conditioning in entries:
        if set(conditioning) != set(first):
            raise LoRA2Error(
                f"the text encoder returned keys {sorted(conditioning)} for {caption!r} but {sorted(first)} for "
                f"{first_caption!r}; it must return the same keys for every caption"
            )
        for key, tensor in conditioning.items():
            if tensor.ndim == 0 or tensor.shape[0] != 1:
                raise LoRA2Error(
                    f"the text encoder's {key!r} for {caption!r} has shape {list(tensor.shape)}; "
                    "every output needs a leading batch dimension of 1"
                )
            if _shape_outside_sequence(tensor) != _shape_outside_sequence(first[key]):
                raise LoRA2Error(
                    f"the text encoder's {key!r} has shape {list(tensor.shape)} for {caption!r} but "
                    f"{list(first[key].shape)} for {first_caption!r}; only the sequence length may differ"
                )


def _shape_outside_sequence(tensor: torch.Tensor) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    return shape if tensor.ndim < 2 else shape[:1] + shape[2:]


def collate_conditioning(conditionings: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate each key along dimension 0, matching sequence lengths first (module docstring)."""
    return {key: torch.cat(match_lengths([c[key] for c in conditionings])) for key in conditionings[0]}


def match_lengths(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Bring dimension 1 to one length: repeat to the LCM (≤ 4× the shortest), else zero-pad."""
    if tensors[0].ndim < 2:
        return tensors
    lengths = [t.shape[1] for t in tensors]
    if len(set(lengths)) == 1:
        return tensors
    common = math.lcm(*lengths)
    if common // min(lengths) <= MAX_REPEAT_FACTOR:
        return [t.repeat(1, common // t.shape[1], *[1] * (t.ndim - 2)) for t in tensors]
    longest = max(lengths)
    padded = []
    for t in tensors:
        pad = t.new_zeros((t.shape[0], longest - t.shape[1], *t.shape[2:]))
        padded.append(torch.cat([t, pad], dim=1))
    return padded
