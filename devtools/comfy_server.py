"""The real ComfyUI 0.3.75 server as a subprocess, driven the way the web UI drives it.

The process is ``main.py --cpu --listen 127.0.0.1 --port <free> --base-directory <base>`` run from the
ComfyUI tree through ``comfy_main.py`` (the torchvision stub on the path while ComfyUI starts, then
hidden), with ``OMP_NUM_THREADS=1``.

Why a real server on top of the in-process harness: it is the only way to prove what a user gets,
i.e. start-up with our pack in ``custom_nodes``, ``/object_info``, ``POST /prompt``, websocket events,
``/history`` and ``/view``. Only the standard library and aiohttp (a ComfyUI dependency) are used.

    with running_server(base_dir) as server:
        run = server.run(api_prompt)            # websocket first, then POST, then follow to the end
        image = server.view(**run.images()[0])  # PNG bytes

The context manager always stops the process; when the body raises, the exception carries the tail of
the server's log (``add_note``) so a failing test shows what ComfyUI printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .layout import COMFY_DIR, MISSING_HOST_REASON, make_base

if TYPE_CHECKING:
    import aiohttp

__all__ = ["ComfyServer", "PromptRejected", "ServerExecutionError", "ServerRun", "free_port", "running_server"]

LOG_TAIL_CHARS = 6000
LAUNCHER = Path(__file__).resolve().parent / "comfy_main.py"  # main.py with the torchvision stub at start-up


class PromptRejected(RuntimeError):
    """``POST /prompt`` answered 400: the prompt did not validate (``error`` / ``node_errors`` say why)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"POST /prompt rejected with HTTP {status}: {json.dumps(body)[:2000]}")
        self.status = status
        self.body = body


class ServerExecutionError(RuntimeError):
    """The websocket reported ``execution_error`` or ``execution_interrupted`` for our prompt."""

    def __init__(self, event: str, data: Mapping[str, Any]) -> None:
        message = data.get("exception_message") or event
        trace = "".join(data.get("traceback", []) or [])
        super().__init__(f"{event} in node {data.get('node_id')} ({data.get('node_type')}): {message}\n{trace}")
        self.event = event
        self.data = dict(data)


@dataclass
class ServerRun:
    """One prompt's round trip: its id, every websocket message in order, and its ``/history`` entry."""

    prompt_id: str
    events: list[dict[str, Any]] = field(default_factory=list)
    history: dict[str, Any] = field(default_factory=dict)

    def event_types(self) -> list[str]:
        """Message types in arrival order (binary preview frames show as ``binary``)."""
        return [e["type"] for e in self.events]

    def outputs(self) -> dict[str, Any]:
        """The ``outputs`` of the history entry (per node id: its ``ui`` dict)."""
        return dict(self.history.get("outputs", {}))

    def images(self) -> list[dict[str, str]]:
        """Every image reference in the outputs, as keyword arguments for ``ComfyServer.view``."""
        found = []
        for ui in self.outputs().values():
            for image in ui.get("images", []) or []:
                found.append(
                    {"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": image["type"]}
                )
        return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ComfyServer:
    """Start, query and stop ``python main.py --cpu`` for one base directory on a free loopback port."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        python: str | None = None,
        comfy_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.base_dir = make_base(base_dir)
        self.comfy_dir = Path(comfy_dir) if comfy_dir is not None else COMFY_DIR  # which ComfyUI tree runs
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.python = python or sys.executable
        self.log_path = self.base_dir / f"server-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ComfyServer:
        """Launch the server and wait until ``/object_info`` answers (stock nodes and packs loaded)."""
        if not (self.comfy_dir / "main.py").is_file():
            raise RuntimeError(
                MISSING_HOST_REASON if self.comfy_dir == COMFY_DIR else f"no ComfyUI at {self.comfy_dir}"
            )
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the launcher adds the torchvision stub itself, for start-up only
        env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        command = [self.python, str(LAUNCHER), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port)]
        command += ["--base-directory", str(self.base_dir), *self.extra_args]
        if self.comfy_dir != COMFY_DIR:
            # A shared tree we do not own (the newest host): leave no bytecode and no database in it.
            env["PYTHONDONTWRITEBYTECODE"] = "1"
            command += ["--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, cwd=self.comfy_dir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with code {self.process.returncode} at start ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/object_info", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise TimeoutError(
            f"ComfyUI did not answer /object_info within {timeout:.0f} s ({self.log_path}):\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after ``timeout``); safe to call twice."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def log(self) -> str:
        """Everything the server printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        text = self.log()
        return text[-chars:]

    # --- HTTP -------------------------------------------------------------------------------------

    def get(self, path: str, **query: str) -> bytes:
        """GET ``path`` and return the body; raises ``urllib.error.HTTPError`` on a non-2xx answer."""
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read()

    def get_json(self, path: str, **query: str) -> Any:
        return json.loads(self.get(path, **query))

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        """``/object_info`` (every node's inputs/outputs), or one node's entry."""
        if node_class is None:
            return self.get_json("/object_info")
        return self.get_json(f"/object_info/{urllib.parse.quote(node_class)}")[node_class]

    def post_prompt(self, api_prompt: Mapping[str, Any], client_id: str | None = None) -> str:
        """Queue an API-format prompt; returns its ``prompt_id`` or raises ``PromptRejected``."""
        body: dict[str, Any] = {"prompt": api_prompt}
        if client_id is not None:
            body["client_id"] = client_id
        request = urllib.request.Request(
            self.url + "/prompt", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return str(json.loads(response.read())["prompt_id"])
        except urllib.error.HTTPError as error:
            payload = error.read()
            try:
                detail: Any = json.loads(payload)
            except ValueError:
                detail = payload.decode(errors="replace")
            raise PromptRejected(error.code, detail) from None

    def history(self, prompt_id: str) -> dict[str, Any]:
        """The ``/history/<prompt_id>`` entry (``prompt``, ``outputs``, ``status``, ``meta``); {} if unknown."""
        return dict(self.get_json(f"/history/{prompt_id}").get(prompt_id, {}))

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        """The bytes of an output/temp/input file, as the browser fetches a preview."""
        return self.get("/view", filename=filename, subfolder=subfolder, type=type)

    # --- websocket --------------------------------------------------------------------------------

    def run(
        self,
        api_prompt: Mapping[str, Any],
        *,
        timeout: float = 60.0,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> ServerRun:
        """Connect the websocket, post the prompt, follow it to ``execution_success``, read its history.

        Connecting first means no event is missed. Raises ``PromptRejected`` for an invalid prompt and
        ``ServerExecutionError`` when a node fails or the run is interrupted. ``on_event`` sees every
        text message as it arrives (the demo prints progress with it).
        """
        client_id = uuid.uuid4().hex
        run = asyncio.run(asyncio.wait_for(self._connect_post_follow(api_prompt, client_id, on_event), timeout))
        run.history = self.finished_history(run.prompt_id)
        return run

    def wait(self, prompt_id: str, client_id: str, *, timeout: float = 60.0) -> ServerRun:
        """Follow a prompt already posted with ``client_id`` until it finishes (history covers a late start)."""
        run = asyncio.run(asyncio.wait_for(self._follow_posted(prompt_id, client_id), timeout))
        run.history = self.finished_history(prompt_id)
        return run

    def finished_history(self, prompt_id: str, patience: float = 30.0) -> dict[str, Any]:
        """The history entry once it holds the run's ``status``, polled for up to ``patience`` seconds.

        ComfyUI sends ``execution_success`` from inside the executor and writes the history entry when
        the executor returns: on a loaded machine a read right after the message found no entry yet
        (seen in CI: ``KeyError: 'status'``). Returns what is there after ``patience`` seconds.
        """
        deadline = time.monotonic() + patience
        while True:
            entry = self.history(prompt_id)
            if "status" in entry or time.monotonic() >= deadline:
                return entry
            time.sleep(0.05)

    def _ws_url(self, client_id: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}"

    async def _connect_post_follow(
        self, api_prompt: Mapping[str, Any], client_id: str, on_event: Callable[[dict[str, Any]], None] | None = None
    ) -> ServerRun:
        import aiohttp  # a host dependency: imported late so collection works without the host

        async with aiohttp.ClientSession() as session, session.ws_connect(self._ws_url(client_id)) as ws:
            prompt_id = await asyncio.to_thread(self.post_prompt, api_prompt, client_id)
            run = ServerRun(prompt_id)
            await _follow(ws, run, on_event)
            return run

    async def _follow_posted(self, prompt_id: str, client_id: str) -> ServerRun:
        import aiohttp

        run = ServerRun(prompt_id)
        async with aiohttp.ClientSession() as session, session.ws_connect(self._ws_url(client_id)) as ws:
            done = await asyncio.to_thread(self.history, prompt_id)
            if done:
                status = done.get("status", {})
                if status.get("status_str") != "success":
                    raise ServerExecutionError("execution_error", _error_from_history(status))
                return run
            await _follow(ws, run)
            return run


async def _follow(
    ws: aiohttp.ClientWebSocketResponse, run: ServerRun, on_event: Callable[[dict[str, Any]], None] | None = None
) -> None:
    """Read messages until our prompt succeeds; raise on its error, interruption or a closed socket."""
    import aiohttp

    async for message in ws:
        if message.type == aiohttp.WSMsgType.BINARY:
            run.events.append({"type": "binary", "data": {"bytes": len(message.data)}})
            continue
        if message.type != aiohttp.WSMsgType.TEXT:
            break
        event = json.loads(message.data)
        run.events.append(event)
        if on_event is not None:
            on_event(event)
        data = event.get("data") or {}
        if data.get("prompt_id") != run.prompt_id:
            continue
        if event["type"] == "execution_success":
            return
        if event["type"] in ("execution_error", "execution_interrupted"):
            raise ServerExecutionError(event["type"], data)
    raise ConnectionError(f"websocket closed before prompt {run.prompt_id} finished; events: {run.event_types()}")


def _error_from_history(status: Mapping[str, Any]) -> dict[str, Any]:
    for event, data in status.get("messages", []):
        if event in ("execution_error", "execution_interrupted"):
            return dict(data)
    return {"exception_message": f"status {status.get('status_str')!r}"}


@contextlib.contextmanager
def running_server(base_dir: str | os.PathLike[str] | Path, **kwargs: Any) -> Iterator[ComfyServer]:
    """Start a server for ``base_dir``, yield it, always stop it; failures carry the server's log tail."""
    server = ComfyServer(base_dir, **kwargs)
    try:
        server.start()
        yield server
    except BaseException as error:
        if hasattr(error, "add_note") and str(server.log_path) not in str(error):
            error.add_note(f"--- ComfyUI server log (tail) {server.log_path} ---\n{server.log_tail()}")
        raise
    finally:
        server.stop()
