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
against is decided in this one place. That includes schema fields newer than the oldest supported host:
``search_aliases`` (the node search's extra names) exists in ComfyUI 0.33.0's ``io.Schema`` but not in
0.3.75's, so on an older host ``io.Schema`` here is a subclass that accepts and ignores it.
"""

from __future__ import annotations

import dataclasses
import types

from comfy_api.latest import ComfyExtension, ui
from comfy_api.latest import io as _io


def _accepting_search_aliases(schema: type) -> type:
    """``io.Schema`` itself when it knows ``search_aliases``; otherwise a subclass that takes the field."""
    if "search_aliases" in {field.name for field in dataclasses.fields(schema)}:
        return schema

    @dataclasses.dataclass
    class Schema(schema):  # the host ignores the extra field; the node search simply lacks the aliases
        search_aliases: list[str] = dataclasses.field(default_factory=list)

    return Schema


if _accepting_search_aliases(_io.Schema) is _io.Schema:
    io = _io
else:
    io = types.ModuleType(_io.__name__, _io.__doc__)
    io.__dict__.update({name: value for name, value in vars(_io).items() if not name.startswith("__")})
    io.Schema = _accepting_search_aliases(_io.Schema)

__all__ = ["ComfyExtension", "io", "ui"]
