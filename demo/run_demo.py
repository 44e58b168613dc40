"""The README's first command: train, inspect, prune and save a LoRA² adapter through a real ComfyUI.

``make demo`` sets up the pinned environment and the ComfyUI host, then runs this script, which

1. writes the tiny default checkpoint (SD1.5-shaped, seeded, random weights; ``devtools/tiny_checkpoint.py``) to
   ``.host/base/models/checkpoints`` and a small generated subject (``devtools/subject.py``) to
   ``.host/base/input/lora2_subject`` (both only once),
2. starts the real ComfyUI server on 127.0.0.1 with this pack in ``custom_nodes``,
3. runs example workflow 1 (``lora2_train_and_inspect``, its API twin in ``example_workflows/api``) pointed at
   the tiny model, printing progress as it goes,
4. writes to ``out/``: the adapter, the pruned adapter, the rank heatmap, the loss/rank chart, the two
   sampled images, and prints a summary table.

The tiny default has random weights, so its images are noise; it is there to show the pipeline end to
end in a few minutes on two CPU cores. For a real run: put an SD1.5 checkpoint in
``.host/base/models/checkpoints`` and pass its name, e.g.
``.venv/bin/python demo/run_demo.py --checkpoint v1-5-pruned-emaonly.safetensors --steps 500 --resolution 512``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

from comfyui_lora2.devtools.comfy_server import ComfyServer
from comfyui_lora2.devtools.layout import COMFY_DIR, STUBS_DIR, host_available
from comfyui_lora2.devtools.subject import write_subject
from comfyui_lora2.lora2.heatmap import build_rank_table, render_heatmap
from comfyui_lora2.lora2.heatmap_charts import has_history, render_history
from comfyui_lora2.lora2.lora_file import load_adapter

REPO = Path(__file__).resolve().parents[1]

BASE = REPO / ".host" / "base"
WORKFLOW = REPO / "example_workflows" / "api" / "lora2_train_and_inspect.json"
TINY_CHECKPOINT = "lora2_tiny_sd15.safetensors"
SUBJECT_FOLDER = "lora2_subject"


def say(message: str) -> None:
    print(message, flush=True)


def ensure_tiny_checkpoint() -> None:
    path = BASE / "models" / "checkpoints" / TINY_CHECKPOINT
    if path.is_file():
        return
    say(f"building the tiny default checkpoint (random weights) -> {path.relative_to(REPO)}")
    env = dict(os.environ, PYTHONPATH=f"{COMFY_DIR}{os.pathsep}{STUBS_DIR}", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(REPO / "devtools" / "tiny_checkpoint.py"), str(path)], check=True, env=env)


def by_title(prompt: dict[str, Any], title: str) -> dict[str, Any]:
    for node in prompt.values():
        if node.get("_meta", {}).get("title") == title:
            return node
    raise KeyError(f"workflow has no node titled {title!r}")


def demo_prompt(args: argparse.Namespace) -> dict[str, Any]:
    """Workflow 1's API twin with the demo's settings (model, data, a short run)."""
    prompt = json.loads(WORKFLOW.read_text())
    by_title(prompt, "Load Checkpoint")["inputs"]["ckpt_name"] = args.checkpoint
    by_title(prompt, "Subject images")["inputs"].update({"folder": SUBJECT_FOLDER, "resolution": args.resolution})
    by_title(prompt, "Train LoRA²")["inputs"].update(
        {
            "steps": args.steps,
            "batch_size": 2,
            "learning_rate": args.learning_rate,
            "rank_learning_rate": 0.05,
            "init_rank": 4,
            "max_rank": 32,
            "prior_strength": 1e-4,
            "training_dtype": "float32",
            "checkpoint_name": "lora2/demo_checkpoint",
            "resume": "none",
        }
    )
    by_title(prompt, "Empty latent")["inputs"].update({"width": args.resolution, "height": args.resolution})
    by_title(prompt, "Validation prompts")["inputs"].update(  # the workflow's 512² × 20 steps is for real models
        {"width": args.resolution, "height": args.resolution, "steps": args.sample_steps}
    )
    for title in ("Sample without adapter", "Sample with adapter"):
        by_title(prompt, title)["inputs"]["steps"] = args.sample_steps
    by_title(prompt, "Save adapter")["inputs"]["filename"] = "lora2/demo_adapter"
    by_title(prompt, "Save pruned")["inputs"]["filename"] = "lora2/demo_adapter_pruned"
    return prompt


class ProgressPrinter:
    """Prints which node runs and the training progress every 10 %."""

    def __init__(self, prompt: dict[str, Any]) -> None:
        self.titles = {key: node.get("_meta", {}).get("title", node["class_type"]) for key, node in prompt.items()}
        self.started = time.monotonic()
        self.last_tenth: dict[str, int] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        elapsed = time.monotonic() - self.started
        if event.get("type") == "executing" and data.get("node"):
            say(f"[{elapsed:6.1f}s] running {self.titles.get(data['node'], data['node'])}")
        elif event.get("type") == "progress" and data.get("max"):
            node = data.get("node")
            tenth = int(10 * data["value"] / data["max"])
            if tenth > self.last_tenth.get(node, -1):
                self.last_tenth[node] = tenth
                say(f"[{elapsed:6.1f}s]   {self.titles.get(node, node)}: {data['value']}/{data['max']}")


def save_outputs(server: ComfyServer, run, prompt: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    loras = BASE / "models" / "loras" / "lora2"
    for name, target in (
        ("demo_adapter", "adapter.safetensors"),
        ("demo_adapter_pruned", "adapter_pruned.safetensors"),
    ):
        shutil.copyfile(loras / f"{name}.safetensors", out / target)
        written[target] = out / target
    ids = {node.get("_meta", {}).get("title"): key for key, node in prompt.items()}
    images = {
        "Rank heatmap": "heatmap.png",
        "Preview without adapter": "sample_without_adapter.png",
        "Preview with adapter": "sample_with_adapter.png",
    }
    outputs = run.outputs()
    for title, target in images.items():
        (image,) = outputs[ids[title]]["images"][:1]
        data = server.view(image["filename"], image.get("subfolder", ""), image["type"])
        (out / target).write_bytes(data)
        written[target] = out / target
    adapter = load_adapter(out / "adapter.safetensors", with_resume=False)
    if has_history(adapter.history):
        chart = render_heatmap(build_rank_table(adapter), adapter.history, "LoRA² demo: rank and loss", 1024)
        chart.save(out / "heatmap_with_history.png")
        written["heatmap_with_history.png"] = out / "heatmap_with_history.png"
        render_history(adapter.history).save(out / "history.png")
        written["history.png"] = out / "history.png"
    return written


def summary(out: Path, seconds: float) -> str:
    adapter = load_adapter(out / "adapter.safetensors", with_resume=False)
    pruned = load_adapter(out / "adapter_pruned.safetensors", with_resume=False)
    table = build_rank_table(adapter, energy=False)
    history = adapter.history or {}
    lines = ["", "LoRA² demo summary", "=" * 60, table.to_text(), ""]
    ranks = list(adapter.ranks().values())
    lines.append(f"components            {len(ranks)}  (attention q/k/v/out of every transformer block)")
    lines.append(
        f"rank min/mean/max     {min(ranks)} / {sum(ranks) / len(ranks):.1f} / {max(ranks)}  (all started at 4)"
    )
    lines.append(f"adapter               {adapter.num_parameters():,} parameters, {adapter.megabytes():.2f} MB fp16")
    lines.append(f"pruned (90 % mass)    {pruned.num_parameters():,} parameters, {pruned.megabytes():.2f} MB fp16")
    if history.get("eval_loss"):
        first, last = history["eval_loss"][0], history["eval_loss"][-1]
        lines.append(f"eval loss             {first:.4f} -> {last:.4f}  (fixed batch, noise and noise levels)")
    lines.append(f"steps                 {adapter.steps}")
    lines.append(f"wall time             {seconds:.0f} s")
    lines.append("")
    lines.append("files in out/: " + ", ".join(sorted(p.name for p in out.iterdir())))
    lines.append("")
    lines.append("The tiny default model has RANDOM weights: its images are noise. For a real run, put an SD1.5")
    lines.append("checkpoint in .host/base/models/checkpoints and run, for example:")
    lines.append(
        "  .venv/bin/python demo/run_demo.py --checkpoint v1-5-pruned-emaonly.safetensors --steps 500 --resolution 512"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=TINY_CHECKPOINT, help="checkpoint in .host/base/models/checkpoints")
    parser.add_argument("--steps", type=int, default=120, help="training steps")
    parser.add_argument("--resolution", type=int, default=128, help="training and sampling resolution")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--sample-steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "out")
    parser.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    args = parser.parse_args(argv)
    if not host_available():
        raise SystemExit("the ComfyUI host is not installed; run `make host` (or `make demo`) first")
    started = time.monotonic()
    if args.checkpoint == TINY_CHECKPOINT:
        ensure_tiny_checkpoint()
        say("NOTE: the tiny default model has random weights, so every image it makes is noise.")
    subject = BASE / "input" / SUBJECT_FOLDER
    if not subject.is_dir():
        write_subject(subject, count=6, size=max(args.resolution, 128))
        say(f"wrote a generated subject (6 images with captions) -> {subject.relative_to(REPO)}")
    prompt = demo_prompt(args)
    server = ComfyServer(BASE, port=args.port)
    say(f"starting ComfyUI on {server.url} (log: {server.log_path.relative_to(REPO)})")
    server.start()
    try:
        run = server.run(prompt, timeout=3600, on_event=ProgressPrinter(prompt))
        written = save_outputs(server, run, prompt, args.out)
    finally:
        server.stop()
    for name, path in written.items():
        say(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path} ({name})")
    say(summary(args.out, time.monotonic() - started))
    Image.open(args.out / "heatmap.png").verify()


if __name__ == "__main__":
    main()
