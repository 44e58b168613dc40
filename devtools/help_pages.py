"""Write the nodes' help pages (``web/docs/<node id>.md``) from their declarations.

ComfyUI's frontend shows ``WEB_DIRECTORY/docs/<node id>.md`` (or ``docs/<node id>/<locale>.md``) in the
node library's help panel. The declaration is the one source of truth for what every input does (its
tooltip, type and default, read from the config dataclasses), so the pages are rendered from it rather
than written by hand, and ``tests/test_help_pages.py`` fails when a page no longer matches its node.

    OMP_NUM_THREADS=1 .venv/bin/python -m comfyui_lora2.devtools.help_pages   # rewrite web/docs/
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

DOCS_DIR = Path(__file__).resolve().parents[1] / "web" / "docs"
FOOTER = (
    "*Generated from the node's declaration by `python -m comfyui_lora2.devtools.help_pages`; "
    "the README has the guide, recommended settings and troubleshooting.*"
)


def _cell(text: Any) -> str:
    """One Markdown table cell: no line breaks, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _type(slot: Any) -> str:
    return str(getattr(slot, "io_type", "") or type(slot).__name__)


def _default(slot: Any) -> str:
    if getattr(slot, "optional", False) and getattr(slot, "default", None) is None:
        return "optional"
    default = getattr(slot, "default", None)
    if default is None:
        return ""
    return '`""`' if default == "" else f"`{default}`"


def render(schema: Any) -> str:
    """The help page of one node schema (``comfy_api`` V3 ``io.Schema``)."""
    lines = [f"# {schema.display_name or schema.node_id}", "", _cell(schema.description or ""), ""]
    aliases = getattr(schema, "search_aliases", None) or []
    if aliases:
        lines += [f"*The node search also finds it as: {', '.join(aliases)}.*", ""]
    if schema.inputs:
        lines += ["## Inputs", "", "| input | type | default | what it does |", "| --- | --- | --- | --- |"]
        for slot in schema.inputs:
            lines.append(f"| `{slot.id}` | {_type(slot)} | {_default(slot)} | {_cell(slot.tooltip or '')} |")
        lines.append("")
    if schema.outputs:
        lines += ["## Outputs", "", "| output | type | what it is |", "| --- | --- | --- |"]
        for slot in schema.outputs:
            name = getattr(slot, "display_name", None) or slot.id
            lines.append(f"| {_cell(name)} | {_type(slot)} | {_cell(slot.tooltip or '')} |")
        lines.append("")
    return "\n".join([*lines, FOOTER, ""])


def pages(node_classes: dict[str, type]) -> dict[str, str]:
    """``{node id: page}`` for the given node classes (taken from a booted host's mappings)."""
    return {node_id: render(cls.define_schema()) for node_id, cls in sorted(node_classes.items())}


def main(argv: list[str] | None = None) -> None:
    from .comfy_host import boot

    host = boot(tempfile.mkdtemp(prefix="lora2-help-"))  # an empty base: file lists hold only their defaults
    written = pages({name: host.nodes.NODE_CLASS_MAPPINGS[name] for name in host.pack_node_names()})
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    for node_id, text in written.items():
        (DOCS_DIR / f"{node_id}.md").write_text(text, encoding="utf-8")
    print(f"wrote {len(written)} help pages to {DOCS_DIR}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
