"""The layers of the repository stay apart: product and tooling never reach into ``tests/``, the pack's
runtime never imports ``devtools/``, and no test module imports another (shared helpers live in devtools).

All read from the AST, so a file is judged without running it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from comfyui_lora2.devtools.import_rules import absolute_imports, pack_imports

REPO = Path(__file__).resolve().parents[1]
RUNTIME = ("__init__.py", "lora2", "nodes", "cli")
"""What ComfyUI or a plain-Python user runs; devtools/, bench/, demo/, scripts/ and tests/ are not it."""


def _python_files(*entries: str) -> list[Path]:
    files = []
    for entry in entries:
        path = REPO / entry
        if path.suffix == ".py":
            files.append(path)
        elif path.is_dir():
            files += [p for p in path.rglob("*.py") if "node_modules" not in p.parts]
    return files


def _outside_tests() -> list[Path]:
    skip = {"tests", "node_modules", "build", "out"}
    return [
        path
        for path in REPO.rglob("*.py")
        if not any(
            part.startswith(".") or part in skip or part.endswith(".egg-info") for part in path.relative_to(REPO).parts
        )
    ]


def _test_modules() -> set[str]:
    return {path.stem for path in (REPO / "tests").glob("test_*.py")} | {"conftest"}


def _mentions_tests_folder(path: Path) -> list[str]:
    """String constants naming the tests folder (``"tests"``, ``"tests/..."``), docstrings excepted: how a
    script puts ``tests/`` on sys.path or opens a file there."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and (node.value == "tests" or node.value.startswith("tests/"))
    ]


def test_nothing_outside_tests_imports_from_tests() -> None:
    files = _outside_tests()
    assert len(files) > 50 and any(p.parts[-2] == "devtools" for p in files)
    harness = {"support", "tests", "conftest"} | _test_modules()
    offenders = {}
    for path in files:
        bad = {name for name in absolute_imports(path) if name.split(".")[0] in harness}
        bad |= {f"path {value!r}" for value in _mentions_tests_folder(path)}
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert offenders == {}, f"product and tooling must not use tests/ (move what they need to devtools/): {offenders}"


def test_no_test_module_imports_another() -> None:
    """Helpers shared by tests (random adapters, prompt builders) live in devtools, not in a test module."""
    tests = _test_modules()
    offenders = {
        path.name: sorted(bad)
        for path in (REPO / "tests").rglob("*.py")
        if "node_modules" not in path.parts
        and (bad := {name for name in absolute_imports(path) if name.split(".")[0] in tests})
    }
    assert offenders == {}, f"test modules import other test modules; move the helper to devtools/: {offenders}"


def test_the_runtime_never_imports_devtools() -> None:
    files = _python_files(*RUNTIME)
    assert len(files) > 30
    offenders = {}
    for path in files:
        parts = path.relative_to(REPO).with_suffix("").parts
        package = ".".join(("comfyui_lora2", *parts[:-1]))  # a module's package; __init__ is its own
        bad = {name for name in pack_imports(path, package) if name.startswith("comfyui_lora2.devtools")}
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert offenders == {}, f"the pack's runtime must not import devtools (it is dev tooling): {offenders}"


def test_code_cites_only_documents_in_the_repository() -> None:
    """A docstring that sends the reader to a Markdown document must name one this repository has."""
    present = {
        path.name for path in REPO.rglob("*.md") if "node_modules" not in path.parts and ".host" not in path.parts
    }
    files = [
        path for path in _outside_tests() + list((REPO / "tests").rglob("*.py")) if "node_modules" not in path.parts
    ]
    offenders = {}
    for path in files:
        cited = set(re.findall(r"(?<![\w.])((?:[\w-]+/)*[A-Z][A-Z_]*\.md)\b", path.read_text()))
        missing = sorted(name for name in cited if not ((REPO / name).is_file() if "/" in name else name in present))
        if missing:
            offenders[str(path.relative_to(REPO))] = missing
    assert offenders == {}, f"code cites documents that are not in the repository: {offenders}"
