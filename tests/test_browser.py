"""A user's first run, in ComfyUI's real web UI (frontend 1.32.9) in Debian's chromium.

The browser half is ``tests/browser/browser_test.mjs``: it opens the template browser from the side
bar, picks this pack under "Extensions", loads ``lora2_train_and_inspect`` by clicking its card,
checks every node is registered (no missing-node dialog), sets the tiny-run overrides of
``devtools/browser/tiny_run.json`` through the widgets, presses Run, records the validation grids the
"Train LoRA²" node shows while it trains (its progress preview) and waits for the "Rank heatmap"
node to show its picture. This side prepares the server (tiny seeded checkpoint, generated subject)
and checks what the server recorded. A screenshot goes to ``test-artifacts/`` (and ``$LORA2_ARTIFACTS``).

Skips, with the reason, when chromium, Node or ``devtools/browser/node_modules`` (``make browser``) is
missing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from comfyui_lora2.devtools.build_workflows import load_tiny_run, prepare_base
from comfyui_lora2.devtools.comfy_server import running_server
from comfyui_lora2.devtools.layout import (
    MISSING_HOST_REASON,
    PACK_LINK_NAME,
    host_available,
)

REPO = Path(__file__).resolve().parents[1]
BROWSER_DIR = REPO / "tests" / "browser"
TOOLS_DIR = REPO / "devtools" / "browser"  # the UI driver, its node_modules, the tiny-run overrides
CHROMIUM = Path(os.environ.get("LORA2_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = REPO / "test-artifacts"
SCREENSHOT = "browser_train_and_inspect.png"
WORKFLOW = "lora2_train_and_inspect"


def _skip_reason() -> str | None:
    if not host_available():
        return MISSING_HOST_REASON
    if not CHROMIUM.is_file():
        return f"no chromium at {CHROMIUM} (apt-get install chromium, or set LORA2_CHROMIUM)"
    if shutil.which("node") is None:
        return "Node.js is not installed (node is not on PATH)"
    if not (TOOLS_DIR / "node_modules" / "playwright-core").is_dir():
        return "devtools/browser/node_modules is missing: run `make browser` (npm ci --prefix devtools/browser)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


def _prepare_base(base: Path) -> dict:
    """Tiny checkpoint under the name the overrides pick, the generated subject, a returning user (the test
    opens the template browser from the side bar as a user would)."""
    tiny = load_tiny_run()
    prepare_base(base, tiny)
    return tiny


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, "browser_test.mjs printed no RESULT line"
    return json.loads(lines[-1][len("RESULT ") :])


def test_template_browser_loads_and_runs_the_training_workflow(tmp_path: Path) -> None:
    started = time.monotonic()
    _prepare_base(tmp_path / "base")
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / SCREENSHOT
    screenshot.unlink(missing_ok=True)
    with running_server(tmp_path / "base") as server:
        command = ["node", str(BROWSER_DIR / "browser_test.mjs"), "--url", server.url, "--screenshot", str(screenshot)]
        try:
            done = subprocess.run(command, cwd=BROWSER_DIR, capture_output=True, text=True, timeout=150)
        except subprocess.TimeoutExpired as error:
            pytest.fail(f"browser_test.mjs timed out:\n{error.stdout}\n{error.stderr}\n{server.log_tail()}")
        report = f"--- browser ---\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        assert done.returncode == 0, f"{report}\n--- server ---\n{server.log_tail()}"
        result = _result(done.stdout)

        # what the template browser showed and loaded
        listed = ["lora2_apply", "lora2_inspect_any_lora", WORKFLOW, "lora2_validate_and_evaluate"]
        assert sorted(result["listed"]) == sorted(listed), report
        assert result["thumbnail"]["width"] == 1280 and result["thumbnail"]["height"] == 720, report
        loaded = result["loaded"]
        workflow = json.loads((REPO / "example_workflows" / f"{WORKFLOW}.json").read_text())
        assert loaded["nodes"] == len(workflow["nodes"]) and not loaded["unregistered"], report
        assert loaded["missingNodesDialog"] == 0, report
        assert {"1 Data", "2 Train", "3 Inspect & prune", "4 Compare"} <= set(loaded["groups"])
        assert result["widgets"]["Train LoRA²"]["steps"] == 6

        # what the server recorded for that prompt: the heatmap node's image, the saved adapter
        history = server.history(result["promptId"])
        assert history["status"]["status_str"] == "success", history["status"]
        images = history["outputs"][result["heatmapId"]]["images"]
        assert images, history["outputs"]
        png = Image.open(io.BytesIO(server.view(images[0]["filename"], images[0]["subfolder"], images[0]["type"])))
        assert png.format == "PNG" and png.width == 1024, png
        assert result["preview"]["images"] and result["preview"]["images"][0]["width"] == png.width
        assert result["preview"]["executed"][0]["images"][0]["filename"] == images[0]["filename"]
        assert (tmp_path / "base" / "models" / "loras" / "lora2" / "my_subject.safetensors").is_file()

        # the validation samples: previews on the Train node while it trained, grids on disk, the last one kept
        train = result["train"]
        grids = tmp_path / "base" / "output" / "lora2" / "my_subject"
        assert sorted(p.name for p in grids.glob("step_*.png")) == [f"step_{s:06d}.png" for s in (0, 3, 6)]
        assert [p for p in train["previews"] if p["node"] == train["id"] and p["bytes"] > 0], report
        shown_while_training = [i for i in train["images"] if not i["finished"] and i["src"].startswith("blob:")]
        assert shown_while_training and shown_while_training[0]["width"] > 64, report
        assert train["final"] and train["final"][0]["src"] == train["images"][-1]["src"], report  # the last grid stays
        kept = history["outputs"][train["id"]]["images"][0]
        assert (kept["filename"], kept["subfolder"], kept["type"]) == ("step_000006.png", "lora2/my_subject", "output")
        assert server.get_json("/workflow_templates")[PACK_LINK_NAME]

    assert screenshot.is_file() and Image.open(screenshot).size == (1280, 720)
    target = os.environ.get("LORA2_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy2(screenshot, Path(target) / SCREENSHOT)
    elapsed = time.monotonic() - started
    print(f"browser test: {elapsed:.0f} s; in the browser: {result['timings']}")
