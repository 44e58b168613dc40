"""LoRA² Save / LoRA² Load: adapters to and from models/loras, safetensors only."""

from __future__ import annotations

import logging

import torch

from ..lora2.lora_file import load_adapter, save_adapter
from ..lora2.lora_keys import default_key
from .comfy import files, io, patches
from .types import CATEGORY, Adapter

log = logging.getLogger("LoRA²")

PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

files.cleanup_orphans()  # once, while ComfyUI loads the pack: what a write killed mid-way left behind


class LoRA2Save(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2Save",
            search_aliases=["save lora", "export lora", "write safetensors"],
            display_name="LoRA² Save",
            category=CATEGORY,
            description="Saves an adapter to models/loras as a standard LoRA file that any LoRA loader reads "
            "(and, optionally, the training state to resume from).",
            is_output_node=True,
            inputs=[
                Adapter.Input("adapter", tooltip="The adapter to save."),
                io.String.Input(
                    "filename",
                    default="lora2/my_subject",
                    tooltip="Name under models/loras (sub-folders allowed); unsafe characters are replaced.",
                ),
                io.Boolean.Input(
                    "save_training_state",
                    default=True,
                    tooltip="Also write <name>.lora2state (optimizer and rank state) so LoRA² Train can resume.",
                ),
                io.Combo.Input(
                    "precision",
                    options=list(PRECISIONS),
                    default="float16",
                    tooltip="Number format of the factors: float16 (half the size, what most LoRAs use), "
                    "bfloat16, or float32 (exact).",
                ),
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="The model it was trained on: used to write diffusers-style key names for UNets "
                    "(keys of a loaded or trained adapter are kept as they were).",
                ),
                io.Boolean.Input(
                    "overwrite",
                    default=False,
                    optional=True,
                    tooltip="Replace an existing file of this name (and its .lora2state). Off: an existing name "
                    "gets a number (_2, _3, ...) and the output says so.",
                ),
            ],
            outputs=[io.String.Output("path", display_name="path", tooltip="Where the file was written.")],
        )

    @classmethod
    def execute(
        cls,
        adapter,
        filename: str,
        save_training_state: bool,
        precision: str = "float16",
        model=None,
        overwrite: bool = False,
    ) -> io.NodeOutput:
        path, note = files.save_path(filename, overwrite)
        to_save = adapter if save_training_state else _without_resume(adapter)
        key_for = patches.kohya_key_for(model) if model is not None else default_key
        save_adapter(path, to_save, key_for, PRECISIONS[precision])
        log.info("LoRA² saved %s (%d components, %.2f MB)", path, len(adapter.components), adapter.megabytes())
        if note:
            log.warning("LoRA² Save: %s", note)
        return io.NodeOutput(str(path), ui={"text": [str(path) if note is None else f"{path}\n{note}"]})


def _without_resume(adapter):
    from dataclasses import replace

    return replace(adapter, resume=None)


class LoRA2Load(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2Load",
            search_aliases=["load lora file", "open lora", "read lora"],
            display_name="LoRA² Load",
            category=CATEGORY,
            description="Loads a LoRA file from models/loras as a LoRA² adapter (LoRA² files keep their ranks, "
            "ν and history; other LoRAs load with the ranks of their tensors).",
            inputs=[
                io.Combo.Input(
                    "lora_name",
                    options=files.lora_names(),
                    tooltip="A .safetensors file in models/loras.",
                ),
            ],
            outputs=[Adapter.Output("adapter", display_name="adapter", tooltip="The loaded adapter.")],
        )

    @classmethod
    def execute(cls, lora_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_adapter(files.lora_file(lora_name)))
