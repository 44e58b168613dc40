"""Subject fidelity and prompt fidelity of generated images: DINO, CLIP-I, CLIP-T (DreamBooth's metrics).

As Ruiz et al., "DreamBooth" (CVPR 2023, section 4 and table 1) define them, for generated images ``g`` and the
subject's real photos ``r``:

- **DINO**: mean cosine similarity between the ViT-S/16 DINO CLS embeddings of every (g, r) pair;
- **CLIP-I**: the same with CLIP image embeddings;
- **CLIP-T**: cosine similarity between the CLIP embedding of a generated image and of its prompt.

All three are raw cosines in [-1, 1] (the paper's tables print them so: DINO 0.668, CLIP-I 0.803,
CLIP-T 0.305 for DreamBooth on Stable Diffusion), not ×100. Per generated image we report its mean over the real
photos (DINO, CLIP-I) or its own prompt (CLIP-T); the overall value is the mean of those, which for
DINO and CLIP-I equals the mean over all pairs, and ``std`` is the population standard deviation over
the generated images (defined for one image too).

Why not torchmetrics' ``CLIPScore`` for CLIP-T: it reports ``max(100 · cos, 0)`` averaged over the
batch, which drops the sign and the per-image values the protocol needs, and torchmetrics 1.9.0 fails
with transformers ≥ 5 (whose ``get_image_features`` returns a model output, not a tensor). Its
definition is one cosine between ``get_image_features`` and ``get_text_features`` of the same CLIP
model and processor; that is what :func:`clip_text_embeddings` and :func:`clip_image_embeddings` call,
and ``tests/test_evaluate.py`` checks ``100 · max(mean CLIP-T, 0)`` against torchmetrics on one model.

Images: generated ones arrive as ComfyUI's IMAGE (float ``[N, H, W, 3]`` in [0, 1]) and are quantised
to 8 bits the way ComfyUI's Save Image does, so an image saved with it and read back as a real photo
is the same input; both then go through the model's own processor (resize, crop, normalise).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from .dataset_files import scan_folder
from .dataset_images import load_image
from .errors import LoRA2Error
from .evaluate_models import load_clip, load_dino

METRICS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"))
"""``(key, label)`` of each metric, in the order tables show them."""
PROTOCOL = "DreamBooth (Ruiz et al. 2023): raw cosine similarity in [-1, 1]"


@dataclass(frozen=True)
class EvalModels:
    """The two evaluation models with their processors, on one device, in eval mode."""

    dino: Any
    dino_processor: Any
    clip: Any
    clip_processor: Any
    device: torch.device
    dtype: torch.dtype = torch.float32
    folders: tuple[str, str] = ("", "")
    """Where the DINO and CLIP models were loaded from (reported in the results)."""

    @classmethod
    def load(
        cls,
        dino_folder: Path,
        clip_folder: Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> EvalModels:
        """Both models from local Hugging Face folders (see :mod:`evaluate_models`)."""
        dino, dino_processor = load_dino(Path(dino_folder), device, dtype)
        clip, clip_processor = load_clip(Path(clip_folder), device, dtype)
        folders = (str(dino_folder), str(clip_folder))
        return cls(dino, dino_processor, clip, clip_processor, torch.device(device), dtype, folders)


@dataclass(frozen=True)
class EvalResult:
    """Per generated image: its prompt and its DINO, CLIP-I and CLIP-T; plus the real photos' names."""

    prompts: list[str]
    dino: list[float]
    clip_i: list[float]
    clip_t: list[float]
    real_names: list[str]
    models: dict[str, str] | None = None
    """``{"dino": folder, "clip": folder}`` the embeddings came from."""

    def values(self, key: str) -> list[float]:
        return list(getattr(self, key))

    def summary(self) -> dict[str, dict[str, float]]:
        """``{metric: {"mean": ..., "std": ...}}`` over the generated images (population std)."""
        out = {}
        for key, _ in METRICS:
            values = torch.tensor(self.values(key), dtype=torch.float64)
            out[key] = {"mean": float(values.mean()), "std": float(values.std(correction=0))}
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON types: summary, per-image rows, the real photos, the protocol."""
        rows = [
            {"index": i, "prompt": prompt, **{key: self.values(key)[i] for key, _ in METRICS}}
            for i, prompt in enumerate(self.prompts)
        ]
        return {
            "protocol": PROTOCOL,
            "num_generated": len(self.prompts),
            "num_real": len(self.real_names),
            "summary": self.summary(),
            "per_image": rows,
            "real_photos": list(self.real_names),
            "models": dict(self.models or {}),
        }

    def to_text(self) -> str:
        """An aligned text table: one row per generated image, then mean and std."""
        header = f"{'#':>4}  " + "  ".join(f"{label:>7}" for _, label in METRICS) + "  prompt"
        lines = [
            f"LoRA² Evaluate: {len(self.prompts)} generated vs {len(self.real_names)} real photos ({PROTOCOL})",
            header,
            "-" * len(header),
        ]
        for i, prompt in enumerate(self.prompts):
            cells = "  ".join(f"{self.values(key)[i]:7.4f}" for key, _ in METRICS)
            lines.append(f"{i:>4}  {cells}  {prompt}")
        lines.append("-" * len(header))
        summary = self.summary()
        for stat in ("mean", "std"):
            lines.append(f"{stat:>4}  " + "  ".join(f"{summary[key][stat]:7.4f}" for key, _ in METRICS))
        return "\n".join(lines)

    def describe(self) -> str:
        """One line: ``DINO 0.612 ± 0.031, CLIP-I ..., CLIP-T ...``."""
        summary = self.summary()
        return ", ".join(f"{label} {summary[key]['mean']:.3f} ± {summary[key]['std']:.3f}" for key, label in METRICS)


# ----------------------------------------------------------------------------- inputs
def images_from_tensor(images: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE ``[N, H, W, 3]`` (floats in [0, 1]) to RGB PIL images, quantised like Save Image."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[-1] not in (3, 4) or images.shape[0] < 1:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise LoRA2Error(f"the generated images must be an IMAGE batch [N, H, W, 3] with N ≥ 1, got {shape}")
    pixels = (images[..., :3].detach().float().cpu() * 255.0).clamp(0, 255).to(torch.uint8).numpy()
    return [Image.fromarray(frame, mode="RGB") for frame in pixels]


def read_photos(folder: Path) -> tuple[list[str], list[Image.Image]]:
    """Every image under ``folder`` (the dataset's rules: png/jpg/jpeg/webp, recursive, sorted) as RGB,
    with names relative to the folder."""
    folder = Path(folder)
    try:
        items = scan_folder(folder, caption_template="real photo", trigger="")
    except LoRA2Error as exc:
        raise LoRA2Error(f"real photos: {exc}") from exc
    names = [item.path.relative_to(folder).as_posix() for item in items]
    return names, [load_image(item.path) for item in items]


def expand_prompts(prompts: str | Sequence[str], count: int) -> list[str]:
    """One prompt per generated image: a text is split into its non-empty lines; a single prompt is used
    for every image; any other number of prompts than ``count`` is an error (the pairing would be a guess)."""
    lines = prompts.splitlines() if isinstance(prompts, str) else list(prompts)
    lines = [" ".join(str(line).split()) for line in lines]
    lines = [line for line in lines if line]
    if not lines:
        raise LoRA2Error("prompts is empty; give the prompt of each generated image (one per line) or one for all")
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise LoRA2Error(
            f"prompts has {len(lines)} lines for {count} generated images; give one prompt per image, "
            "in the images' order, or a single prompt for all"
        )
    return lines


# ----------------------------------------------------------------------------- embeddings
def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


def _pooled(output: Any) -> torch.Tensor:
    """CLIP's projected features: a tensor in transformers 4, ``pooler_output`` of a model output in 5."""
    return output if torch.is_tensor(output) else output.pooler_output


def _pixels(processor: Any, images: Sequence[Image.Image], models: EvalModels) -> torch.Tensor:
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    return pixels.to(device=models.device, dtype=models.dtype)


def _unit(chunks: list[torch.Tensor]) -> torch.Tensor:
    return F.normalize(torch.cat(chunks).float().cpu(), dim=-1)


def dino_embeddings(models: EvalModels, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
    """Unit-length DINO CLS embeddings ``[N, D]`` (float32, CPU)."""
    with torch.inference_mode():
        chunks = [
            models.dino(pixel_values=_pixels(models.dino_processor, chunk, models)).last_hidden_state[:, 0]
            for chunk in _chunks(images, batch_size)
        ]
    return _unit(chunks)


def clip_image_embeddings(models: EvalModels, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
    """Unit-length CLIP image embeddings ``[N, D]`` (after CLIP's visual projection)."""
    with torch.inference_mode():
        chunks = [
            _pooled(models.clip.get_image_features(pixel_values=_pixels(models.clip_processor, chunk, models)))
            for chunk in _chunks(images, batch_size)
        ]
    return _unit(chunks)


def clip_text_embeddings(models: EvalModels, prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Unit-length CLIP text embeddings ``[N, D]``; prompts longer than CLIP's context are truncated."""
    max_length = models.clip.config.text_config.max_position_embeddings
    chunks = []
    with torch.inference_mode():
        for chunk in _chunks(list(prompts), batch_size):
            tokens = models.clip_processor(
                text=list(chunk), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            ids = tokens["input_ids"].to(models.device)
            mask = tokens["attention_mask"].to(models.device)
            chunks.append(_pooled(models.clip.get_text_features(input_ids=ids, attention_mask=mask)))
    return _unit(chunks)


# ----------------------------------------------------------------------------- metrics
def mean_pairwise_cosine(generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per generated embedding, its mean cosine similarity to every real one (inputs of unit length)."""
    return (generated @ real.T).mean(dim=1)


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two batches of unit-length embeddings."""
    return (a * b).sum(dim=-1)


def evaluate(
    generated: torch.Tensor | Sequence[Image.Image],
    real: Path | Sequence[Image.Image],
    prompts: str | Sequence[str],
    models: EvalModels,
    batch_size: int = 16,
    real_names: Sequence[str] | None = None,
) -> EvalResult:
    """DINO, CLIP-I and CLIP-T of ``generated`` against the subject's ``real`` photos (a folder or images).

    Args:
        generated: a ComfyUI IMAGE batch or PIL images.
        real: a folder of photos (read as LoRA² Dataset reads one) or PIL images.
        prompts: one per generated image (a list, or lines of one text), or a single prompt for all.
        models: from :meth:`EvalModels.load`; the embeddings are computed on its device.
        batch_size: images (or prompts) per model call.
        real_names: labels of the real images when they are given as images.
    """
    images = images_from_tensor(generated) if torch.is_tensor(generated) else list(generated)
    if isinstance(real, (str, Path)):
        real_names, real_images = read_photos(Path(real))
    else:
        real_images = list(real)
        real_names = list(real_names) if real_names is not None else [f"real {i}" for i in range(len(real_images))]
    if not images or not real_images:
        raise LoRA2Error("evaluate needs at least one generated image and one real photo")
    texts = expand_prompts(prompts, len(images))
    dino = mean_pairwise_cosine(
        dino_embeddings(models, images, batch_size), dino_embeddings(models, real_images, batch_size)
    )
    clip_generated = clip_image_embeddings(models, images, batch_size)
    clip_i = mean_pairwise_cosine(clip_generated, clip_image_embeddings(models, real_images, batch_size))
    clip_t = paired_cosine(clip_generated, clip_text_embeddings(models, texts, batch_size))
    folders = {"dino": models.folders[0], "clip": models.folders[1]}
    return EvalResult(texts, dino.tolist(), clip_i.tolist(), clip_t.tolist(), list(real_names), folders)
