"""Rebuild the pack's example workflows in ComfyUI's real web UI.

Writes, for each of ``lora2_train_and_inspect``, ``lora2_inspect_any_lora``, ``lora2_apply`` and
``lora2_validate_and_evaluate``:

- ``example_workflows/<name>.json``: the UI-format workflow, exactly what the frontend's ``app.graph.serialize()``
  writes (shown by ComfyUI's template browser under the pack's folder name);
- ``example_workflows/<name>.jpg``: the whole graph fitted to 1280x720, the template browser's thumbnail;
- ``example_workflows/api/<name>.json``: the API-format twin from ``app.graphToPrompt()``, for the tests.

Nothing is hand-written: ``devtools/browser/build_workflows.mjs`` builds every graph from the specs in
``devtools/browser/workflow_specs.mjs`` through the frontend's own APIs (``LiteGraph.createNode``,
``app.graph.add``, widgets by name, ``node.connect`` by slot name) in Debian's chromium.

Regenerate (needs ``make host``, Node 20, ``/usr/bin/chromium`` and ``make browser`` for playwright-core;
about a minute on two cores)::

    OMP_NUM_THREADS=1 .venv/bin/python -m comfyui_lora2.devtools.build_workflows
    OMP_NUM_THREADS=1 .venv/bin/python -m comfyui_lora2.devtools.build_workflows --keep /tmp/lora2-build  # keeps it

What it does, in a temporary ComfyUI base directory (never in the repository):

1. writes the tiny seeded SD1.5-shaped checkpoint (``devtools/tiny_checkpoint.py``, ~300 MB) as
   ``models/checkpoints/lora2_tiny_sd15.safetensors`` and links ``v1-5-pruned-emaonly.safetensors`` to
   it, so the checkpoint list holds the name the workflows use; a generated subject goes to
   ``input/lora2_subject`` (``devtools/subject.py``);
2. starts the real server (``devtools.comfy_server.running_server``) and builds workflow 1;
3. runs workflow 1's API twin with the tiny overrides of ``devtools/browser/tiny_run.json``: it trains for a
   few steps and saves ``models/loras/lora2/my_subject.safetensors``, the file workflows 2 and 3 load;
4. builds workflows 2, 3 and 4 (the UI reloads, so their LoRA lists hold that file), then stops the server.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from comfyui_lora2.devtools.comfy_server import running_server
from comfyui_lora2.devtools.layout import COMFY_DIR, STUBS_DIR, make_base
from comfyui_lora2.devtools.subject import write_subject

REPO = Path(__file__).resolve().parents[1]

BROWSER_DIR = REPO / "devtools" / "browser"
TINY_RUN = BROWSER_DIR / "tiny_run.json"
FIRST = "lora2_train_and_inspect"
REST = ("lora2_inspect_any_lora", "lora2_apply", "lora2_validate_and_evaluate")
WORKFLOW_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SUBJECT_LORA = Path("lora2") / "my_subject.safetensors"


def log(message: str) -> None:
    print(f"build_workflows: {message}", flush=True)


def load_tiny_run() -> dict:
    return json.loads(TINY_RUN.read_text())


def apply_overrides(api_prompt: dict, overrides: dict[str, dict]) -> dict:
    """A copy of an API-format prompt with inputs replaced on the nodes with these titles (``_meta.title``)."""
    prompt = copy.deepcopy(api_prompt)
    for title, values in overrides.items():
        matches = [node for node in prompt.values() if node.get("_meta", {}).get("title") == title]
        if len(matches) != 1:
            raise ValueError(f"{len(matches)} nodes titled {title!r} in the prompt")
        for name, value in values.items():
            if name not in matches[0]["inputs"]:
                raise KeyError(f"node {title!r} has no input {name!r}")
            matches[0]["inputs"][name] = value
    return prompt


def prepare_base(base: Path, tiny: dict) -> Path:
    """A ComfyUI base directory for a tiny run (also the browser test's): the tiny checkpoint under the name
    ``tiny`` picks, its generated subject, and a returning user (on a first start the frontend opens the
    template browser by itself, which would only be in the way, or race with a test's own click)."""
    base = make_base(base)
    checkpoint = base / "models" / "checkpoints" / tiny["checkpoint"]
    log(f"writing the tiny checkpoint to {checkpoint}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{COMFY_DIR}{os.pathsep}{STUBS_DIR}")
    script = [sys.executable, str(REPO / "devtools" / "tiny_checkpoint.py"), str(checkpoint)]
    subprocess.run(script, check=True, env=env, capture_output=True, timeout=120)
    subject = tiny["subject"]
    write_subject(base / "input" / subject["folder"], count=subject["count"], size=subject["size"])
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    return base


def link_workflow_checkpoint(base: Path, tiny: dict) -> None:
    """The name the workflows use (a real SD1.5 file's) as a link to the tiny checkpoint, so lists hold it."""
    alias = base / "models" / "checkpoints" / WORKFLOW_CHECKPOINT
    if not alias.exists():
        alias.symlink_to(tiny["checkpoint"])


def run_builder(url: str, names: list[str]) -> None:
    command = ["node", str(BROWSER_DIR / "build_workflows.mjs"), "--url", url, "--root", str(REPO)]
    subprocess.run([*command, "--only", ",".join(names)], check=True, cwd=BROWSER_DIR)


def build(base: Path) -> None:
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        raise SystemExit(
            "devtools/browser/node_modules is missing: run `make browser` (npm ci --prefix devtools/browser)"
        )
    tiny = load_tiny_run()
    started = time.monotonic()
    base = prepare_base(base, tiny)
    link_workflow_checkpoint(base, tiny)
    with running_server(base) as server:
        log(f"server at {server.url} (base {base})")
        run_builder(server.url, [FIRST])
        twin = json.loads((REPO / "example_workflows" / "api" / f"{FIRST}.json").read_text())
        log("training the subject LoRA through workflow 1's API twin (tiny overrides)")
        server.run(apply_overrides(twin, tiny["overrides"]), timeout=600)
        lora = base / "models" / "loras" / SUBJECT_LORA
        if not lora.is_file():
            raise RuntimeError(f"workflow 1 did not write {lora}")
        run_builder(server.url, list(REST))
    gitkeep = REPO / "example_workflows" / ".gitkeep"
    if gitkeep.exists():
        gitkeep.unlink()
    for name in (FIRST, *REST):
        jpg = REPO / "example_workflows" / f"{name}.jpg"
        log(f"{name}: {jpg.stat().st_size / 1024:.0f} KB thumbnail")
    log(f"done in {time.monotonic() - started:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="use (and keep) this base directory instead of a temporary one")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.keep:
        build(args.keep)
        return
    base = Path(tempfile.mkdtemp(prefix="lora2-build-"))
    try:
        build(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
