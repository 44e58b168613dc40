"""LoRA² Evaluate: DreamBooth's DINO, CLIP-I and CLIP-T of generated images against the subject's photos."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..lora2.evaluate import EvalModels, evaluate
from ..lora2.evaluate_draw import render_table
from ..lora2.evaluate_models import CLIP, DINO, EVAL_MODELS_DIR, ModelSpec, resolve_model_folder
from .comfy import files, io, model, ui
from .inspect_nodes import _image_tensor
from .types import CATEGORY

log = logging.getLogger("LoRA²")


def eval_models_dir() -> Path:
    """``ComfyUI/models/lora2_eval``, where the default DINO and CLIP folders live."""
    return files.models_subdir(EVAL_MODELS_DIR)


def _model_folder(text: str, spec: ModelSpec) -> Path:
    return resolve_model_folder(text, eval_models_dir(), spec)


def _model_input(name: str, spec: ModelSpec) -> io.String.Input:
    return io.String.Input(
        name,
        default="",
        optional=True,
        tooltip=f"{spec.label} model folder in Hugging Face format (from {spec.repo}). Empty: "
        f"models/{EVAL_MODELS_DIR}/{spec.folder_name}; a name: a folder under models/{EVAL_MODELS_DIR}; "
        "or an absolute path. Never downloaded at run time.",
    )


class LoRA2Evaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2Evaluate",
            search_aliases=["dino score", "clip score", "clip-i", "clip-t", "evaluate lora"],
            display_name="LoRA² Evaluate",
            category=CATEGORY,
            description="Scores generated images as the DreamBooth paper does: DINO and CLIP-I (mean cosine "
            "similarity to every real photo of the subject, ViT-S/16 DINO and CLIP image embeddings) and CLIP-T "
            "(cosine similarity between each image and its prompt). Raw cosines in [-1, 1], per image and mean ± "
            "std, as a table image, text and JSON. The models load from local folders only.",
            is_output_node=True,
            inputs=[
                io.Image.Input("images", tooltip="The generated images to score (e.g. VAE Decode after sampling)."),
                io.String.Input(
                    "real_folder",
                    default="lora2_subject",
                    tooltip="The subject's real photos: a folder under ComfyUI's input (or datasets) directory, found "
                    "by the same rules as LoRA² Dataset (png/jpg/jpeg/webp, sub-folders included).",
                ),
                io.String.Input(
                    "prompts",
                    default="a photo of sks dog",
                    multiline=True,
                    tooltip="The prompt of each generated image, one per line in the images' order, or a single "
                    "line used for all of them (CLIP-T compares each image with its prompt).",
                ),
                _model_input("dino_model", DINO),
                _model_input("clip_model", CLIP),
                io.Int.Input(
                    "batch_size",
                    default=16,
                    min=1,
                    max=512,
                    optional=True,
                    tooltip="Images (or prompts) per model call; lower it if the evaluation runs out of memory.",
                ),
            ],
            outputs=[
                io.Image.Output("image", display_name="table", tooltip="The metrics table as an image."),
                io.String.Output("table", display_name="text", tooltip="The same table as aligned text."),
                io.String.Output(
                    "json", display_name="json", tooltip="Per-image values, mean and std, real photos, model folders."
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        images,
        real_folder: str,
        prompts: str,
        dino_model: str = "",
        clip_model: str = "",
        batch_size: int = 16,
    ) -> io.NodeOutput:
        real = files.dataset_folder(real_folder)  # LoRA² Dataset's folder rules
        device = model.torch_device()
        models = EvalModels.load(_model_folder(dino_model, DINO), _model_folder(clip_model, CLIP), device)
        try:
            result = evaluate(images, real, prompts, models, batch_size=batch_size)
        finally:
            del models
            model.free_memory()
        log.info("LoRA² evaluate: %s\n%s", result.describe(), result.to_text())
        image = _image_tensor(render_table(result))
        text = result.to_text()
        return io.NodeOutput(image, text, json.dumps(result.to_dict()), ui=ui.PreviewImage(image, cls=cls))
