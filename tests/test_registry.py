"""``pyproject.toml`` as the Comfy registry and ComfyUI read it: through each host's own ``comfy_config``.

ComfyUI parses a pack's pyproject at start-up (``comfy_config/config_parser.py``) with the same field
names the registry uses, so reading ours with the hosts' parser checks what the registry and the
Manager will see: publisher, icon, licence file, supported OS and accelerators, and the oldest
ComfyUI the pack supports, which must be the pinned host the tests run against.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfyui_lora2.devtools.layout import (
    COMFY_DIR,
    MISSING_HOST_REASON,
    MISSING_NEWEST_REASON,
    NEWEST_COMFY_DIR,
    comfy_version,
    host_available,
    newest_host_available,
)

REPO = Path(__file__).resolve().parents[1]
READ = """
import json, sys
from comfy_config.config_parser import extract_node_configuration
config = extract_node_configuration(sys.argv[1])
print(json.dumps({"project": config.project.model_dump(), "comfy": config.tool_comfy.model_dump()}))
"""
HOSTS = [
    pytest.param(COMFY_DIR, marks=pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON), id="pinned"),
    pytest.param(
        NEWEST_COMFY_DIR,
        marks=pytest.mark.skipif(not newest_host_available(), reason=MISSING_NEWEST_REASON),
        id="newest",
    ),
]


def _read_with(comfy_dir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(comfy_dir))
    done = subprocess.run(
        [sys.executable, "-c", READ, str(REPO)], env=env, cwd=comfy_dir, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("comfy_dir", HOSTS)
def test_the_hosts_read_our_registry_fields(comfy_dir: Path) -> None:
    config = _read_with(comfy_dir)
    project, comfy = config["project"], config["comfy"]
    assert project["name"] == "comfyui-lora2" and project["description"]
    assert project["license"] == {"file": "LICENSE", "text": ""} and (REPO / "LICENSE").is_file()
    assert project["supported_os"] == ["OS Independent"]
    assert "GPU :: NVIDIA CUDA" in project["supported_accelerators"]
    assert project["urls"]["repository"].startswith("https://github.com/")
    assert comfy["publisher_id"] == "comfyui-lora2" and comfy["display_name"]
    # the icon URL points at a file this repository carries
    icon = comfy["icon"]
    assert icon.startswith("https://raw.githubusercontent.com/") and (REPO / icon.split("/main/", 1)[1]).is_file()


@pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON)
def test_requires_comfyui_is_the_pinned_host() -> None:
    """The oldest ComfyUI we claim is the one the whole suite runs against, so the claim is tested."""
    config = _read_with(COMFY_DIR)
    assert config["project"]["supported_comfyui_version"] == f">={comfy_version(COMFY_DIR)}"
