"""Run ComfyUI's ``main.py`` (cwd = the ComfyUI tree) with the torchvision stub visible only at start-up.

Usage: ``cd .host/ComfyUI && python <repo>/devtools/comfy_main.py --cpu --listen ... ``; every
argument goes to ``main.py`` unchanged. Equivalent to ``PYTHONPATH=devtools/stubs python main.py``
except that once ``nodes.init_extra_nodes`` (stock extras and custom nodes) has finished, the stub is
removed again (``layout.hide_torchvision_stub``): otherwise ``transformers`` believes torchvision is
installed and its image processors fail to import inside a running prompt.

Standalone on purpose (run as a script, no package imports): it must not put ``tests/support`` on
sys.path ahead of the ComfyUI tree.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys
from types import ModuleType
from typing import Any


def _load_layout() -> ModuleType:
    """``layout.py`` by file path: it imports only the standard library, and loading it this way puts
    nothing on sys.path."""
    spec = importlib.util.spec_from_file_location(
        "_lora2_host_layout", os.path.join(os.path.dirname(os.path.abspath(__file__)), "layout.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


layout = _load_layout()
STUBS_DIR = str(layout.STUBS_DIR)
hide_torchvision_stub = layout.hide_torchvision_stub


class _WrapNodesInit(importlib.abc.MetaPathFinder):
    """Finds ComfyUI's top-level ``nodes`` module as usual and wraps its ``init_extra_nodes``."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != "nodes":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_wrap(module: ModuleType) -> None:
            exec_module(module)
            init_extra_nodes = module.init_extra_nodes

            async def init_then_hide(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await init_extra_nodes(*args, **kwargs)
                finally:
                    hide_torchvision_stub()

            module.init_extra_nodes = init_then_hide

        loader.exec_module = exec_and_wrap  # type: ignore[method-assign]
        return spec


def main() -> None:
    comfy_dir = os.getcwd()
    main_py = os.path.join(comfy_dir, "main.py")
    if not os.path.isfile(main_py):
        raise SystemExit(f"run from the ComfyUI tree: no main.py in {comfy_dir}")
    # As `python main.py` would have it: the tree first (not this file's folder), the stub at the end.
    sys.path[0] = comfy_dir
    sys.path.append(STUBS_DIR)
    sys.meta_path.insert(0, _WrapNodesInit())
    sys.argv[0] = main_py
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main()
