"""Pytest fixtures for the ComfyUI host; a test module opts in with ``pytest_plugins = ["support.fixtures"]``.

Kept out of ``tests/conftest.py`` so suites that never touch ComfyUI do not pay for it (booting takes
~3 s, the server ~5 s). Every fixture skips, with the install command as the reason, when the pinned
host tree is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from comfyui_lora2.devtools.comfy_host import ComfyHost, boot, register_test_nodes
from comfyui_lora2.devtools.comfy_server import ComfyServer, running_server
from comfyui_lora2.devtools.layout import MISSING_HOST_REASON, host_available, make_base


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
