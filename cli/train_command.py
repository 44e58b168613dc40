"""``lora2-train``: one training run from a local model and a folder of images, into an output folder.

The run is :func:`lora2.run.train_run`, the same one the Train node calls; this module only supplies
what ComfyUI supplies there: the model and encoders (:mod:`cli.models`), a progress bar (tqdm), Cancel
(Ctrl-C: stop after the current step and write a checkpoint), where checkpoints go, and validation
grids drawn with the pipeline. Output folder::

    <name>.safetensors        the adapter (a standard LoRA: ComfyUI's LoraLoader, diffusers, kohya)
    <name>.lora2state         its training state (resume with --resume <name>.lora2state --steps N)
    <name>_heatmap.png        ranks per layer and the loss / rank history
    run.json                  settings, ranks, size, losses of the run (the sweep table reads it)
    checkpoints/<name>_step000123.safetensors (+ .lora2state): every --save-every steps and on Ctrl-C
    samples/step_000100.png   validation grids
    .lora2_cache/             encoded latents and captions (re-runs encode nothing)
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..lora2.adapter import Adapter
from ..lora2.config import DTYPES
from ..lora2.dataset import build_dataset, scan_folder
from ..lora2.errors import LoRA2Error
from ..lora2.heatmap import adapter_heatmap
from ..lora2.lora_file import load_resume_state, save_adapter, state_path
from ..lora2.paths import atomic_write, safe_child
from ..lora2.run import RunHooks, RunResult, checkpoint_name, train_run
from ..lora2.train import StepReport
from ..lora2.validation import ValidationRun
from . import models
from .flags import Configs

log = logging.getLogger("LoRA²")
EXIT_CANCELLED = 130
"""Exit status of a run stopped by Ctrl-C (the shell's own for SIGINT)."""


class StopFlag:
    """Ctrl-C once: finish the current step, write a checkpoint, exit. Twice: abort at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def request(self, *_: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("LoRA²: stopping after this step (Ctrl-C again to abort without a checkpoint)")


@contextmanager
def ctrl_c_stops(flag: StopFlag) -> Iterator[StopFlag]:
    """Route SIGINT to ``flag`` while the block runs (main thread only; elsewhere signals stay as they are)."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, flag.request)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def pick_device(text: str) -> torch.device:
    if text != "auto":
        return torch.device(text)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dtype(text: str, device: torch.device) -> torch.dtype:
    if text == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[text]


@dataclass
class Outputs:
    """Where one run writes (all inside its output folder)."""

    folder: Path
    name: str

    @property
    def adapter(self) -> Path:
        return safe_child(self.folder, self.name, ".safetensors", (".safetensors",))

    @property
    def heatmap(self) -> Path:
        return self.adapter.with_name(self.adapter.stem + "_heatmap.png")

    @property
    def summary(self) -> Path:
        return self.folder / "run.json"

    @property
    def samples(self) -> Path:
        return self.folder / "samples"

    @property
    def cache(self) -> Path:
        return self.folder / ".lora2_cache"

    def checkpoint(self, step: int) -> Path:
        return safe_child(self.folder / "checkpoints", checkpoint_name(self.adapter.stem, step), ".safetensors")


def _tqdm_progress(total: int, start: int, enabled: bool) -> tuple[Callable[[StepReport], None], Callable[[], None]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, unit="step", desc="LoRA²", disable=not enabled, dynamic_ncols=True)

    def update(report: StepReport) -> None:
        bar.n = report.step
        bar.set_postfix(loss=f"{report.loss:.4f}", rank=report.total_rank, MB=f"{report.adapter_megabytes:.2f}")
        bar.refresh()

    return update, bar.close


def _dataset(configs: Configs, model: models.LocalModel, cache: Path | None, progress: bool, should_stop=None):
    from tqdm.auto import tqdm

    options = configs.options
    items = scan_folder(Path(options.data).expanduser(), options.caption_template, options.trigger)
    bar = tqdm(total=1, desc="encoding", unit="item", disable=not progress, dynamic_ncols=True)

    def advance(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    try:
        return build_dataset(
            items,
            configs.dataset,
            models.image_encoder(model),
            models.text_encoder(model),
            cache if options.cache else None,
            models.model_key(model),
            progress=advance,
            should_stop=should_stop,
        )
    finally:
        bar.close()


def _validation(configs: Configs, model: models.LocalModel, outputs: Outputs) -> ValidationRun | None:
    if not configs.options.validate:
        return None
    v = configs.validation
    prompts = configs.options.prompts()
    sample = models.sampler(model, prompts, v.steps, v.width, v.height, v.cfg, v.seed)
    return ValidationRun(v, prompts, sample, outputs.samples, device=model.device)


def _refuse_overwrite(outputs: Outputs, configs: Configs) -> None:
    if outputs.adapter.exists() and not configs.options.overwrite:
        raise LoRA2Error(
            f"'{outputs.adapter}' exists; pass --overwrite to replace it, another --name, "
            f"or --resume '{state_path(outputs.adapter)}' with a larger --steps to continue it"
        )


def _resume(text: str):
    if not text.strip():
        return None, ""
    path = Path(text).expanduser()
    if path.suffix == ".safetensors":
        path = state_path(path)
    if not path.is_file():
        raise LoRA2Error(f"resume file '{path}' does not exist (pass a .lora2state or the .safetensors beside it)")
    return load_resume_state(path), f"'{path}'"


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True)
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def run_summary(result: RunResult, configs: Configs, outputs: Outputs, model: models.LocalModel) -> dict[str, Any]:
    """What ``run.json`` holds: the table's columns and the settings that produced them."""
    adapter, history = result.adapter, result.history
    lora2, train = (result.resume.lora2, result.resume.train) if result.resume else (configs.lora2, configs.train)
    ranks = list(adapter.ranks().values())
    return {
        "status": "cancelled" if result.stopped else "finished",
        "adapter": outputs.adapter.name,
        "model": str(model.source),
        "family": model.family,
        "steps": adapter.steps,
        "components": len(ranks),
        "total_rank": sum(ranks),
        "mean_rank": sum(ranks) / max(len(ranks), 1),
        "adapter_mb": adapter.megabytes(),
        "final_loss": history.loss[-1] if history.loss else None,
        "final_eval_loss": history.eval_loss[-1] if history.eval_loss else None,
        "lora2": lora2.to_dict(),
        "train": train.to_dict(),
        "dataset": configs.dataset.to_dict(),
    }


def write_heatmap(adapter: Adapter, path: Path, title: str, width: int) -> Path:
    image = adapter_heatmap(adapter, title=title, width=width)
    atomic_write(path, lambda temporary: image.save(temporary, format="PNG"))
    return path


def train(
    configs: Configs,
    model: models.LocalModel | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = True,
    cache: Path | None = None,
) -> tuple[dict[str, Any], Adapter]:
    """Run one training into ``configs.options.output``; returns the ``run.json`` summary and the adapter.

    Args:
        model: an already loaded model (the sweep loads it once per process); None loads ``--model``.
        should_stop: Cancel (the caller's Ctrl-C flag); the run stops after a step and checkpoints.
        cache: the dataset cache folder (None: ``<output>/.lora2_cache``; the sweep shares one).
    """
    options = configs.options
    options.check()
    outputs = Outputs(Path(options.output).expanduser(), options.name)
    outputs.folder.mkdir(parents=True, exist_ok=True)
    _refuse_overwrite(outputs, configs)
    resume, source = _resume(options.resume)
    if model is None:
        device = pick_device(options.device)
        config = Path(options.model_config).expanduser() if options.model_config else None
        model = models.load_model(
            Path(options.model).expanduser(), config, device, model_dtype(options.model_dtype, device)
        )
    dataset = _dataset(configs, model, cache or outputs.cache, progress, should_stop)
    log.info("LoRA² dataset: %s", dataset.describe())
    validation = _validation(configs, model, outputs)
    start = int(resume.handle_state.get("__step__", 0)) if resume is not None else 0
    update, close = _tqdm_progress(configs.train.steps, start, progress)

    def save(adapter: Adapter, step: int) -> Path:
        path = outputs.checkpoint(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_adapter(path, adapter)
        return path

    hooks = RunHooks(save=save, on_progress=update, should_stop=should_stop)
    if validation is not None:
        hooks.on_start.append(lambda trainer: validation.observe(trainer, start=True))
        hooks.on_step.append(lambda event: validation.observe(event.trainer))
    target = models.training_target(model, lambda batch_size, generator: dataset.batches(batch_size, generator))
    try:
        result = train_run(target, configs.lora2, configs.train, hooks, resume=resume, resume_source=source or "")
    finally:
        close()
    summary = run_summary(result, configs, outputs, model)
    if result.stopped:
        summary["checkpoint"] = str(result.checkpoint)
        write_json(outputs.folder / "cancelled.json", summary)
        return summary, result.adapter
    save_adapter(outputs.adapter, result.adapter)
    write_heatmap(result.adapter, outputs.heatmap, f"{outputs.adapter.stem} · {model.family}", options.heatmap_width)
    write_json(outputs.summary, summary)
    return summary, result.adapter
