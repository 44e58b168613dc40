"""Import-only stand-in for ``torchaudio``, for ComfyUI 0.33.0.

Like torchvision, PyPI's torchaudio wheels are built against CUDA torch and do not load beside the pinned
CPU torch. ComfyUI 0.33.0 imports torchaudio at module level in its audio model families and audio nodes
(``comfy/sd.py`` pulls in the LTX audio VAE), none of which the tests build: importing must work, any real
use fails with a clear NotImplementedError.
"""

from __future__ import annotations

from _import_stub import module_getattr

from . import functional, transforms

__version__ = "0.0.0+stub"
__getattr__ = module_getattr(__name__)
__all__ = ["functional", "transforms"]
