"""Pytest fixtures for the ComfyUI host; a test module opts in with ``pytest_plugins = ["support.fixtures"]``.

Kept out of ``tests/conftest.py`` so suites that never touch ComfyUI do not pay for it (booting takes
~3 s, the server ~5 s). Every fixture skips, with the install command as the reason, when the pinned
host tree is missing; ``host_server`` runs its tests once per host, the newest one (ComfyUI 0.33.0 from
``../shared/hosts``) skipping with the reason when that tree is absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from comfyui_lora2.devtools.comfy_host import ComfyHost, boot, register_test_nodes
from comfyui_lora2.devtools.comfy_server import ComfyServer, running_server
from comfyui_lora2.devtools.layout import (
    COMFY_DIR,
    MISSING_HOST_REASON,
    MISSING_NEWEST_REASON,
    NEWEST_COMFY_DIR,
    host_available,
    make_base,
    newest_host_available,
)


def _require_host() -> None:
    if not host_available():
        pytest.skip(MISSING_HOST_REASON)


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The in-process host's base directory (models/, input/, output/, custom_nodes/ComfyUI-LoRA2)."""
    _require_host()
    return make_base(tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="session")
def comfy_host(comfy_base: Path) -> ComfyHost:
    """ComfyUI booted in this process with our pack and the test-only nodes of ``tiny_nodes``."""
    host = boot(comfy_base)
    from comfyui_lora2.devtools.tiny_nodes import TEST_NODES  # imports ComfyUI: only after boot

    register_test_nodes(TEST_NODES)
    return host


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """A real ComfyUI server on a free loopback port with its own base directory, per test module.

    Put files a prompt needs (models, inputs) under ``server.base_dir`` before posting; on a failed
    assertion, ``server.log_tail()`` shows what ComfyUI printed.
    """
    _require_host()
    with running_server(tmp_path_factory.mktemp("comfy_server_base")) as server:
        yield server


@pytest.fixture(scope="module", params=["pinned", "newest"])
def host_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """A real server per module and per host: the pinned ComfyUI 0.3.75, then the newest tree (0.33.0).

    Only the tests that prove what a user of either host gets take this one (start-up with the pack, a
    training graph, the template browser); the rest stay on the pinned host to keep the suite short.
    """
    _require_host()
    if request.param == "newest" and not newest_host_available():
        pytest.skip(MISSING_NEWEST_REASON)
    comfy_dir = COMFY_DIR if request.param == "pinned" else NEWEST_COMFY_DIR
    with running_server(tmp_path_factory.mktemp(f"{request.param}_server_base"), comfy_dir=comfy_dir) as server:
        yield server
