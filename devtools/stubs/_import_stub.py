"""Shared piece of the import-only stand-ins for torchvision and torchaudio (see their ``__init__.py`` for why).

A top-level module of ``devtools/stubs`` (on the path only while ComfyUI starts), so both stubs share it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn


def missing(qualified_name: str) -> Callable[..., NoReturn]:
    """Return a callable that fails loudly, so a test that really needs torchvision says so."""

    def _unavailable(*args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(
            f"{qualified_name} is not available: tests run with an import-only stub of "
            f"{qualified_name.split('.')[0]} (PyPI's wheels link CUDA torch and fail beside the CPU torch)"
        )

    _unavailable.__name__ = qualified_name.rsplit(".", 1)[-1]
    _unavailable.__qualname__ = qualified_name
    return _unavailable


def module_getattr(module_name: str) -> Callable[[str], Callable[..., NoReturn]]:
    """Build a module-level ``__getattr__`` (PEP 562) that hands out failing callables."""

    def __getattr__(name: str) -> Callable[..., NoReturn]:
        if name.startswith("__") and name.endswith("__"):
            # Dunder look-ups (``__path__``, ``__file__``, ...) must stay AttributeErrors, or the import
            # system and tools such as pytest's collector mistake the stub for something it is not.
            raise AttributeError(name)
        return missing(f"{module_name}.{name}")

    return __getattr__
