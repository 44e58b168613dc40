"""LoRA² Apply: put an adapter on a MODEL as ordinary LoRA patches."""

from __future__ import annotations

from .comfy import io, patches
from .types import CATEGORY, Adapter


class LoRA2Apply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2Apply",
            search_aliases=["apply lora", "lora loader", "lora strength"],
            display_name="LoRA² Apply",
            category=CATEGORY,
            description="Applies a LoRA² adapter to a model. The factors are merged into the weights when the "
            "model loads, so sampling costs nothing extra.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to adapt."),
                Adapter.Input("adapter", tooltip="A trained (or loaded, or pruned) LoRA² adapter."),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-4.0,
                    max=4.0,
                    step=0.05,
                    tooltip="How strongly the adapter changes the model (1 = as trained, 0 = off).",
                ),
            ],
            outputs=[
                io.Model.Output("adapted_model", display_name="model", tooltip="The model with the adapter applied.")
            ],
        )

    @classmethod
    def execute(cls, model, adapter, strength: float) -> io.NodeOutput:
        return io.NodeOutput(patches.apply_adapter(model, adapter, strength))
