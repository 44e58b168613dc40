"""The ComfyUI layer: the only code in the pack that imports ComfyUI (``comfy``, ``comfy_api``,
``folder_paths``, ...); ``tests/test_package.py`` fails when anything else does.

It turns ComfyUI's objects into the plain callables and paths ``lora2`` takes, one job per module:

* :mod:`.model` — a MODEL's ``BaseModel``, family, denoiser (``extra_conds`` + ``apply_model``), noise rule
  (from its ``model_sampling``) and latent space; the device ComfyUI computes on.
* :mod:`.training` — a MODEL plus a dataset as one :class:`lora2.run.TrainingTarget`.
* :mod:`.encoders` — VAE, CLIP and CONDITIONING as encoders and tensors by name.
* :mod:`.patches` — an adapter as ModelPatcher LoRA patches; ComfyUI's LoRA key maps and kohya names.
* :mod:`.files` — models/loras, dataset folders, caches, resume files (``folder_paths``).
* :mod:`.progress` — the progress bar and Cancel.
* :mod:`.sampling` — validation samples drawn with ComfyUI's samplers while LoRA² Train runs.

Node declarations need ComfyUI's V3 schema API too; they take it from here (``from .comfy import io,
ui``) rather than from ``comfy_api`` directly, so that which ComfyUI API version the pack declares
against is decided in this one place.
"""

from __future__ import annotations

from comfy_api.latest import io, ui

__all__ = ["io", "ui"]
