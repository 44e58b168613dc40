"""Configs for small diffusers ``UNet2DConditionModel``s in the SD1.5 and SDXL layouts, spelled once.

Why one place: the plain-Python harness (``tiny_unet``), the tiny pipelines (``tiny_pipelines``), the LoRA
compatibility test and the diffusion benchmarks (``bench/tiny_diffusion``) each build a small UNet of a
family's layout at their own width. What makes a layout SD1.5 or SDXL (which levels cross-attend, SDXL's
linear projections and ``text_time`` added conditions) is written here; the callers choose only sizes.
Plain dicts, no imports: a config is made without loading diffusers.
"""

from __future__ import annotations

from typing import Any


def _blocks(attention: tuple[bool, ...]) -> dict[str, tuple[str, ...]]:
    """Down and up block types for levels that do (True) or do not cross-attend, highest resolution first."""
    return {
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
    }


def sd15_unet_config(
    channels: tuple[int, ...],
    attention: tuple[bool, ...],
    *,
    cross_attention_dim: int,
    attention_head_dim: int | tuple[int, ...],
    sample_size: int = 8,
    norm_num_groups: int = 32,
) -> dict[str, Any]:
    """An SD1.5-layout UNet: ``channels[i]`` wide at level ``i``, cross-attention where ``attention[i]``.

    One resnet per level, 4 latent channels in and out, conv ``proj_in``/``proj_out`` in the transformers.
    """
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": tuple(channels),
        "layers_per_block": 1,
        **_blocks(attention),
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": attention_head_dim,
        "norm_num_groups": norm_num_groups,
    }


def sdxl_unet_config(
    channels: tuple[int, ...],
    *,
    transformer_layers: tuple[int, ...],
    attention_head_dim: tuple[int, ...],
    cross_attention_dim: int,
    pooled_dim: int,
    time_embed_dim: int,
    sample_size: int = 8,
    norm_num_groups: int = 32,
) -> dict[str, Any]:
    """An SDXL-layout UNet: no attention at the highest resolution, linear projections, and the ``text_time``
    added embedding (the pooled text vector plus ``time_embed_dim``-wide Fourier embeddings of SDXL's six
    size and crop numbers)."""
    return {
        **sd15_unet_config(
            channels,
            (False,) + (True,) * (len(channels) - 1),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim,
            sample_size=sample_size,
            norm_num_groups=norm_num_groups,
        ),
        "transformer_layers_per_block": tuple(transformer_layers),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_embed_dim,
        "projection_class_embeddings_input_dim": pooled_dim + 6 * time_embed_dim,
    }


def ldm_unet_config(
    model_channels: int,
    channel_mult: list[int],
    depths: list[int],
    *,
    context_dim: int,
    res_blocks: int = 1,
    middle_depth: int = 1,
    linear: bool = False,
    adm_in_channels: int | None = None,
) -> dict[str, Any]:
    """ComfyUI's ``UNetModel`` config (``comfy.supported_models``' ``unet_config``, the original LDM layout).

    ``depths[i]`` transformer layers in each of the ``res_blocks`` input blocks of level ``i`` (highest
    resolution first) and in its ``res_blocks + 1`` output blocks; ``middle_depth`` in the middle block.
    ``adm_in_channels`` set makes it SDXL's: a ``y`` vector (pooled text and size embeddings) is added to
    the time embedding. Head counts are the family's ``unet_extra_config``, not here.
    """
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": model_channels,
        "channel_mult": list(channel_mult),
        "num_res_blocks": [res_blocks] * len(channel_mult),
        "transformer_depth": [d for d in depths for _ in range(res_blocks)],
        "transformer_depth_output": [d for d in depths for _ in range(res_blocks + 1)],
        "transformer_depth_middle": middle_depth,
        "context_dim": context_dim,
        "use_spatial_transformer": True,
        "legacy": False,
        "use_linear_in_transformer": linear,
        "adm_in_channels": adm_in_channels,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        **({"num_classes": "sequential"} if adm_in_channels is not None else {}),
    }
