"""Every node has a help page (``web/docs/<node id>.md``), current with its declaration, served by both hosts.

ComfyUI's frontend fetches ``/extensions/<pack folder>/docs/<node id>.md`` for the node library's help
panel (``WEB_DIRECTORY/docs``); a page that drifted from its node's inputs or tooltips misleads users, so
the pages are compared with what ``devtools/help_pages.py`` renders from the live declarations.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfyui_lora2.devtools.comfy_host import ComfyHost
from comfyui_lora2.devtools.comfy_server import ComfyServer
from comfyui_lora2.devtools.help_pages import DOCS_DIR, pages
from comfyui_lora2.devtools.layout import COMFY_DIR, MISSING_HOST_REASON, PACK_LINK_NAME, host_available

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON)
REPO = Path(__file__).resolve().parents[1]


def test_every_node_has_a_current_help_page(comfy_host: ComfyHost) -> None:
    names = comfy_host.pack_node_names()
    assert len(names) >= 10
    expected = pages({name: comfy_host.nodes.NODE_CLASS_MAPPINGS[name] for name in names})
    on_disk = {path.stem: path.read_text(encoding="utf-8") for path in DOCS_DIR.glob("*.md")}
    assert sorted(on_disk) == sorted(expected), "one page per node: rerun python -m comfyui_lora2.devtools.help_pages"
    stale = [name for name in names if on_disk[name] != expected[name]]
    assert not stale, f"help pages out of date with their nodes: {stale} (rerun the generator)"
    for name in names:  # each page names every input the node declares
        schema = comfy_host.nodes.NODE_CLASS_MAPPINGS[name].define_schema()
        assert all(f"| `{slot.id}` |" in on_disk[name] for slot in schema.inputs), name


def test_both_hosts_serve_the_help_pages_and_the_example_workflows(host_server: ComfyServer) -> None:
    """What a user of either host sees: the help panel's page and the template browser's list."""
    nodes = sorted(name for name in host_server.object_info() if name.startswith("LoRA2"))
    assert len(nodes) >= 10
    for name in nodes:
        served = host_server.get(f"/extensions/{PACK_LINK_NAME}/docs/{name}.md").decode("utf-8")
        assert served == (DOCS_DIR / f"{name}.md").read_text(encoding="utf-8"), name
    listed = set(host_server.get_json("/workflow_templates")[PACK_LINK_NAME])
    shipped = {path.stem for path in (REPO / "example_workflows").glob("*.json")}
    assert listed == shipped and shipped
    for name in sorted(shipped):
        served = json.loads(host_server.get(f"/api/workflow_templates/{PACK_LINK_NAME}/{name}.json"))
        assert served == json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
        assert host_server.get(f"/api/workflow_templates/{PACK_LINK_NAME}/{name}.jpg")[:3] == b"\xff\xd8\xff"


def test_search_aliases_reach_the_node_search_where_the_host_has_them(
    host_server: ComfyServer, comfy_host: ComfyHost
) -> None:
    """Every node declares extra search names; 0.33.0 lists them in /object_info, 0.3.75 (no such schema
    field) still loads every node and simply lists none."""
    names = comfy_host.pack_node_names()
    declared = {name: comfy_host.nodes.NODE_CLASS_MAPPINGS[name].define_schema().search_aliases for name in names}
    assert all(len(aliases) >= 2 for aliases in declared.values()), declared
    info = host_server.object_info()
    supports = "search_aliases" in info["KSampler"]  # the stock node tells whether this host has the field
    for name, aliases in declared.items():
        assert name in info, name
        assert info[name].get("search_aliases") == (aliases if supports else None), name
    newest = host_server.comfy_dir != COMFY_DIR
    assert supports == newest  # 0.33.0 has the field, the pinned 0.3.75 does not
