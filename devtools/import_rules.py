"""What a Python file imports, read from its AST: the guards on who may import ComfyUI, ``tests/`` or devtools.

Shared by the tests that keep the layers apart (``tests/test_package.py``, ``tests/test_devtools.py`` and
the CLI's own guard), so a rule is spelled once. Reading the AST, not importing, means a file is checked
without running it and without a ComfyUI install.
"""

from __future__ import annotations

import ast
from pathlib import Path

HOST_MODULES = {
    "comfy",
    "comfy_api",
    "comfy_extras",
    "comfy_execution",
    "folder_paths",
    "latent_preview",
    "node_helpers",
    "nodes",
    "server",
    "execution",
    "app",
}
"""ComfyUI's top-level modules (``nodes`` here is ComfyUI's, never ours: ours is imported relatively)."""


def absolute_imports(path: Path) -> set[str]:
    """Every module ``path`` imports by absolute name, in full (``a.b.c``), at any depth of the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module or "")
    return found


def host_imports(path: Path) -> set[str]:
    """The ComfyUI modules ``path`` imports (absolute imports only; relative ones are the pack's own)."""
    return {name.split(".")[0] for name in absolute_imports(path)} & HOST_MODULES


def pack_imports(path: Path, package: str) -> set[str]:
    """The pack's modules ``path`` imports, relative imports resolved against ``package`` (its own dotted
    package, e.g. ``comfyui_lora2.nodes``), absolute ones kept when they start with the pack's name."""
    root = package.split(".")[0]
    found = {name for name in absolute_imports(path) if name == root or name.startswith(root + ".")}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
            found.add(prefix)
            found |= {f"{prefix}.{alias.name}" for alias in node.names}
    return found
