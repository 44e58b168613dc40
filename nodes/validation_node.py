"""LoRA² Validation: prompts and sampler settings that LoRA² Train samples while it trains; LoRA² Sample
Prompts: the same prompts sampled once with any MODEL (e.g. the trained one, for LoRA² Evaluate).

A node of its own, like LoRA² Dataset, because the prompts need encoding (a CLIP, or a CONDITIONING
from any text encoder) and the samples need decoding (a VAE) before training starts; the Train node
then takes one optional ``validation`` input instead of ten more widgets.
"""

from __future__ import annotations

from ..lora2.errors import LoRA2Error
from ..lora2.validation import ValidationConfig, parse_prompts
from .comfy import io
from .comfy.progress import progress_callback
from .comfy.sampling import (
    ValidationPlan,
    encode_prompts,
    images_tensor,
    make_sampler,
    sampler_names,
    scheduler_names,
    split_conditioning,
)
from .types import CATEGORY, Validation

DEFAULTS = ValidationConfig()
"""Every widget's default comes from the config dataclass: one source of truth."""


def _schema_inputs() -> list:
    return [
        io.String.Input(
            "prompts",
            default="a photo of sks dog\na photo of sks dog on the beach",
            multiline=True,
            tooltip="Validation prompts, one per line (encoded with the CLIP below). Use the trigger word.",
        ),
        io.Int.Input(
            "validate_every",
            default=DEFAULTS.every,
            min=1,
            max=100_000,
            tooltip="Sample every this many training steps; always also at step 0 and at the last step.",
        ),
        io.Int.Input(
            "seed",
            default=DEFAULTS.seed,
            min=0,
            max=2**31 - 1,
            tooltip="Noise seed of every validation image: the same at each step, so grids differ only by training.",
        ),
        io.Int.Input("steps", default=DEFAULTS.steps, min=1, max=200, tooltip="Sampler steps per image."),
        io.Int.Input("width", default=DEFAULTS.width, min=16, max=4096, step=8, tooltip="Image width in pixels."),
        io.Int.Input("height", default=DEFAULTS.height, min=16, max=4096, step=8, tooltip="Image height in pixels."),
        io.Float.Input(
            "cfg",
            default=DEFAULTS.cfg,
            min=1.0,
            max=30.0,
            step=0.1,
            round=0.01,
            tooltip="Guidance scale against the empty prompt (needs the CLIP input; with CONDITIONING only: 1).",
        ),
        io.Combo.Input("sampler_name", options=sampler_names(), default=DEFAULTS.sampler, tooltip="Sampler."),
        io.Combo.Input("scheduler", options=scheduler_names(), default=DEFAULTS.scheduler, tooltip="Scheduler."),
        io.String.Input(
            "run_name",
            default=DEFAULTS.run_name,
            tooltip="Grids are written to output/lora2/<run_name>/step_NNNNNN.png (a numbered folder when that "
            "one holds an earlier run's grids).",
        ),
        io.Clip.Input("clip", optional=True, tooltip="Encodes the prompts (and the empty negative prompt)."),
        io.Conditioning.Input(
            "conditioning",
            optional=True,
            tooltip="Ready conditioning instead of text prompts: one validation image per entry and batch row.",
        ),
        io.Vae.Input(
            "vae",
            optional=True,
            tooltip="Decodes the samples. Without it the grid shows ComfyUI's rough latent preview colours.",
        ),
    ]


class LoRA2Validation(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2Validation",
            search_aliases=["validation prompts", "samples while training", "training preview"],
            display_name="LoRA² Validation",
            category=CATEGORY,
            description="Validation samples for LoRA² Train: at step 0, every validate_every steps and at the end, "
            "each prompt is sampled with the adapter as it is then, shown on the Train node and saved as a grid "
            "in output/lora2/<run_name>/. Training is not changed by it.",
            inputs=_schema_inputs(),
            outputs=[
                Validation.Output(
                    "validation", display_name="validation", tooltip="Connect to LoRA² Train's validation input."
                )
            ],
        )

    @classmethod
    def execute(
        cls,
        prompts: str,
        validate_every: int,
        seed: int,
        steps: int,
        width: int,
        height: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        run_name: str,
        clip=None,
        conditioning=None,
        vae=None,
    ) -> io.NodeOutput:
        config = ValidationConfig(
            every=validate_every,
            seed=seed,
            steps=steps,
            width=width,
            height=height,
            cfg=cfg,
            sampler=sampler_name,
            scheduler=scheduler,
            run_name=run_name,
        )
        return io.NodeOutput(_plan(config, prompts, clip, conditioning, vae))


def _plan(config: ValidationConfig, text: str, clip, conditioning, vae) -> ValidationPlan:
    """Encoded prompts: the CONDITIONING input when connected (labelled by the prompt lines if any), else
    the prompt lines through the CLIP."""
    prompts = parse_prompts(text)
    if conditioning is not None:
        positives = split_conditioning(conditioning)
        labels = [prompts[i] if i < len(prompts) else f"conditioning {i + 1}" for i in range(len(positives))]
        negative = encode_prompts(clip, [])[1] if clip is not None else None
        return ValidationPlan(config, labels, positives, negative, vae)
    if clip is None:
        raise LoRA2Error("LoRA² Validation needs a CLIP to encode its prompts, or a CONDITIONING input")
    if not prompts:
        raise LoRA2Error("LoRA² Validation has no prompts; write one prompt per line")
    positives, negative = encode_prompts(clip, prompts)
    return ValidationPlan(config, prompts, positives, negative, vae)


class LoRA2SamplePrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2SamplePrompts",
            search_aliases=["sample prompts", "prompt grid", "compare prompts"],
            display_name="LoRA² Sample Prompts",
            category=CATEGORY,
            description="Samples every prompt of a LoRA² Validation node once with this MODEL (same sampler, seed and "
            "size), e.g. the 25 DreamBooth prompts with the trained model, for LoRA² Evaluate.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample, e.g. LoRA² Train's trained model."),
                Validation.Input("prompts", tooltip="The prompts and sampler settings (a LoRA² Validation node)."),
            ],
            outputs=[
                io.Image.Output("images", display_name="images", tooltip="One image per prompt, in prompt order."),
                io.String.Output(
                    "prompt_text", display_name="prompts", tooltip="The prompts, one per line (for LoRA² Evaluate)."
                ),
            ],
        )

    @classmethod
    def execute(cls, model, prompts: ValidationPlan) -> io.NodeOutput:
        sample = make_sampler(model, prompts, progress_callback(len(prompts.positives)))
        return io.NodeOutput(images_tensor(sample()), "\n".join(prompts.prompts))
