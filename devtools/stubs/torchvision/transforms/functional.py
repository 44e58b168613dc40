"""``torchvision.transforms.functional`` stand-in: every attribute is a callable raising NotImplementedError."""

from __future__ import annotations

from _import_stub import module_getattr

__getattr__ = module_getattr(__name__)
