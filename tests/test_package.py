"""The pack's root: importable without ComfyUI, registering nothing until nodes exist."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


def test_root_imports_without_comfyui() -> None:
    code = (
        "import sys, comfyui_lora2, comfyui_lora2.lora2;"
        "assert comfyui_lora2.NODE_CLASS_MAPPINGS == {};"
        "assert not any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules);"
        "assert 'nodes' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_core_never_imports_comfyui() -> None:
    import comfyui_lora2.lora2 as core

    host_modules = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution"}
    for path in Path(core.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not roots & host_modules, f"{path.name} imports {roots & host_modules}"
