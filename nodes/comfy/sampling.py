"""Validation samples through ComfyUI's own sampler, on the MODEL being trained.

The adapter is attached to the model's diffusion module by forward hooks while it trains, so the
MODEL the Train node received *is* the model with the adapter in its current state: sampling it with
``comfy.sample.sample`` (the same ``model_sampling``, schedulers and samplers as KSampler) shows
exactly what the adapter does at that step, without folding or copying anything. The core side
(schedule, grid, files, RNG isolation) is :mod:`lora2.validation`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
import numpy as np
import torch
from PIL import Image

from ...lora2.errors import LoRA2Error
from ...lora2.validation import Sampler, Shower, ValidationConfig, ValidationRun, run_folder
from .progress import interrupted

OUTPUT_SUBFOLDER = "lora2"
"""Grids go to ``output/lora2/<run name>/``."""
PREVIEW_SIZE = 1024
"""Longest side of the progress preview (ComfyUI's default 512 makes a grid of four unreadable)."""


@dataclass
class ValidationPlan:
    """What LoRA² Validation hands to LoRA² Train: the settings and the prompts, already encoded.

    ``positives`` holds one CONDITIONING per prompt; ``negative`` is the encoded empty prompt when a
    CLIP was connected (None: no classifier-free guidance, ``cfg`` is treated as 1); ``vae`` decodes
    the samples (None: ComfyUI's latent-to-RGB preview approximation is drawn instead).
    """

    config: ValidationConfig
    prompts: list[str]
    positives: list[list]
    negative: list | None = None
    vae: Any | None = None


def sampler_names() -> list[str]:
    """KSampler's samplers (the validation widget offers the same list as KSampler)."""
    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> list[str]:
    return list(comfy.samplers.KSampler.SCHEDULERS)


def encode_prompts(clip, prompts: list[str]) -> tuple[list[list], list]:
    """Each prompt, and the empty negative, as CONDITIONING through the CLIP's own encoder."""

    def encode(text: str) -> list:
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    return [encode(prompt) for prompt in prompts], encode("")


def split_conditioning(conditioning: list) -> list[list]:
    """One CONDITIONING per prompt from a connected CONDITIONING: each entry, and each batch row of it.

    CLIP Text Encode gives one entry of batch 1; a batch of prompts (or a list of entries) gives one
    validation image per row.
    """
    if not conditioning:
        raise LoRA2Error("validation conditioning is empty; connect a CLIP Text Encode node or write prompts")
    result = []
    for cross_attn, extras in conditioning:
        rows = cross_attn.shape[0]
        for row in range(rows):
            picked = {key: _row_of(value, row, rows) for key, value in extras.items()}
            result.append([[cross_attn[row : row + 1], picked]])
    return result


def _row_of(value, row: int, rows: int):
    """Row ``row`` of a per-prompt tensor (pooled output, ...); anything else as it is."""
    batched = torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == rows
    return value[row : row + 1] if batched else value


def make_sampler(model, plan: ValidationPlan, on_image: Callable[[int, int], None] | None = None) -> Sampler:
    """A :data:`lora2.validation.Sampler`: one image per prompt, from the same seed, with KSampler's code.

    ``on_image(done, total)`` is called after each image (a progress bar for long prompt lists)."""
    config = plan.config
    cfg = config.cfg if plan.negative is not None else 1.0
    latent_format = model.get_model_object("latent_format")

    def sample() -> list[Image.Image]:
        empty = torch.zeros([1, 4, config.height // 8, config.width // 8])
        latent = comfy.sample.fix_empty_latent_channels(model, empty)
        images = []
        for positive in plan.positives:
            noise = comfy.sample.prepare_noise(latent, config.seed)
            negative = plan.negative if plan.negative is not None else positive  # unused at cfg 1
            samples = comfy.sample.sample(
                model,
                noise,
                config.steps,
                cfg,
                config.sampler,
                config.scheduler,
                positive,
                negative,
                latent,
                disable_pbar=True,
                seed=config.seed,
            )
            images.append(_to_image(samples, plan.vae, latent_format, (config.width, config.height)))
            if on_image is not None:
                on_image(len(images), len(plan.positives))
        return images

    return sample


def _to_image(samples: torch.Tensor, vae, latent_format, size: tuple[int, int]) -> Image.Image:
    if vae is not None:
        pixels = vae.decode(samples)
        while pixels.ndim > 4:  # video VAEs add a frame axis
            pixels = pixels[:, 0]
        array = (pixels[0, ..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return Image.fromarray(np.ascontiguousarray(array))
    factors = latent_format.latent_rgb_factors
    if factors is None:
        raise LoRA2Error("this model has no latent preview colours; connect a VAE to LoRA² Validation")
    previewer = latent_preview.Latent2RGBPreviewer(
        factors, latent_format.latent_rgb_factors_bias, latent_format.latent_rgb_factors_reshape
    )
    image = previewer.decode_latent_to_preview(latent_format.process_in(samples.float()))
    return image.resize(size, Image.Resampling.BILINEAR)


def images_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size as a ComfyUI IMAGE batch ``[B, H, W, 3]`` in [0, 1]."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays))


def preview_shower(total_steps: int) -> Shower:
    """Shows a grid as the running node's progress preview (ComfyUI's progress bar with an image)."""
    bar = comfy.utils.ProgressBar(total_steps)

    def show(step: int, grid: Image.Image) -> None:
        if interrupted():
            return  # the progress hook would raise; Cancel is handled by the trainer after this step
        bar.update_absolute(step, total_steps, ("JPEG", grid, PREVIEW_SIZE))

    return show


def output_root() -> Path:
    return Path(folder_paths.get_output_directory()) / OUTPUT_SUBFOLDER


def validation_run(
    model, plan: ValidationPlan, total_steps: int, generators: list[torch.Generator] = ()
) -> ValidationRun:
    """The :class:`lora2.validation.ValidationRun` of one Train node execution."""
    return ValidationRun(
        config=plan.config,
        prompts=plan.prompts,
        sample=make_sampler(model, plan),
        folder=run_folder(output_root(), plan.config.run_name),
        show=preview_shower(total_steps),
        device=model.load_device,
        generators=list(generators),
    )


def saved_results(run: ValidationRun) -> list[dict[str, str]]:
    """The grids written, as ComfyUI ``ui`` image entries (type ``output``), the last one first."""
    root = Path(folder_paths.get_output_directory()).resolve()
    results = []
    for path in reversed(run.written):
        relative = path.resolve().relative_to(root)
        results.append({"filename": relative.name, "subfolder": relative.parent.as_posix(), "type": "output"})
    return results
