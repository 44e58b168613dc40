"""The pack's root: importable without ComfyUI, registering nothing until nodes exist."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from comfyui_lora2.devtools.import_rules import host_imports


def test_root_imports_without_comfyui() -> None:
    code = (
        "import sys, comfyui_lora2, comfyui_lora2.lora2;"
        "assert not hasattr(comfyui_lora2, 'comfy_entrypoint');"
        "assert not hasattr(comfyui_lora2, 'NODE_CLASS_MAPPINGS');"
        "assert not any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules);"
        "assert 'nodes' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_core_never_imports_comfyui() -> None:
    import comfyui_lora2.lora2 as core

    for path in Path(core.__file__).parent.glob("*.py"):
        assert not host_imports(path), f"{path.name} imports {host_imports(path)}"


PRODUCT = ("__init__.py", "lora2", "nodes", "cli")
"""The pack's product code; devtools/, tests/, bench/ and demo/ are harness and may boot a host."""


def test_only_the_comfyui_layer_imports_comfyui() -> None:
    """nodes/comfy/ is the one place that speaks ComfyUI; node declarations take ``io``/``ui`` from it."""
    import comfyui_lora2

    pack = Path(comfyui_lora2.__file__).parent
    layer = pack / "nodes" / "comfy"
    files = [
        path
        for entry in PRODUCT
        for path in ([pack / entry] if entry.endswith(".py") else (pack / entry).rglob("*.py"))
    ]
    assert len(files) > 30
    offenders = {
        str(path.relative_to(pack)): host_imports(path)
        for path in files
        if not path.is_relative_to(layer) and host_imports(path)
    }
    assert offenders == {}, f"only nodes/comfy/ may import ComfyUI; move these imports there: {offenders}"
    assert host_imports(layer / "__init__.py") == {"comfy_api"}  # the schema API, re-exported as io/ui


def test_the_heatmap_reads_spectra_without_the_pruning_module() -> None:
    """Drawing a heatmap needs singular values (lora2/spectrum.py), not the pruning policies."""
    import comfyui_lora2.lora2 as core

    for path in Path(core.__file__).parent.glob("heatmap*.py"):
        relative = {
            node.module
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.level
        }
        assert "prune" not in relative, f"{path.name} imports lora2.prune"
