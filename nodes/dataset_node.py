"""LoRA² Dataset: a folder of captioned images, encoded once with the workflow's VAE and CLIP."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..lora2.dataset import DatasetSpec, MemoryCache, build_dataset, scan_folder
from ..lora2.dataset_spec import MAX_VARIANTS
from ..lora2.errors import LoRA2Error
from ..lora2.fingerprint import fingerprint
from .comfy import encoders, files, io, progress
from .types import CATEGORY, Dataset

log = logging.getLogger("LoRA²")

SPEC_DEFAULTS = DatasetSpec()
"""Every preprocessing widget's default comes from :class:`~lora2.dataset_spec.DatasetSpec`: one source."""
MEMORY_CACHE = MemoryCache()
"""Encoded latents and embeddings kept between runs of the process (size-capped): re-running a graph
with the same images, settings, VAE and text encoder encodes nothing."""


def cache_dir() -> Path:
    """On-disk cache next to the models: survives restarts (ComfyUI empties temp/ at start)."""
    return files.models_subdir(files.CACHE_DIR)


class LoRA2Dataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2Dataset",
            search_aliases=["lora dataset", "training images", "dreambooth dataset", "image captions"],
            display_name="LoRA² Dataset",
            category=CATEGORY,
            description="Reads a folder of images (png/jpg/webp/bmp/gif/tiff) with optional same-name .txt "
            "captions or kohya 'N_name' repeat folders, buckets them by aspect ratio, and encodes them once with the "
            "VAE and CLIP (cached in memory and on disk).",
            inputs=[
                io.String.Input(
                    "folder",
                    default="lora2_subject",
                    tooltip="A folder under ComfyUI's input (or datasets) directory; absolute paths only inside "
                    "those, unless ComfyUI was started with COMFYUI_LORA2_ANY_DATASET_PATH=1.",
                ),
                io.Vae.Input("vae", tooltip="The VAE that encodes the images (the model's own)."),
                io.Clip.Input("clip", optional=True, tooltip="Text encoder for the captions."),
                io.Conditioning.Input(
                    "conditioning",
                    optional=True,
                    tooltip="Ready conditioning used for every image instead of encoding captions.",
                ),
                io.String.Input(
                    "caption_template",
                    default="a photo of {trigger}",
                    tooltip="Caption for images without a .txt file; {trigger} is replaced by the trigger word.",
                ),
                io.String.Input("trigger", default="sks dog", tooltip="The word(s) that will call up your subject."),
                io.Int.Input(
                    "resolution",
                    default=SPEC_DEFAULTS.resolution,
                    min=64,
                    max=4096,
                    step=64,
                    tooltip="Training side length in pixels.",
                ),
                io.Boolean.Input(
                    "bucketing",
                    default=SPEC_DEFAULTS.bucketing,
                    tooltip="Keep aspect ratios (buckets) instead of square crops.",
                ),
                io.Boolean.Input(
                    "flip", default=SPEC_DEFAULTS.flip, tooltip="Also train on left-right mirrored copies."
                ),
                io.Boolean.Input(
                    "random_crop", default=SPEC_DEFAULTS.crop, tooltip="Small random crops (90-100% of each side)."
                ),
                io.Boolean.Input(
                    "color_jitter", default=SPEC_DEFAULTS.color, tooltip="Small random brightness/contrast/hue."
                ),
                io.Int.Input(
                    "variants",
                    default=SPEC_DEFAULTS.variants,
                    min=1,
                    max=MAX_VARIANTS,
                    tooltip="Versions per image (first clean, others randomly augmented; needs crop or jitter).",
                ),
                io.Int.Input(
                    "seed",
                    default=SPEC_DEFAULTS.seed,
                    min=0,
                    max=2**31 - 1,
                    tooltip="Seed of the random augmentations.",
                ),
                io.Boolean.Input(
                    "cache_on_disk", default=True, tooltip="Keep encodings in models/lora2_cache across restarts."
                ),
            ],
            outputs=[
                Dataset.Output(
                    "dataset", display_name="dataset", tooltip="Encoded images and captions, ready for LoRA² Train."
                )
            ],
        )

    @classmethod
    def execute(
        cls,
        folder: str,
        vae,
        caption_template: str,
        trigger: str,
        resolution: int,
        bucketing: bool,
        flip: bool,
        random_crop: bool,
        color_jitter: bool,
        variants: int,
        seed: int,
        cache_on_disk: bool,
        clip=None,
        conditioning=None,
    ) -> io.NodeOutput:
        if clip is None and conditioning is None:
            raise LoRA2Error("LoRA² Dataset needs a CLIP (to encode captions) or a ready CONDITIONING input")
        root = files.dataset_folder(folder)
        items = scan_folder(root, caption_template, trigger)
        spec = DatasetSpec(
            resolution=resolution,
            bucketing=bucketing,
            flip=flip,
            crop=random_crop,
            color=color_jitter,
            variants=variants,
            seed=seed,
        )
        if conditioning is not None:
            fixed = encoders.conditioning_to_dict(conditioning)
            encode_text = lambda caption: fixed  # noqa: E731 (every image shares the given conditioning)
            text_identity = fingerprint(fixed)
        else:
            encode_text = encoders.clip_text_encoder(clip)
            text_identity = fingerprint(clip)
        show_progress = progress.progress_callback(len(items))
        with torch.inference_mode(False):
            dataset = build_dataset(
                items,
                spec,
                encoders.vae_image_encoder(vae),
                encode_text,
                cache_dir() if cache_on_disk else None,
                model_key=f"{fingerprint(vae)}:{text_identity}",
                progress=show_progress,
                should_stop=progress.interrupted,
                memory_cache=MEMORY_CACHE,
            )
        log.info("LoRA² dataset: %s", dataset.describe())
        return io.NodeOutput(dataset)
