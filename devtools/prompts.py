"""Building blocks of API-format prompts that many tests share."""

from __future__ import annotations

from typing import Any

Link = list  # ``[node id, output index]``


def ksampler(
    model: Link, positive: Link, negative: Link, latent: Link, *, steps: int = 2, seed: int = 0, cfg: float = 1.0
) -> dict[str, Any]:
    """A stock ``KSampler`` node (euler, normal schedule, full denoise)."""
    return {
        "class_type": "KSampler",
        "inputs": {
            "model": model,
            "seed": seed,
            "steps": steps,
            "cfg": cfg,
            "sampler_name": "euler",
            "scheduler": "normal",
            "positive": positive,
            "negative": negative,
            "latent_image": latent,
            "denoise": 1.0,
        },
    }


def lora2_dataset(vae: Link, conditioning: Link, *, folder: str = "subject", **overrides: Any) -> dict[str, Any]:
    """A ``LoRA2Dataset`` node on ready conditioning, at 64 px, no augmentation unless overridden."""
    inputs = {
        "folder": folder,
        "vae": vae,
        "conditioning": conditioning,
        "caption_template": "a photo of {trigger}",
        "trigger": "sks",
        "resolution": 64,
        "bucketing": True,
        "flip": False,
        "random_crop": False,
        "color_jitter": False,
        "variants": 1,
        "seed": 0,
        "cache_on_disk": True,
    }
    inputs.update(overrides)
    return {"class_type": "LoRA2Dataset", "inputs": inputs}


def lora2_train(model: Link, dataset: Link, **overrides: Any) -> dict[str, Any]:
    """A ``LoRA2Train`` node for tiny runs: a few float32 steps that let ranks move; override anything."""
    inputs = {
        "model": model,
        "dataset": dataset,
        "steps": 3,
        "batch_size": 1,
        "learning_rate": 1e-3,
        "rank_learning_rate": 0.05,
        "optimizer": "adamw",
        "init_rank": 4,
        "max_rank": 8,
        "targets": "attn",
        "custom_targets": "",
        "importance_mass": 0.85,
        "prior_strength": 1e-4,
        "seed": 0,
        "training_dtype": "float32",
        "gradient_checkpointing": False,
        "save_every": 0,
        "checkpoint_name": "lora2/checkpoint",
        "resume": "none",
    }
    inputs.update(overrides)
    return {"class_type": "LoRA2Train", "inputs": inputs}


def adapter_object(key: str) -> dict[str, Any]:
    """A ``TestObjectLORA2_ADAPTER`` node: the adapter a test stored with ``tiny_nodes.put_object(key, ...)``."""
    return {"class_type": "TestObjectLORA2_ADAPTER", "inputs": {"key": key}}


def lora2_save(
    adapter: Link,
    filename: str,
    *,
    model: Link | None = None,
    save_training_state: bool = False,
    precision: str = "float32",
    **overrides: Any,
) -> dict[str, Any]:
    """A ``LoRA2Save`` node writing ``adapter`` to ``models/loras/<filename>.safetensors``; with ``model``, the
    file's key names are the ones that model's loaders expect."""
    inputs = {"adapter": adapter, "filename": filename, "save_training_state": save_training_state}
    inputs.update(precision=precision, **({"model": model} if model is not None else {}), **overrides)
    return {"class_type": "LoRA2Save", "inputs": inputs}
