"""ComfyUI nodes over ``lora2``: thin V3 declarations; everything that speaks ComfyUI is in ``nodes/comfy/``."""

from __future__ import annotations

from .apply_node import LoRA2Apply
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

NODE_CLASS_MAPPINGS = {node.define_schema().node_id: node for node in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node.define_schema().node_id: node.define_schema().display_name for node in NODES}
