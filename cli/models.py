"""A local Stable Diffusion model (diffusers folder or single ``.safetensors``) as what a LoRA² run needs.

From one pipeline come the three things the nodes get from a ComfyUI workflow: the denoiser and its
noise rule (:class:`~lora2.run.TrainingTarget`), the image and caption encoders the dataset is built
with (:func:`lora2.dataset.build_dataset`), and a sampler for validation images.

Loading never touches the network: a diffusers folder loads with ``local_files_only=True``; a single
checkpoint goes through diffusers' single-file loader with ``config=`` a local diffusers folder (or
model-index folder) that holds the component configs and tokenizers, because the single file holds
weights only and the hub, where diffusers would look for those configs, is out of reach.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..lora2.adapter import Adapter
from ..lora2.errors import LoRA2Error
from ..lora2.fingerprint import fingerprint
from ..lora2.noise import DDPMRule
from ..lora2.run import TrainingTarget

FAMILIES = {"StableDiffusionPipeline": "SD15", "StableDiffusionXLPipeline": "SDXL"}
"""diffusers pipeline class -> the family name the adapter records (ComfyUI's model class name)."""
PIPELINES = {family: name for name, family in FAMILIES.items()}


@dataclass
class LocalModel:
    """A loaded pipeline and the facts a run reads off it."""

    pipeline: Any
    family: str
    source: Path
    device: torch.device

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def latent_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)


def _pipeline_class(name: str) -> Any:
    import diffusers

    return getattr(diffusers, name)


def model_index_family(folder: Path) -> str:
    """The family of a diffusers folder, from its ``model_index.json``."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise LoRA2Error(
            f"model folder '{folder}' has no model_index.json; pass a diffusers folder (save_pretrained layout) "
            "or a single .safetensors checkpoint with --model-config pointing to such a folder"
        )
    name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    if name not in FAMILIES:
        raise LoRA2Error(f"model folder '{folder}' holds a {name or 'unknown'} pipeline; supported: {sorted(FAMILIES)}")
    return FAMILIES[name]


def load_model(path: Path, config: Path | None, device: torch.device, dtype: torch.dtype) -> LocalModel:
    """Load ``path`` (a diffusers folder or a ``.safetensors`` checkpoint) onto ``device``, frozen, in eval mode.

    Args:
        config: for a single file, the local diffusers folder whose configs and tokenizers describe it.
        dtype: storage dtype of the frozen weights (the VAE stays float32: SDXL's VAE overflows in fp16).
    """
    path = Path(path)
    if path.is_dir():
        family = model_index_family(path)
        pipeline = _pipeline_class(PIPELINES[family]).from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    elif path.is_file() and path.suffix == ".safetensors":
        if config is None:
            raise LoRA2Error(
                f"'{path}' is a single-file checkpoint: pass --model-config with a local diffusers folder of the same "
                "architecture (its model_index.json, component configs and tokenizers; no weights needed)"
            )
        family = model_index_family(Path(config))
        pipeline = _pipeline_class(PIPELINES[family]).from_single_file(
            str(path), config=str(config), local_files_only=True, torch_dtype=dtype
        )
    elif path.is_file():
        raise LoRA2Error(f"model '{path}' is not a .safetensors file; only safetensors checkpoints are loaded")
    else:
        raise LoRA2Error(f"model '{path}' does not exist")
    if pipeline.vae.dtype != torch.float32:
        pipeline.vae.to(torch.float32)
    pipeline.to(device)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipeline, part, None)
        if module is not None:
            module.requires_grad_(False).eval()
    pipeline.set_progress_bar_config(disable=True)
    return LocalModel(pipeline, family, path, device)


def model_key(model: LocalModel) -> str:
    """Identity of the VAE and text encoders for the dataset cache (see :func:`lora2.fingerprint.fingerprint`)."""
    parts = [getattr(model.pipeline, name, None) for name in ("vae", "text_encoder", "text_encoder_2")]
    return f"{model.family.lower()}:{fingerprint(*[p for p in parts if p is not None])}"


def image_encoder(model: LocalModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[B, 3, H, W]`` in [0, 1] -> scaled latents (the VAE's mean: the same latents every time)."""
    vae = model.pipeline.vae
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            posterior = vae.encode(pixels.to(model.device, torch.float32) * 2 - 1).latent_dist
            return ((posterior.mode() - shift) * scale).float().cpu()

    return encode


def text_encoder(model: LocalModel) -> Callable[[str], dict[str, torch.Tensor]]:
    """caption -> ``cross_attn`` (and SDXL's ``pooled``), through the pipeline's own ``encode_prompt``."""
    pipeline = model.pipeline

    def encode(caption: str) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            if model.family == "SDXL":
                embeds, _, pooled, _ = pipeline.encode_prompt(
                    caption, device=model.device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
                return {"cross_attn": embeds.float().cpu(), "pooled": pooled.float().cpu()}
            embeds, _ = pipeline.encode_prompt(caption, model.device, 1, False)
            return {"cross_attn": embeds.float().cpu()}

    return encode


def noise_rule(model: LocalModel) -> DDPMRule:
    """DDPM noise on the model's own training schedule and prediction type (epsilon or v)."""
    from diffusers import DDPMScheduler

    config = model.pipeline.scheduler.config
    scheduler = DDPMScheduler.from_config(config)
    return DDPMRule(scheduler.alphas_cumprod, config.get("prediction_type", "epsilon"))


def denoiser(model: LocalModel) -> Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    """``(x_t, t, conditioning) -> prediction`` through the UNet.

    SDXL's size conditions are read off the latent: original and target size are the bucket the image
    was fitted to, crop offset 0 (the dataset scales each image to cover its bucket and center-crops).
    """
    unet, factor = model.unet, model.latent_factor

    if model.family != "SDXL":
        return lambda x, t, c: unet(x.to(unet.dtype), t, encoder_hidden_states=c["cross_attn"].to(unet.dtype)).sample

    def sdxl(x: torch.Tensor, t: torch.Tensor, c: dict[str, torch.Tensor]) -> torch.Tensor:
        height, width = x.shape[-2] * factor, x.shape[-1] * factor
        time_ids = torch.tensor([height, width, 0, 0, height, width], device=x.device, dtype=unet.dtype)
        added = {"text_embeds": c["pooled"].to(unet.dtype), "time_ids": time_ids.expand(x.shape[0], -1)}
        return unet(
            x.to(unet.dtype), t, encoder_hidden_states=c["cross_attn"].to(unet.dtype), added_cond_kwargs=added
        ).sample

    return sdxl


def training_target(model: LocalModel, batches: Callable) -> TrainingTarget:
    """The UNet as :func:`lora2.run.train_run` trains it; adapter keys are kohya's on diffusers names,
    which ComfyUI's LoraLoader, kohya's scripts and diffusers all map (``lora_unet_down_blocks_0_...``)."""
    return TrainingTarget(
        module=model.unet,
        denoiser=denoiser(model),
        rule=noise_rule(model),
        batches=batches,
        device=model.device,
        family=model.family,
    )


def render(model: LocalModel, prompt: str, steps: int, width: int, height: int, cfg: float, seed: int) -> list:
    """The pipeline's PIL images for ``prompt``, drawn from a fresh generator seeded ``seed`` on the model's device."""
    generator = torch.Generator(model.device).manual_seed(seed)
    output = model.pipeline(
        prompt,
        num_inference_steps=steps,
        guidance_scale=cfg,
        width=width,
        height=height,
        generator=generator,
        output_type="pil",
    )
    return output.images


def sampler(model: LocalModel, prompts: list[str], steps: int, width: int, height: int, cfg: float, seed: int):
    """A validation sampler: one image per prompt, same seed every round, adapters as attached now."""

    def sample() -> list:
        images = []
        for prompt in prompts:
            images.extend(render(model, prompt, steps, width, height, cfg, seed))
        return images

    return sample


@contextmanager
def merged(model: LocalModel, adapter: Adapter, strength: float = 1.0) -> Iterator[None]:
    """The UNet with ``adapter``'s ΔW added to its weights inside the block, restored exactly after.

    For sampling evaluation images from a finished adapter with the pipeline as it is (no PEFT, no
    hooks); the originals of the adapted weights are kept, so restoring is a copy, not a subtraction.
    """
    modules = dict(model.unet.named_modules())
    missing = [name for name in adapter.components if name not in modules]
    if missing:
        raise LoRA2Error(
            f"the adapter has components the model lacks, e.g. {missing[:3]}; it was trained on another model"
        )
    originals = {}
    try:
        with torch.no_grad():
            for name, component in adapter.components.items():
                weight = modules[name].weight
                originals[name] = weight.detach().clone()
                delta = component.delta().to(weight.device, torch.float32).reshape(weight.shape)
                weight.copy_((weight.float() + strength * delta).to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                modules[name].weight.copy_(original)


def generate(model: LocalModel, prompts: list[str], per_prompt: int, steps: int, size: int, cfg: float, seed: int):
    """``per_prompt`` images for each prompt (seeds ``seed, seed+1, …``), and the prompt of each image."""
    images, labels = [], []
    for prompt in prompts:
        for index in range(per_prompt):
            images.extend(render(model, prompt, steps, size, size, cfg, seed + index))
            labels.append(prompt)
    return images, labels
