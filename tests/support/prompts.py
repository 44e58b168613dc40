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
