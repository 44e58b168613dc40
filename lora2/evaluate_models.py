"""The evaluation models (DINO ViT-S/16, CLIP ViT-B/32): checked and loaded from local folders only.

Why local folders only: ComfyUI machines are often offline or firewalled, and a metric that silently
downloads 600 MB at run time (or, worse, a different revision of the model than last week) gives
numbers nobody can compare. So the folders are in Hugging Face format, loaded through ``transformers``
with ``local_files_only=True`` passed to every ``from_pretrained`` call (nothing global is set), and a
folder that is missing or incomplete is a :class:`LoRA2Error` that names it and says which repository
to download into it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import LoRA2Error

WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
EVAL_MODELS_DIR = "lora2_eval"
"""The models sub-folder the node looks in (``ComfyUI/models/lora2_eval``)."""


@dataclass(frozen=True)
class ModelSpec:
    """What one evaluation model is and what its folder must hold."""

    label: str
    repo: str
    """The Hugging Face repository the DreamBooth protocol's model comes from."""
    folder_name: str
    """Default folder name under ``models/lora2_eval``."""
    model_type: str
    """``model_type`` in its ``config.json`` (the architecture the loader builds)."""
    needs_tokenizer: bool

    def expected_files(self) -> str:
        tokenizer = ", tokenizer.json or vocab.json + merges.txt" if self.needs_tokenizer else ""
        return f"config.json, model.safetensors or pytorch_model.bin, preprocessor_config.json{tokenizer}"


DINO = ModelSpec("DINO", "facebook/dino-vits16", "dino-vits16", "vit", needs_tokenizer=False)
CLIP = ModelSpec("CLIP", "openai/clip-vit-base-patch32", "clip-vit-b32", "clip", needs_tokenizer=True)


def resolve_model_folder(text: str, root: Path, spec: ModelSpec) -> Path:
    """A node's model-folder field: empty means ``root/<default name>``, a relative name is under ``root``,
    an absolute path is used as it is."""
    text = text.strip()
    given = Path(text).expanduser() if text else Path(spec.folder_name)
    return given if given.is_absolute() else Path(root) / given


def missing_files(folder: Path, spec: ModelSpec) -> list[str]:
    """The files (or alternatives, joined by ``or``) that ``folder`` lacks to load ``spec``."""
    names = {path.name for path in folder.iterdir()} if folder.is_dir() else set()
    wanted = [("config.json",), WEIGHT_FILES, PROCESSOR_FILES]
    missing = [" or ".join(options) for options in wanted if not names & set(options)]
    if spec.needs_tokenizer and "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        missing.append("tokenizer.json or vocab.json + merges.txt")
    return missing


def folder_error(folder: Path, spec: ModelSpec, problem: str) -> LoRA2Error:
    """The one message for every way a model folder can be unusable: what is wrong and what to put there."""
    return LoRA2Error(
        f"{spec.label} model folder '{folder}' {problem}; put the Hugging Face model {spec.repo} there "
        f"({spec.expected_files()}), e.g. on a machine with internet: "
        f"hf download {spec.repo} --local-dir '{folder}' (then copy the folder here)"
    )


def check_model_folder(folder: Path, spec: ModelSpec) -> Path:
    """``folder`` if it holds a loadable ``spec`` model, else a :class:`LoRA2Error` saying what to do."""
    folder = Path(folder)
    if not folder.is_dir():
        raise folder_error(folder, spec, "does not exist")
    missing = missing_files(folder, spec)
    if missing:
        raise folder_error(folder, spec, f"is incomplete (missing {'; '.join(missing)})")
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise folder_error(folder, spec, f"has an unreadable config.json ({exc})") from exc
    if model_type != spec.model_type:
        raise folder_error(folder, spec, f"holds a '{model_type}' model, not '{spec.model_type}'")
    return folder


def _loading(folder: Path, spec: ModelSpec, load):
    """Run ``load()``; a failure inside ``transformers`` becomes a :class:`LoRA2Error` naming the folder."""
    try:
        return load()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise folder_error(folder, spec, f"could not be loaded ({type(exc).__name__}: {exc})") from exc


def load_dino(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(ViTModel, image processor)`` from ``folder``, the model in eval mode on ``device``.

    No pooling layer: DINO's embedding is the CLS token of the last hidden state (after the final
    LayerNorm), which is what DINO's own ``model(x)`` returns; ``facebook/dino-vits16`` ships no pooler.
    """
    from transformers import AutoImageProcessor, ViTModel

    folder = check_model_folder(folder, DINO)
    model = _loading(
        folder, DINO, lambda: ViTModel.from_pretrained(folder, add_pooling_layer=False, local_files_only=True)
    )
    processor = _loading(folder, DINO, lambda: AutoImageProcessor.from_pretrained(folder, local_files_only=True))
    return model.to(device=device, dtype=dtype).eval(), processor


def load_clip(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` from ``folder``, the model in eval mode on ``device``."""
    from transformers import CLIPModel, CLIPProcessor

    folder = check_model_folder(folder, CLIP)
    model = _loading(folder, CLIP, lambda: CLIPModel.from_pretrained(folder, local_files_only=True))
    processor = _loading(folder, CLIP, lambda: CLIPProcessor.from_pretrained(folder, local_files_only=True))
    return model.to(device=device, dtype=dtype).eval(), processor
