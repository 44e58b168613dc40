"""Import-only stand-in for ``torchvision`` in tests.

PyPI's torchvision wheels link CUDA builds of torch and fail on import beside the pinned CPU torch
(``operator torchvision::nms does not exist``). ComfyUI 0.3.75 imports torchvision at module level only
for model families our tests never build (Stable Cascade, Cosmos, ACE audio), so importing must work
while any real use fails with a clear NotImplementedError. Tests put ``devtools/stubs`` on the
path; it is never installed.
"""

from __future__ import annotations

from _import_stub import module_getattr

from . import models, ops, transforms

__version__ = "0.0.0+stub"
__getattr__ = module_getattr(__name__)
__all__ = ["models", "ops", "transforms"]
