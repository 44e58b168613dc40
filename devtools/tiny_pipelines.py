"""Seeded tiny diffusers pipelines (SD1.5 and SDXL layouts), as a diffusers folder and as one checkpoint file.

Why: the CLI loads models the way users keep them, a diffusers folder or a single ``.safetensors``
checkpoint, and no registry here ships weights. These pipelines are built from configs with seeded
init, in about a second. Their UNets have exactly the layouts of ``tiny_models.SD15_UNET_CONFIG`` and
``SDXL_UNET_CONFIG`` (ComfyUI's tiny models), so a LoRA trained on one loads onto the other through
ComfyUI's own diffusers-name map, which is how a user's file trained by the CLI meets ComfyUI's
LoraLoader. The VAE has four levels (8x, like SD's), so 64-pixel images give 8x8 latents. The text
encoders use the character-level tokenizer of ``tiny_eval_models``.

:func:`write_single_file` converts a folder into the original (LDM) checkpoint layout with ComfyUI's
own diffusers-to-LDM tables (``comfy.utils.unet_to_diffusers``, ``comfy.diffusers_convert``) and
diffusers' OpenCLIP table, so it needs the ComfyUI tree importable (``comfy_host`` booted).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny_eval_models import BOS, EOS, VOCAB_SIZE, write_tokenizer_files
from .unet_configs import sd15_unet_config, sdxl_unet_config

SD15_UNET = sd15_unet_config((32, 64), (True, True), cross_attention_dim=32, attention_head_dim=4)
"""The diffusers twin of ``tiny_models.SD15_UNET_CONFIG`` (4 heads)."""
SDXL_UNET = sdxl_unet_config(
    (32, 64),
    transformer_layers=(1, 1),
    attention_head_dim=(2, 4),
    cross_attention_dim=32,
    pooled_dim=32,
    time_embed_dim=256,
)
"""The diffusers twin of ``tiny_models.SDXL_UNET_CONFIG`` (16-channel heads)."""

TEXT_LAYERS = dict(
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=77,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=EOS,
)
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
    )


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def save_tiny_pipeline(folder: Path, family: str = "sd15", seed: int = 0) -> Path:
    """A random SD1.5- or SDXL-layout pipeline saved as a diffusers folder (``save_pretrained``)."""
    from diffusers import (
        DDPMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _tokenizer(folder / "_tokenizer_files")
        if family == "sd15":
            pipeline = StableDiffusionPipeline(
                vae=_vae(),
                text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=32, **TEXT_LAYERS)),
                tokenizer=tokenizer,
                unet=UNet2DConditionModel(**SD15_UNET),
                scheduler=DDPMScheduler(**SCHEDULE, steps_offset=1, clip_sample=False),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        elif family == "sdxl":
            pipeline = StableDiffusionXLPipeline(
                vae=_vae(),
                text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=16, **TEXT_LAYERS)),
                text_encoder_2=CLIPTextModelWithProjection(
                    CLIPTextConfig(hidden_size=16, projection_dim=32, **TEXT_LAYERS)
                ),
                tokenizer=tokenizer,
                tokenizer_2=tokenizer,
                unet=UNet2DConditionModel(**SDXL_UNET),
                scheduler=EulerDiscreteScheduler(**SCHEDULE),
            )
        else:
            raise ValueError(f"family must be sd15 or sdxl, got {family!r}")
    pipeline.save_pretrained(folder)
    return folder


def _clip_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers' CLIP text model (flattened or not) -> the LDM checkpoint's ``...transformer.text_model.*``."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def _open_clip_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModelWithProjection -> OpenCLIP layout (SDXL's second encoder in a checkpoint)."""
    import comfy.diffusers_convert
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    out = {
        prefix + "transformer." + k: v
        for k, v in comfy.diffusers_convert.convert_text_enc_state_dict_v20(state).items()
        if k.startswith("resblocks.")
    }
    for hf, ldm in DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items():
        out[prefix + ldm] = state[hf].T.contiguous() if ldm == "text_projection" else state[hf]
    return out


def write_single_file(folder: Path, path: Path, family: str = "sd15") -> Path:
    """The diffusers folder as one LDM-layout ``.safetensors`` (what CheckpointSave and A1111 write)."""
    import comfy.diffusers_convert
    import comfy.utils
    from safetensors.torch import load_file, save_file

    from .tiny_models import SD15_UNET_CONFIG, SDXL_UNET_CONFIG

    folder = Path(folder)
    unet_config = (
        {**SD15_UNET_CONFIG, "num_heads": 4, "num_head_channels": -1}
        if family == "sd15"
        else {**SDXL_UNET_CONFIG, "num_heads": -1, "num_head_channels": 16}
    )
    names = comfy.utils.unet_to_diffusers(unet_config)
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    state = {"model.diffusion_model." + names[k]: v for k, v in unet.items()}
    vae = comfy.diffusers_convert.convert_vae_state_dict(
        load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    )
    state.update({"first_stage_model." + k: v for k, v in vae.items()})
    text = load_file(folder / "text_encoder" / "model.safetensors")
    if family == "sd15":
        state.update(_clip_ldm(text, "cond_stage_model.transformer."))
    else:
        state.update(_clip_ldm(text, "conditioner.embedders.0.transformer."))
        state.update(
            _open_clip_ldm(load_file(folder / "text_encoder_2" / "model.safetensors"), "conditioner.embedders.1.model.")
        )
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)


def write_subject(folder: Path, count: int = 2, size: int = 64, seed: int = 0) -> Path:
    """``count`` seeded random PNG images with captions: a dataset folder for the CLI."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"image_{index}.png")
        (folder / f"image_{index}.txt").write_text(f"a photo of sks toy number {index}", encoding="utf-8")
    return folder
