"""``make serve``: the demo's ComfyUI server, left running with the example workflows in its template browser.

Same host and base directory as the demo (``.host/ComfyUI``, ``.host/base``, the tiny checkpoint and the
generated subject, if the demo ran), on http://127.0.0.1:8188 unless ``--port`` says otherwise. Stop it
with Ctrl-C.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from comfyui_lora2.devtools.comfy_server import ComfyServer
from comfyui_lora2.devtools.layout import host_available

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8188)
    args = parser.parse_args()
    if not host_available():
        raise SystemExit("the ComfyUI host is not installed; run `make host` first")
    server = ComfyServer(REPO / ".host" / "base", port=args.port)
    server.start()
    print(f"ComfyUI is running on {server.url} (log: {server.log_path}); Ctrl-C stops it.", flush=True)
    print("Workflow menu -> Browse Templates -> ComfyUI-LoRA2 lists the example workflows.", flush=True)
    try:
        while server.process is not None and server.process.poll() is None:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
