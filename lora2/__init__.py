"""LoRA²: LoRA whose every component learns its own rank (pure PyTorch; never imports ComfyUI).

Public API (the package is ``comfyui_lora2.lora2`` when the pack is installed for development)::

    handle = attach(model, LoRA2Config(targets="attn", init_rank=4, max_rank=64))

See ``attach.py`` for the training-step contract and ``rank.py`` for how a rank is decided.
"""

from .attach import LoRA2Handle, attach
from .config import LoRA2Config
from .errors import LoRA2Error
from .targets import PRESETS, select_targets

__all__ = ["PRESETS", "LoRA2Config", "LoRA2Error", "LoRA2Handle", "attach", "select_targets"]
