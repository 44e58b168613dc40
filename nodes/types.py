"""The pack's own socket types and its menu category."""

from __future__ import annotations

from .comfy import io

CATEGORY = "LoRA²"

Dataset = io.Custom("LORA2_DATASET")
"""A :class:`lora2.dataset.CachedDataset`: encoded latents and text embeddings, ready to train on."""
Adapter = io.Custom("LORA2_ADAPTER")
"""A :class:`lora2.adapter.Adapter`: per-component LoRA factors plus what LoRA² knows about them."""
History = io.Custom("LORA2_HISTORY")
"""A dict: ``components``, and per step ``loss`` and every component's rank (``ranks``)."""
Validation = io.Custom("LORA2_VALIDATION")
"""A ``nodes.comfy.sampling.ValidationPlan``: encoded prompts, sampler settings and a VAE (LoRA² Validation)."""
