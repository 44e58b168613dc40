"""In-process ComfyUI 0.3.75 for tests: boot once, run API-format prompts, capture what a client sees.

Why in-process: the real server costs a subprocess and a websocket per test, and cannot take Python
objects (tiny models built in the test). Booting goes step by step; the order matters:

1. ``utils.install_util`` is imported before ``nodes``: ``nodes.py`` puts ``comfy/`` first on sys.path,
   and a later ``import utils`` would then find ``comfy/utils.py``.
2. ``args.cpu`` / ``args.disable_api_nodes`` / ``args.base_directory`` are set before anything imports
   ``comfy.model_management`` or ``folder_paths`` (both read ``args`` at import time).
3. ``folder_paths`` points at a per-session base directory whose ``custom_nodes`` holds a symlink
   ``ComfyUI-LoRA2`` to the checkout, so the pack loads exactly as a user's install would.

ComfyUI imports the pack under a path-derived module name, so its classes are a second copy of
``comfyui_lora2.*``: tests take node classes from ``host.nodes.NODE_CLASS_MAPPINGS`` (``node_class``),
never from ``comfyui_lora2.nodes``. The repository root must never be on sys.path (our ``nodes/`` would
shadow ComfyUI's ``nodes`` module); ``boot`` refuses to start if it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import importlib
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from .layout import (
    COMFY_DIR,
    MISSING_HOST_REASON,
    PACK_LINK_NAME,
    REPO_ROOT,
    STUBS_DIR,
    hide_torchvision_stub,
    host_available,
    make_base,
)

__all__ = [
    "ComfyHost",
    "FakeServer",
    "ProgressUpdate",
    "PromptResult",
    "boot",
    "get_host",
    "node_class",
    "pack_import_failures",
    "register_test_nodes",
    "run_prompt",
]


@dataclass(frozen=True)
class ProgressUpdate:
    """One ``comfy.utils.ProgressBar`` update, as the server's progress hook would have sent it."""

    value: float
    total: float
    node_id: str | None
    prompt_id: str | None
    has_preview: bool


class FakeServer:
    """Stands in for ``server.PromptServer`` with just what the executor and nodes touch.

    ``PromptExecutor`` reads ``client_id`` / ``last_node_id`` / ``last_prompt_id`` / ``sockets_metadata``
    and calls ``send_sync`` and ``queue_updated``; ``nodes_images`` calls ``send_progress_text``; packs
    may add HTTP routes at import (``PromptServer.instance.routes.get(...)``: kept, never served). Every
    event is recorded so tests can assert on what a browser client would have received.
    """

    def __init__(self) -> None:
        from aiohttp import web

        self.routes = web.RouteTableDef()
        self.loop: Any = None
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[Any, Any, str | None]] = []
        self.progress: list[ProgressUpdate] = []

    def reset(self) -> None:
        """Forget the previous prompt's events so each ``run_prompt`` reports only its own."""
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.events = []
        self.progress = []

    def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
        """Record a websocket message (event name, or a ``BinaryEventTypes`` int for previews)."""
        self.events.append((event, data, sid))

    def send_progress_text(self, text: str, node_id: str | None, sid: str | None = None) -> None:
        """Record the text some stock nodes stream to the UI (``PromptServer.instance.send_progress_text``)."""
        self.events.append(("progress_text", {"text": text, "node": node_id}, sid))

    def queue_updated(self) -> None:
        """The queue does not exist in-process; the executor may still call this."""


@dataclass
class PromptResult:
    """What one ``run_prompt`` produced: validation, execution status, UI outputs and all messages."""

    prompt_id: str
    success: bool
    validation_error: dict[str, Any] | None = None
    node_errors: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    status_messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    events: list[tuple[Any, Any, str | None]] = field(default_factory=list)
    progress: list[ProgressUpdate] = field(default_factory=list)

    @property
    def execution_error(self) -> dict[str, Any] | None:
        """The ``execution_error`` message (exception type, message, traceback, node), if any."""
        for event, data in self.status_messages:
            if event == "execution_error":
                return data
        return None

    @property
    def interrupted(self) -> bool:
        """True when the run stopped through ComfyUI's interrupt (``execution_interrupted``)."""
        return any(event == "execution_interrupted" for event, _ in self.status_messages)

    def event_names(self) -> list[str]:
        """Names of the text events in order (binary preview events show as ``binary:<type>``)."""
        return [e if isinstance(e, str) else f"binary:{e}" for e, _, _ in self.events]

    def describe_failure(self) -> str:
        """A readable reason for a failed run, for assertion messages."""
        if self.validation_error is not None:
            return f"prompt invalid: {self.validation_error}; node errors: {self.node_errors}"
        error = self.execution_error
        if error is not None:
            return (
                f"node {error.get('node_id')} ({error.get('node_type')}) raised {error.get('exception_type')}: "
                f"{error.get('exception_message')}\n{''.join(error.get('traceback', []))}"
            )
        if self.interrupted:
            return "execution interrupted"
        return "no failure recorded" if self.success else f"failed; status messages: {self.status_messages}"

    def raise_for_failure(self) -> PromptResult:
        """Fail the test with ComfyUI's own error text unless the prompt validated and ran to the end."""
        if not self.success:
            raise AssertionError(self.describe_failure())
        return self


@dataclass
class ComfyHost:
    """Handle on the booted host: its modules, the base directory and what happened at start-up."""

    base_dir: Path
    comfy: ModuleType
    nodes: ModuleType
    execution: ModuleType
    folder_paths: ModuleType
    server: FakeServer
    pack_path: Path
    pack_loaded: bool
    pack_import_failures: list[str]
    extras_import_failures: list[str]

    @property
    def pack_module_name(self) -> str:
        """The ``sys.modules`` name ComfyUI gave our pack (the path with dots replaced by ``_x_``)."""
        return str(self.pack_path).replace(".", "_x_")

    def pack_module(self) -> ModuleType:
        """ComfyUI's copy of our pack (not ``comfyui_lora2``: see the module docstring)."""
        return sys.modules[self.pack_module_name]

    def pack_node_names(self) -> list[str]:
        """Node ids our pack registered, read from ComfyUI's registry."""
        relative = f"custom_nodes.{PACK_LINK_NAME}"
        return sorted(
            name
            for name, cls in self.nodes.NODE_CLASS_MAPPINGS.items()
            if getattr(cls, "RELATIVE_PYTHON_MODULE", None) == relative
        )


_HOST: ComfyHost | None = None


def get_host() -> ComfyHost:
    """The booted host; fails with a hint when a test forgot the fixture that boots it."""
    if _HOST is None:
        raise RuntimeError("ComfyUI is not booted in this process: call boot(base_dir) (fixture `comfy_host`) first")
    return _HOST


def boot(base_dir: str | os.PathLike[str]) -> ComfyHost:
    """Import ComfyUI in this process and load its stock nodes and our pack, once per process.

    Later calls return the first handle whatever ``base_dir`` they pass: ComfyUI's registries and
    ``folder_paths`` are process-global, so a second base would only half apply.
    """
    global _HOST
    if _HOST is not None:
        return _HOST
    if not host_available():
        raise RuntimeError(MISSING_HOST_REASON)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base = make_base(base_dir)
    _prepare_sys_path()

    importlib.import_module("utils.install_util")  # before `nodes`: see the module docstring
    from comfy.cli_args import args

    args.cpu = True
    args.disable_api_nodes = True
    args.base_directory = str(base)
    folder_paths = importlib.import_module("folder_paths")
    _point_folder_paths(folder_paths, base)

    import comfy.model_management
    import comfy.utils

    nodes = importlib.import_module("nodes")
    execution = importlib.import_module("execution")
    server = FakeServer()
    server_module = importlib.import_module("server")
    if getattr(server_module.PromptServer, "instance", None) is None:
        server_module.PromptServer.instance = server  # before packs load: some register routes at import
    comfy.utils.set_progress_bar_global_hook(_progress_hook(server))
    pack_path = base / "custom_nodes" / PACK_LINK_NAME
    loaded, failures, extras_failed = _init_nodes(nodes, pack_path)
    hide_torchvision_stub()  # every ComfyUI module that imports torchvision is loaded by now

    _HOST = ComfyHost(
        base_dir=base,
        comfy=importlib.import_module("comfy"),
        nodes=nodes,
        execution=execution,
        folder_paths=folder_paths,
        server=server,
        pack_path=pack_path,
        pack_loaded=loaded,
        pack_import_failures=failures,
        extras_import_failures=extras_failed,
    )
    return _HOST


def _prepare_sys_path() -> None:
    """Put the ComfyUI tree first, the repository root (if any) and the torchvision stub last.

    ``python -m pytest`` puts the working directory, i.e. the repository root, on sys.path; there our
    ``nodes/`` package would shadow ComfyUI's ``nodes`` module (and ``tests/`` ComfyUI's). Moving those
    entries to the end lets every ComfyUI and site-packages name win while nothing else stops resolving.
    The stub goes last so that a working real torchvision, where one is installed, wins.
    """
    repo = os.path.realpath(REPO_ROOT)
    loaded_nodes = sys.modules.get("nodes")
    if loaded_nodes is not None and not str(getattr(loaded_nodes, "__file__", "")).startswith(str(COMFY_DIR)):
        raise RuntimeError(
            f"a module named `nodes` is already imported from {getattr(loaded_nodes, '__file__', '?')}; "
            "ComfyUI's `nodes` cannot load (is the repository root on PYTHONPATH?)"
        )
    shadowing = [p for p in sys.path if os.path.realpath(p or os.getcwd()) == repo]
    for entry in shadowing:
        sys.path.remove(entry)
    for entry in (str(STUBS_DIR), str(COMFY_DIR)):
        while entry in sys.path:
            sys.path.remove(entry)
    sys.path.insert(0, str(COMFY_DIR))
    sys.path.extend([*shadowing, str(STUBS_DIR)])


def _point_folder_paths(folder_paths: ModuleType, base: Path) -> None:
    """Aim every ComfyUI folder at ``base``, even if ``folder_paths`` was imported before ``args`` was set."""
    old_base = os.path.abspath(folder_paths.base_path)
    new_base = str(base)
    if old_base != new_base:
        for name, (paths, extensions) in list(folder_paths.folder_names_and_paths.items()):
            moved = [new_base + p[len(old_base) :] if p.startswith(old_base + os.sep) else p for p in paths]
            folder_paths.folder_names_and_paths[name] = (moved, extensions)
        folder_paths.base_path = new_base
        folder_paths.models_dir = os.path.join(new_base, "models")
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(base / "custom_nodes")], set())
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_user_directory(str(base / "user"))
    folder_paths.filename_list_cache.clear()


class _RecordCollector(logging.Handler):
    """Collects WARNING+ log records emitted while one particular custom node loads."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.active = False
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.active:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def logged_warnings() -> Iterator[list[str]]:
    """The WARNING+ messages logged through the root logger inside the block (ComfyUI's loaders say
    ``lora key not loaded`` this way), as a list that fills while the block runs."""
    collector = _RecordCollector()
    collector.active = True
    logging.getLogger().addHandler(collector)
    try:
        yield collector.messages
    finally:
        logging.getLogger().removeHandler(collector)


def _init_nodes(nodes: ModuleType, pack_path: Path) -> tuple[bool, list[str], list[str]]:
    """Run ``nodes.init_extra_nodes`` once, attributing warnings logged while our pack loads to it.

    ComfyUI keeps no list of failed custom-node imports: ``load_custom_node`` logs the traceback as a
    warning and returns False. Wrapping it for our pack's path catches the return value and the logs.
    """
    collector = _RecordCollector()
    outcome: dict[str, bool] = {}
    original = nodes.load_custom_node

    async def load_and_watch(module_path: str, *args: Any, **kwargs: Any) -> bool:
        ours = os.path.realpath(module_path) == os.path.realpath(pack_path)
        collector.active = ours
        try:
            ok = await original(module_path, *args, **kwargs)
        finally:
            collector.active = False
        if ours:
            outcome["loaded"] = bool(ok)
        return ok

    root = logging.getLogger()
    root.addHandler(collector)
    nodes.load_custom_node = load_and_watch
    try:
        extras_failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    finally:
        nodes.load_custom_node = original
        root.removeHandler(collector)
    failures = list(collector.messages)
    loaded = outcome.get("loaded", False)
    if "loaded" not in outcome:
        failures.append(f"ComfyUI never tried to load {pack_path} (not listed in custom_nodes)")
    elif not loaded and not failures:
        failures.append(f"load_custom_node returned False for {pack_path} without logging why")
    return loaded, failures, list(extras_failed or [])


def _progress_hook(server: FakeServer) -> Callable[..., None]:
    """The server's ``ProgressBar`` hook (``main.hijack_progress``), recording every update.

    Like the real hook it calls ``throw_exception_if_processing_interrupted`` first, so a node that
    reports progress is interruptible in tests exactly as under the server.
    """
    import comfy.model_management
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    def hook(value: float, total: float, preview_image: Any, prompt_id: str | None = None, node_id: Any = None):
        context = get_executing_context()
        if prompt_id is None and context is not None:
            prompt_id = context.prompt_id
        if node_id is None and context is not None:
            node_id = context.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        prompt_id = prompt_id if prompt_id is not None else server.last_prompt_id
        node_id = node_id if node_id is not None else server.last_node_id
        server.progress.append(ProgressUpdate(value, total, node_id, prompt_id, preview_image is not None))
        get_progress_state().update_progress(node_id, value, total, preview_image)
        server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id})

    return hook


def run_prompt(
    prompt: Mapping[str, Any],
    *,
    client_id: str | None = "t",
    prompt_id: str | None = None,
    extra_data: Mapping[str, Any] | None = None,
) -> PromptResult:
    """Validate and execute an API-format prompt the way the server's queue worker does.

    A fresh ``PromptExecutor`` (classic cache, no LRU/RAM cache) per call, so nothing is reused across
    calls. An invalid prompt is not executed: ``success`` is False and ``validation_error`` /
    ``node_errors`` say why (the server answers such a POST with HTTP 400).
    """
    host = get_host()
    execution = host.execution
    prompt = copy.deepcopy(dict(prompt))
    prompt_id = prompt_id or str(uuid.uuid4())
    server = host.server
    server.reset()
    server.last_prompt_id = prompt_id

    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        return PromptResult(prompt_id, False, validation_error=error, node_errors=dict(node_errors or {}))

    data = dict(extra_data or {})
    if client_id is not None:
        data["client_id"] = client_id
    executor = execution.PromptExecutor(
        server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0}
    )
    executor.execute(prompt, prompt_id, data, outputs)
    history = getattr(executor, "history_result", {}) or {}
    return PromptResult(
        prompt_id=prompt_id,
        success=bool(executor.success),
        node_errors=dict(node_errors or {}),
        outputs=dict(history.get("outputs", {})),
        meta=dict(history.get("meta", {})),
        status_messages=list(executor.status_messages),
        events=list(server.events),
        progress=list(server.progress),
    )


def register_test_nodes(mapping: Mapping[str, type], display_names: Mapping[str, str] | None = None) -> None:
    """Add test-only node classes to ComfyUI's registry so prompts can reach Python-built objects.

    Accepts V1 classes (``INPUT_TYPES``/``RETURN_TYPES``/``FUNCTION``) and V3 ``io.ComfyNode``
    subclasses (registered under their schema's ``node_id``). Re-registering a name replaces it.
    """
    nodes = get_host().nodes
    for name, cls in mapping.items():
        nodes.NODE_CLASS_MAPPINGS[name] = cls
        if not hasattr(cls, "RELATIVE_PYTHON_MODULE"):
            cls.RELATIVE_PYTHON_MODULE = "custom_nodes.tests"
    if display_names:
        nodes.NODE_DISPLAY_NAME_MAPPINGS.update(display_names)


def node_class(name: str) -> type:
    """A node class as ComfyUI registered it (ComfyUI's copy of our pack, not ``comfyui_lora2``)."""
    mapping = get_host().nodes.NODE_CLASS_MAPPINGS
    if name not in mapping:
        raise KeyError(f"node {name!r} is not registered in ComfyUI (known: {len(mapping)} nodes)")
    return mapping[name]


def pack_import_failures() -> list[str]:
    """Warnings ComfyUI logged while importing our pack (empty when it loaded cleanly)."""
    return list(get_host().pack_import_failures)
