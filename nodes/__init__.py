"""ComfyUI nodes over ``lora2``: thin V3 declarations; everything that speaks ComfyUI is in ``nodes/comfy/``."""

from __future__ import annotations

from .apply_node import LoRA2Apply
from .comfy import ComfyExtension, io
from .dataset_node import LoRA2Dataset
from .evaluate_node import LoRA2Evaluate
from .file_nodes import LoRA2Load, LoRA2Save
from .inspect_nodes import LoRA2Heatmap, LoRA2Prune
from .train_node import LoRA2Train
from .validation_node import LoRA2SamplePrompts, LoRA2Validation

NODES = [
    LoRA2Dataset,
    LoRA2Validation,
    LoRA2Train,
    LoRA2Heatmap,
    LoRA2Prune,
    LoRA2Apply,
    LoRA2Save,
    LoRA2Load,
    LoRA2SamplePrompts,
    LoRA2Evaluate,
]


class LoRA2Extension(ComfyExtension):
    """The pack as ComfyUI's V3 extension: its node list (ids and display names come from each schema)."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> LoRA2Extension:
    """What ComfyUI calls when it loads the pack (0.3.75 and 0.33.0 both read ``comfy_entrypoint``)."""
    return LoRA2Extension()
