"""LoRA² Rank Heatmap and LoRA² Prune: see where rank went, cut an adapter to a budget."""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from ..lora2.errors import LoRA2Error
from ..lora2.heatmap import build_rank_table, render_heatmap
from ..lora2.lora_file import load_adapter
from ..lora2.prune import PRUNE_POLICIES, prune
from .comfy import files, io, ui
from .types import CATEGORY, Adapter, History

log = logging.getLogger("LoRA²")

NO_FILE = "none"


def _lora_choices() -> list[str]:
    return [NO_FILE, *files.lora_names()]


def _adapter_from(adapter, lora_name: str):
    """The connected adapter, else the chosen file from models/loras."""
    if adapter is not None:
        return adapter
    if lora_name and lora_name != NO_FILE:
        return load_adapter(files.lora_file(lora_name), with_resume=False)
    raise LoRA2Error("connect an adapter or choose a LoRA file (lora_name) to inspect")


def _image_tensor(image) -> torch.Tensor:
    """PIL RGB -> ComfyUI IMAGE ``[1, H, W, 3]`` float in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


class LoRA2Heatmap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2Heatmap",
            search_aliases=["lora rank heatmap", "rank map", "inspect lora"],
            display_name="LoRA² Rank Heatmap",
            category=CATEGORY,
            description="Draws the rank of every adapted layer: one row per block in model order, one column "
            "per component type, with totals and (when connected) the rank and loss history. Works on any LoRA "
            "file too (ranks from the tensor shapes; effective ranks at 90 %/99 % singular-value energy).",
            is_output_node=True,
            inputs=[
                Adapter.Input("adapter", optional=True, tooltip="A LoRA² adapter (trained, loaded or pruned)."),
                io.Combo.Input(
                    "lora_name",
                    options=_lora_choices(),
                    default=NO_FILE,
                    tooltip="Or any LoRA file from models/loras (used when no adapter is connected).",
                ),
                History.Input("history", optional=True, tooltip="Adds a panel with total rank and loss per step."),
                io.Int.Input("width", default=1024, min=512, max=4096, step=64, tooltip="Image width in pixels."),
                io.String.Input("title", default="", tooltip="Title line (empty: the model family and file)."),
            ],
            outputs=[
                io.Image.Output("image", display_name="heatmap", tooltip="The heatmap as an image."),
                io.String.Output("table", display_name="table", tooltip="The same table as aligned text."),
                io.String.Output(
                    "json", display_name="json", tooltip="The same table as JSON (ranks, energy ranks, totals)."
                ),
            ],
        )

    @classmethod
    def execute(cls, lora_name: str, width: int, title: str, adapter=None, history=None) -> io.NodeOutput:
        chosen = _adapter_from(adapter, lora_name)
        table = build_rank_table(chosen)
        heading = title or f"LoRA² ranks - {chosen.base_model}" + (
            f" - {lora_name}" if adapter is None and lora_name != NO_FILE else ""
        )
        image = _image_tensor(render_heatmap(table, history or chosen.history, heading, width))
        text = table.to_text()
        return io.NodeOutput(image, text, json.dumps(table.to_dict()), ui=ui.PreviewImage(image, cls=cls))


class LoRA2Prune(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2Prune",
            search_aliases=["prune lora", "shrink lora", "compress lora", "lora rank reduction"],
            display_name="LoRA² Prune",
            category=CATEGORY,
            description="Shrinks an adapter: keep the positions that carry a share of each component's importance, "
            "fit a global size budget (allocated across components by singular-value energy per parameter), or "
            "keep a share of singular-value energy (any LoRA). Every kept component is re-factored with an SVD.",
            inputs=[
                Adapter.Input("adapter", optional=True, tooltip="The adapter to prune."),
                io.Combo.Input(
                    "lora_name", options=_lora_choices(), default=NO_FILE, tooltip="Or a LoRA file from models/loras."
                ),
                io.Combo.Input(
                    "policy",
                    options=list(PRUNE_POLICIES),
                    default="importance mass",
                    tooltip="; ".join(f"{p.name}: value = {p.value_means}" for p in PRUNE_POLICIES.values()) + ".",
                ),
                io.Float.Input(
                    "value", default=0.9, min=0.0, max=1e12, step=0.01, tooltip="The policy's setting (see policy)."
                ),
            ],
            outputs=[
                Adapter.Output("pruned", display_name="pruned adapter", tooltip="The pruned adapter."),
                io.String.Output(
                    "report", display_name="report", tooltip="Per component: rank before/after and relative ‖ΔW‖ error."
                ),
            ],
        )

    @classmethod
    def execute(cls, lora_name: str, policy: str, value: float, adapter=None) -> io.NodeOutput:
        chosen = _adapter_from(adapter, lora_name)
        pruned, report = prune(chosen, policy, value)
        text = report.to_table()
        log.info("LoRA² prune (%s %g):\n%s", policy, value, text)
        return io.NodeOutput(pruned, text, ui={"text": [text]})
