"""The README's validation pictures, from a real run of example workflow 4 in a real ComfyUI server.

Runs ``example_workflows/api/lora2_validate_and_evaluate.json`` (train with validation samples → sample
the 25 DreamBooth object prompts with the trained model → LoRA² Evaluate → table) on the tiny seeded
checkpoint and writes

- ``docs/validation_grid.png``: the last validation grid LoRA² Train wrote to ``output/lora2/<run>/``;
- ``docs/validation_first_grid.png``: the step-0 grid of the same run;
- ``docs/metrics_table.png``: LoRA² Evaluate's table as the workflow's "Metrics table" node saved it.

Honest about what it is: the tiny checkpoint and the DINO/CLIP models (``tiny_eval_models``) have random
weights, so the pictures are noise and the scores are near 0; they show the pipeline and the layout of
what a user gets, not quality. The subject is real DreamBooth photos when ``../shared`` has them.

    OMP_NUM_THREADS=1 .venv/bin/python devtools/validation_docs.py [--steps 30] [--keep /tmp/base]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from comfyui_lora2.devtools.build_workflows import apply_overrides, load_tiny_run, prepare_base
from comfyui_lora2.devtools.comfy_server import running_server
from comfyui_lora2.devtools.tiny_eval_models import save_tiny_eval_models

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "example_workflows" / "api" / "lora2_validate_and_evaluate.json"
DREAMBOOTH = REPO.parent / "shared" / "data" / "dreambooth_256"
SUBJECT = "robot_toy"
"""A DreamBooth subject of class 'toy', which the workflow's prompts name ('a sks toy ...')."""
RUN_NAME = "my_subject"


def log(message: str) -> None:
    print(f"validation_docs: {message}", flush=True)


def real_subject(folder: Path, size: int, count: int = 5) -> bool:
    """Replace the generated subject with real DreamBooth photos when they are on this machine."""
    photos = sorted((DREAMBOOTH / SUBJECT).glob("*.jpg"))[:count]
    if not photos:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for index, photo in enumerate(photos):
        Image.open(photo).convert("RGB").resize((size, size), Image.Resampling.LANCZOS).save(
            folder / f"{index:02d}.png"
        )
    return True


def overrides(tiny: dict, steps: int, every: int) -> dict[str, dict]:
    """The tiny run's overrides for the titles workflow 4 has, plus its own evaluation part."""
    prompt = json.loads(WORKFLOW.read_text())
    titles = {node.get("_meta", {}).get("title") for node in prompt.values()}
    chosen = {title: dict(values) for title, values in tiny["overrides"].items() if title in titles}
    chosen["Train LoRA²"].update(steps=steps, learning_rate=1e-3)
    chosen["Validation prompts"].update(validate_every=every, width=192, height=192, steps=4)  # readable tiles
    chosen["DreamBooth prompts (object)"] = {"width": 64, "height": 64, "steps": 2}
    return chosen


def generate(base: Path, steps: int, every: int) -> None:
    tiny = load_tiny_run()
    started = time.monotonic()
    base = prepare_base(base, tiny)
    size = tiny["overrides"]["Subject images"]["resolution"]
    real = real_subject(base / "input" / tiny["subject"]["folder"], size)
    log(f"subject: {'DreamBooth ' + SUBJECT if real else 'generated toy'} at {size} px")
    save_tiny_eval_models(base / "models" / "lora2_eval")
    prompt = apply_overrides(json.loads(WORKFLOW.read_text()), overrides(tiny, steps, every))
    with running_server(base) as server:
        log(f"running workflow 4 ({steps} steps, validation every {every}) on {server.url}")
        server.run(prompt, timeout=1200)
    grids = sorted((base / "output" / "lora2" / RUN_NAME).glob("step_*.png"))
    tables = sorted((base / "output" / "lora2").glob("my_subject_metrics_*.png"))
    if not grids or not tables:
        raise RuntimeError(f"the run wrote {len(grids)} grids and {len(tables)} tables under {base / 'output'}")
    docs = REPO / "docs"
    docs.mkdir(exist_ok=True)
    for source, name in (
        (grids[-1], "validation_grid.png"),
        (grids[0], "validation_first_grid.png"),
        (tables[-1], "metrics_table.png"),
    ):
        shutil.copyfile(source, docs / name)
        log(f"{source.name} -> docs/{name} ({Image.open(source).size[0]}x{Image.open(source).size[1]})")
    log(f"grids at steps {[int(p.stem.split('_')[1]) for p in grids]}; done in {time.monotonic() - started:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps of the tiny run")
    parser.add_argument("--every", type=int, default=10, help="validate_every of the tiny run")
    parser.add_argument("--keep", type=Path, help="use (and keep) this base directory instead of a temporary one")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base = args.keep or Path(tempfile.mkdtemp(prefix="lora2-docs-"))
    try:
        generate(base, args.steps, args.every)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
