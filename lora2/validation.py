"""Validation samples while training: when to sample, how the grid looks, where it goes, and why
sampling cannot change the run it watches.

A user training a LoRA wants to *see* it learn, not read a loss that jumps with every noise level. At
step 0, every ``every`` steps and at the last step, :class:`ValidationRun` asks a ``sample`` callable
(the host's own sampler on the model with the adapter attached, see ``nodes/``) for one image per
prompt, draws them as one grid with the step and the total rank over it, writes it to
``<folder>/step_NNNNNN.png`` and hands it to ``show`` (the node's progress preview).

Why sampling leaves training bit-identical: a sampler draws its noise from the *global* RNGs
(ComfyUI's ``prepare_noise`` even calls ``torch.manual_seed``), runs the adapters' forward and may
touch the trainer's generators through shared code. :func:`preserved_rng` snapshots every RNG a
sampler can reach (torch CPU and the training device through :func:`torch.random.fork_rng`, Python's
``random``, NumPy's legacy global state, and the trainer's own generators) and puts them back; the
sampling runs under ``torch.no_grad()``, so the adapters' gradient sketches observe nothing, and the
optimizer and the ranks are never handed to it. ``tests/test_validation.py`` proves the trained adapter
equal bit for bit with and without validation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import LoRA2Error
from .heatmap_draw import INK, MUTED, displayable, draw_text, text_size
from .paths import atomic_write, inside, safe_child

log = logging.getLogger("LoRA²")

GRID_PREFIX = "step_"
MAX_PROMPTS = 64
"""More prompts than this make a grid nobody can read and a validation round longer than training."""


@dataclass
class ValidationConfig:
    """How validation samples are drawn while training (the Validation node's widget defaults).

    Example: ``steps=500, every=100`` samples at steps 0, 100, 200, 300, 400 and 500; six grids, each
    with one ``width`` x ``height`` image per prompt, all from the same ``seed`` so that the grids differ
    only by what the adapter learned in between.
    """

    every: int = 100
    """Sample every this many optimizer steps (and always at step 0 and at the last step)."""
    seed: int = 0
    """Noise seed of every validation image (the same at every round: comparable grids)."""
    steps: int = 20
    """Sampler steps per image."""
    width: int = 512
    height: int = 512
    cfg: float = 5.0
    """Classifier-free guidance scale (used when a negative prompt can be encoded; 1 = none)."""
    sampler: str = "euler"
    scheduler: str = "normal"
    run_name: str = "my_subject"
    """Grids go to ``output/lora2/<run_name>/`` (a numbered sibling when that folder holds an earlier run)."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise LoRA2Error(f"validate_every must be at least 1 step, got {self.every}")
        if self.steps < 1:
            raise LoRA2Error(f"validation sampler steps must be at least 1, got {self.steps}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 16 or value % 8:
                raise LoRA2Error(f"validation {name} must be a multiple of 8 and at least 16, got {value}")
        if self.cfg <= 0:
            raise LoRA2Error(f"validation cfg must be positive, got {self.cfg}")


def is_due(step: int, total_steps: int, every: int) -> bool:
    """Whether validation samples at ``step`` of a run: every ``every`` steps (step 0 too) and the last step."""
    return step == total_steps or step % every == 0


def schedule(total_steps: int, every: int, start: int = 0) -> list[int]:
    """The steps a run that starts at ``start`` samples at: its start (a resumed run shows where it
    resumed from), every due step after it, and the last step."""
    return [start, *(step for step in range(start + 1, total_steps + 1) if is_due(step, total_steps, every))]


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line, surrounding spaces removed."""
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if len(prompts) > MAX_PROMPTS:
        raise LoRA2Error(f"{len(prompts)} validation prompts; use at most {MAX_PROMPTS} (one per line)")
    return prompts


def grid_name(step: int) -> str:
    """``step_000120.png``: sorts by step in every file browser."""
    return f"{GRID_PREFIX}{step:06d}.png"


def run_folder(root: Path, run_name: str) -> Path:
    """``root/<run_name>``, or the first ``<run_name>_2``, ``_3``, ... that holds no grid yet.

    An earlier run's grids are never overwritten: a second run with the same name gets its own folder,
    the way LoRA² Save numbers a file name that is taken. Sub-folders in the name are allowed; leaving
    ``root`` (``..``, absolute paths, symlinks out) is refused.
    """
    folder = safe_child(root, run_name, "", what="validation run name")  # the pack's one name rule
    for number in range(1, 10_000):
        candidate = folder if number == 1 else folder.with_name(f"{folder.name}_{number}")
        candidate = inside(candidate, root, f"validation run name {run_name!r}")
        if not candidate.is_dir() or not any(candidate.glob(f"{GRID_PREFIX}*.png")):
            return candidate
    raise LoRA2Error(f"'{folder}' and 10,000 numbered variants hold grids; choose another validation run name")


def grid_columns(count: int) -> int:
    """Columns of a near-square grid (4 prompts: 2 x 2; 5-6: 3 x 2; 25: 5 x 5)."""
    return max(1, math.ceil(math.sqrt(count)))


def render_grid(
    images: Sequence[Image.Image], prompts: Sequence[str], step: int, total_steps: int, total_rank: int
) -> Image.Image:
    """One tile per image, its prompt under it, and ``step N / T · total rank R`` over the grid.

    The overlay is what makes a folder of grids readable on its own: the file name gives the step, the
    picture gives the step and the rank the adapter had when it was drawn.
    """
    if not images:
        raise LoRA2Error("no validation images to draw")
    tile_w = max(image.width for image in images)
    tile_h = max(image.height for image in images)
    columns = grid_columns(len(images))
    rows = math.ceil(len(images) / columns)
    size = max(11, min(24, tile_w // 18))
    line_h = text_size("Ag", size)[1] + 8
    header_h = text_size("Ag", size + 4)[1] + 16
    pad = max(4, size // 3)
    width = columns * tile_w + (columns + 1) * pad
    height = header_h + rows * (tile_h + line_h) + (rows + 1) * pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    header = f"step {step} / {total_steps}  ·  total rank {total_rank}"
    draw_text(draw, (pad, header_h // 2), displayable(header), size + 4, INK, "lm")
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        x = pad + column * (tile_w + pad)
        y = header_h + pad + row * (tile_h + line_h + pad)
        grid.paste(image.convert("RGB"), (x, y))
        label = prompts[index] if index < len(prompts) else ""
        draw_text(draw, (x, y + tile_h + 4), _fit(label, tile_w, size), size, MUTED, "lt")
    return grid


def _fit(text: str, width: int, size: int) -> str:
    """``text`` cut with an ellipsis so that it fits ``width`` pixels at ``size``."""
    text = displayable(text)
    if text_size(text, size)[0] <= width:
        return text
    while text and text_size(text + "...", size)[0] > width:
        text = text[:-1]
    return text + "..."


def write_grid(path: Path, grid: Image.Image) -> Path:
    """Write ``grid`` as PNG atomically (a crash leaves no half picture)."""
    atomic_write(path, lambda temporary: grid.save(temporary, format="PNG"))
    return path


@contextlib.contextmanager
def preserved_rng(device: torch.device | str = "cpu", generators: Sequence[torch.Generator] = ()) -> Iterator[None]:
    """Run the block and put back every RNG state it could have changed.

    torch's CPU RNG and the training device's (``torch.random.fork_rng``), Python's ``random``, NumPy's
    global state and the given generators (the trainer's noise and data order generators).
    """
    device = torch.device(device)
    saved = [(generator, generator.get_state()) for generator in generators]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    accelerated = device.type not in ("cpu", "meta")
    devices = [device.index if device.index is not None else 0] if accelerated else []
    device_type = device.type if accelerated else "cuda"
    try:
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for generator, state in saved:
            generator.set_state(state)


Sampler = Callable[[], list[Image.Image]]
"""Draws one picture per validation prompt with the model as it is now (the adapter attached)."""
Shower = Callable[[int, Image.Image], None]
"""Shows a grid drawn at a step (ComfyUI: the Train node's progress preview)."""


class TrainerLike(Protocol):
    step: int
    config: Any
    handle: Any
    history: Any
    generator: torch.Generator


@dataclass
class ValidationRun:
    """The validation of one training run: call :meth:`observe` with the trainer at each step it reaches.

    Args:
        config: the schedule (``every``).
        prompts: the label of each image (the grid writes it under the tile).
        sample: draws the images (see :data:`Sampler`); it runs inside :func:`preserved_rng` and
            ``torch.no_grad()``.
        folder: where the grids go (see :func:`run_folder`).
        show: shows each grid (optional).
        device: the training device, whose RNG is preserved too.
        generators: more generators to preserve besides the trainer's (e.g. the data order's).
    """

    config: ValidationConfig
    prompts: list[str]
    sample: Sampler
    folder: Path
    show: Shower | None = None
    device: torch.device | str = "cpu"
    generators: Sequence[torch.Generator] = ()
    written: list[Path] = field(default_factory=list)
    last_step: int | None = None

    def draw(self, step: int, total_steps: int, total_rank: int, generators: Sequence[torch.Generator] = ()) -> Path:
        """Sample, draw, write and show the grid of ``step``; returns its path."""
        with preserved_rng(self.device, [*self.generators, *generators]), torch.no_grad():
            images = self.sample()
        grid = render_grid(images, self.prompts, step, total_steps, total_rank)
        path = write_grid(self.folder / grid_name(step), grid)
        self.written.append(path)
        self.last_step = step
        if self.show is not None:
            self.show(step, grid)
        log.info("LoRA² validation at step %d (total rank %d): %s", step, total_rank, path)
        return path

    def observe(self, trainer: TrainerLike, start: bool = False) -> Path | None:
        """Draw when the trainer's step is due (or is the run's ``start``) and not drawn yet; the step
        goes into ``trainer.history.validation_steps`` for the heatmap's history panel."""
        step, total = trainer.step, trainer.config.steps
        if step == self.last_step or not (start or is_due(step, total, self.config.every)):
            return None
        total_rank = sum(trainer.handle.ranks().values())
        path = self.draw(step, total, total_rank, [trainer.generator])
        trainer.history.validation_steps.append(step)
        return path
