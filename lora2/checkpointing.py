"""Gradient checkpointing for any model's blocks, switched on for the length of a ``with``.

Training a frozen model still stores every block's activations for the backward pass; recomputing
them instead trades ~30 % more compute for far less memory. The model's code is not touched: each
block's ``forward`` is wrapped for the duration of the context and restored after, so the same model
object can be sampled from normally afterwards. LoRA² hooks inside a block run again in the
recomputation, which is exact because they are deterministic.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_BLOCK_PATTERN = (
    r"(TransformerBlock|ResBlock|ResnetBlock2D|DoubleStreamBlock|SingleStreamBlock|JointBlock|DismantledBlock)$"
)
"""Class names of the repeated blocks of the UNets and DiTs ComfyUI runs (and diffusers' blocks)."""


def find_blocks(model: nn.Module, class_pattern: str = DEFAULT_BLOCK_PATTERN) -> list[nn.Module]:
    """The modules to checkpoint: each block, taken with what wraps it alone, and the glue between blocks.

    A block is a module whose class name matches ``class_pattern`` (nested matches are not looked at).
    Walking down from ``model``, a child is taken whole when it holds at most one block: a transformer
    block with the norm and projections around it (ComfyUI's ``SpatialTransformer`` of depth 1,
    diffusers' ``Transformer2DModel``), a ResBlock with its upsampler, an upsampler or the output head on
    their own. Why not the blocks alone: the glue's activations (group norms, 1×1 projections, an
    upsampler's interpolated input) were then kept for the whole backward; on the SD1.x-width model
    they held more than the blocks' saved inputs (bench/NOTES.md §15), and ComfyUI's own trainer, which
    checkpoints the highest modules, held less memory than LoRA². Why not the highest modules either: a
    ``SpatialTransformer`` of depth 10 (SDXL) recomputed whole would hold ten blocks' activations at once.
    A bare layer between blocks (a single convolution or norm) is left alone: checkpointed, it would
    still save its input, and cost a recomputation.
    """
    pattern = re.compile(class_pattern)

    @functools.cache  # each module's count is asked once per ancestor the walk goes through
    def count(module: nn.Module) -> int:
        if pattern.search(type(module).__name__):
            return 1
        return sum(count(child) for child in module.children())

    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            held = count(child)
            listing = isinstance(child, (nn.ModuleList, nn.ModuleDict))  # never called itself: look inside
            if not listing and held == 1:  # a block, or what wraps one block alone
                blocks.append(child)
            elif not listing and held == 0 and any(True for _ in child.children()):
                blocks.append(child)  # glue of more than one layer (an upsampler, the output head)
            elif held > 0 or listing:
                visit(child)

    visit(model)
    return blocks


@contextmanager
def checkpointed(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Run ``blocks`` under non-reentrant activation checkpointing inside this context."""
    originals = []
    for block in blocks:
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            if not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        originals.append((block, "forward" in block.__dict__, original))
        block.forward = forward
    try:
        yield
    finally:
        for block, had_instance_attr, original in originals:
            if had_instance_attr:
                block.forward = original
            else:
                del block.forward
