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
