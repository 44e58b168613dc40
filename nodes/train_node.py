"""LoRA² Train: adaptive-rank LoRA training on any MODEL ComfyUI loads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..lora2 import PRESETS, LoRA2Config
from ..lora2.adapter import Adapter
from ..lora2.errors import LoRA2Error
from ..lora2.lora_file import load_resume_state, save_adapter
from ..lora2.run import RunHooks, RunResult, checkpoint_name, train_run
from ..lora2.train import TrainConfig, available_optimizers
from ..lora2.validation import ValidationRun
from .comfy import files, io, patches, progress, training
from .comfy.sampling import saved_results, validation_run
from .types import CATEGORY, Dataset, Validation
from .types import Adapter as AdapterType
from .types import History as HistoryType

CUSTOM_TARGETS = "custom regex"
LORA2_MODE = "LoRA²"
MODES = {LORA2_MODE: True, "fixed rank": False}
"""The ``mode`` widget: ``LoRA2Config.adaptive``."""
LORA2_DEFAULTS, TRAIN_DEFAULTS = LoRA2Config(), TrainConfig()
"""Every widget's default comes from the config dataclasses: one source of truth."""


def _schema_inputs() -> list:
    return [
        io.Model.Input("model", tooltip="The diffusion model to personalise (SD1.5, SDXL, Flux, SD3, ...)."),
        Dataset.Input("dataset", tooltip="Encoded images and captions from LoRA² Dataset."),
        io.Int.Input(
            "steps",
            default=TRAIN_DEFAULTS.steps,
            min=1,
            max=200_000,
            tooltip="Optimizer steps to train for (in total).",
        ),
        io.Int.Input(
            "batch_size",
            default=TRAIN_DEFAULTS.batch_size,
            min=1,
            max=64,
            tooltip="Images per step (from one size bucket).",
        ),
        io.Float.Input(
            "learning_rate",
            default=TRAIN_DEFAULTS.lr,
            min=1e-7,
            max=1.0,
            step=1e-5,
            round=1e-7,
            tooltip="LoRA factors' rate.",
        ),
        io.Float.Input(
            "rank_learning_rate",
            default=TRAIN_DEFAULTS.nu_lr,
            min=0.0,
            max=1.0,
            step=1e-3,
            round=1e-6,
            tooltip="Learning rate of the rank parameters ν; used only by the 'gradient' rank control ablation "
            "(the default rank control follows gradient evidence and needs no rate).",
        ),
        io.Combo.Input(
            "optimizer", options=available_optimizers(), default=TRAIN_DEFAULTS.optimizer, tooltip="Optimizer."
        ),
        io.Int.Input(
            "init_rank", default=LORA2_DEFAULTS.init_rank, min=2, max=512, tooltip="Rank every component starts at."
        ),
        io.Int.Input(
            "max_rank",
            default=LORA2_DEFAULTS.max_rank,
            min=2,
            max=1024,
            tooltip="No component grows past this (memory cap).",
        ),
        io.Combo.Input(
            "targets",
            options=[*PRESETS, CUSTOM_TARGETS],
            default=LORA2_DEFAULTS.targets,
            tooltip="Which layers to adapt: attention q/k/v/out (paper default), plus feed-forward, every "
            "linear layer, everything incl. convolutions, or the regex below.",
        ),
        io.String.Input("custom_targets", default="", tooltip="Regex on layer names, used with 'custom regex'."),
        io.Float.Input(
            "importance_mass",
            default=LORA2_DEFAULTS.mass,
            min=0.5,
            max=0.99,
            step=0.01,
            tooltip="A component's rank is where its importance distribution reaches this mass.",
        ),
        io.Float.Input(
            "prior_strength",
            default=LORA2_DEFAULTS.prior_strength,
            min=0.0,
            max=1.0,
            step=1e-6,
            round=1e-8,
            tooltip="Weight of the priors (the ELBO's 1/N): larger = smaller ranks and weights.",
        ),
        io.Int.Input(
            "seed",
            default=TRAIN_DEFAULTS.seed,
            min=0,
            max=2**31 - 1,
            tooltip="Seed for initialisation, noise and data order.",
        ),
        io.Combo.Input(
            "training_dtype",
            options=["bfloat16", "float16", "float32"],
            default=TRAIN_DEFAULTS.dtype,
            tooltip="Compute precision (adapter weights stay float32).",
        ),
        io.Boolean.Input(
            "gradient_checkpointing",
            default=TRAIN_DEFAULTS.gradient_checkpointing,
            tooltip="Recompute activations: much less memory, ~30% slower.",
        ),
        io.Int.Input(
            "save_every",
            default=0,
            min=0,
            max=100_000,
            tooltip="Write a checkpoint (adapter + training state) to models/loras every N steps (0: off).",
        ),
        io.Int.Input(
            "eval_every",
            default=TRAIN_DEFAULTS.eval_every,
            min=0,
            max=100_000,
            optional=True,
            tooltip="Measure the loss on one fixed batch (same images, noise and noise levels) every N steps and at "
            "the start and end: it moves only when the model does. 0: about 10 times, at most every 10 steps.",
        ),
        io.String.Input(
            "checkpoint_name",
            default="lora2/checkpoint",
            tooltip="Name for periodic and Cancel checkpoints in models/loras (the step is appended).",
        ),
        io.Combo.Input(
            "resume",
            options=files.resume_choices(),
            default="none",
            tooltip="Continue a run from its .lora2state (weights, ν, ranks, optimizer state, step).",
        ),
        io.Combo.Input(
            "mode",
            options=list(MODES),
            default=LORA2_MODE,
            optional=True,
            tooltip="LoRA²: every component learns its own rank from init_rank up to max_rank. Fixed rank: plain "
            "LoRA at init_rank everywhere, through the same code, to A/B the two on your subject.",
        ),
        Validation.Input(
            "validation",
            optional=True,
            tooltip="From LoRA² Validation: sample its prompts at step 0, every validate_every steps and at the end, "
            "shown on this node and saved to output/lora2/<run_name>/. The trained adapter is the same with or "
            "without it.",
        ),
    ]


class LoRA2Train(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2Train",
            search_aliases=["train lora", "lora training", "adaptive rank lora", "dreambooth", "fine-tune"],
            display_name="LoRA² Train",
            category=CATEGORY,
            description="Trains a LoRA² adapter: every component learns its own rank. Cancel stops after the "
            "current step and keeps what was trained (also saved to models/loras).",
            inputs=_schema_inputs(),
            outputs=[
                io.Model.Output(
                    "trained_model",
                    display_name="trained model",
                    tooltip="The model with the trained adapter applied (for KSampler).",
                ),
                AdapterType.Output(
                    "adapter", display_name="adapter", tooltip="The trained adapter (save, prune, inspect)."
                ),
                HistoryType.Output(
                    "history", display_name="history", tooltip="Loss and every component's rank per step."
                ),
            ],
        )

    @classmethod
    def execute(cls, model, dataset, validation=None, **settings) -> io.NodeOutput:
        name = settings["resume"]
        resume = None if name == "none" else load_resume_state(files.resume_path(name))
        hooks = RunHooks(
            save=_checkpoint_writer(model, settings["checkpoint_name"]),
            on_progress=progress.Progress(settings["steps"]),
            should_stop=progress.interrupted,
        )
        samples = _add_validation(hooks, model, validation, settings["steps"])
        result = train_run(
            training.training_target(model, dataset),
            _lora2_config(settings),
            _train_config(settings),
            hooks,
            resume=resume,
            resume_source=f"'{name}'",
        )
        if result.stopped:  # saved already; ComfyUI must neither run the rest nor cache half a result
            progress.raise_cancelled()
        shown = {"images": saved_results(samples)} if samples is not None and samples.written else {}
        return io.NodeOutput(
            patches.apply_adapter(model, result.adapter, 1.0),
            result.adapter,
            result.history.to_dict(),
            ui={"text": [_summary(result)], **shown},
        )


def _add_validation(hooks: RunHooks, model, plan, total_steps: int) -> ValidationRun | None:
    """Validation samples at the run's start, every ``validate_every`` steps and at the end (see
    :mod:`lora2.validation`), drawn from the live model: the adapter as it is at that step."""
    if plan is None:
        return None
    run = validation_run(model, plan, total_steps)
    hooks.on_start.append(lambda trainer: run.observe(trainer, start=True))
    hooks.on_step.append(lambda event: run.observe(event.trainer))
    return run


def _lora2_config(settings: dict) -> LoRA2Config:
    targets = settings["targets"]
    if targets == CUSTOM_TARGETS:
        targets = settings["custom_targets"].strip()
        if not targets:
            raise LoRA2Error("targets is 'custom regex' but custom_targets is empty; write a regex on layer names")
    return LoRA2Config(
        targets=targets,
        adaptive=MODES[settings.get("mode", LORA2_MODE)],
        init_rank=settings["init_rank"],
        max_rank=settings["max_rank"],
        mass=settings["importance_mass"],
        prior_strength=settings["prior_strength"],
        seed=settings["seed"],
    )


def _train_config(settings: dict) -> TrainConfig:
    return TrainConfig(
        steps=settings["steps"],
        batch_size=settings["batch_size"],
        lr=settings["learning_rate"],
        nu_lr=settings["rank_learning_rate"],
        optimizer=settings["optimizer"],
        dtype=settings["training_dtype"],
        gradient_checkpointing=settings["gradient_checkpointing"],
        save_every=settings["save_every"],
        eval_every=settings.get("eval_every", TRAIN_DEFAULTS.eval_every),
        seed=settings["seed"],
    )


WIDGET_NAMES = {
    "lr": "learning_rate",
    "nu_lr": "rank_learning_rate",
    "dtype": "training_dtype",
    "mass": "importance_mass",
    "adaptive": "mode",
}
"""Config field -> the widget that sets it, where the names differ (for the resume report)."""


def _summary(result: RunResult) -> str:
    adapter = result.adapter
    text = (
        f"Trained {adapter.steps} steps: {len(adapter.components)} components, total rank "
        f"{sum(adapter.ranks().values())}, {adapter.megabytes():.2f} MB."
    )
    return text if result.resume is None else f"{result.resume.describe(WIDGET_NAMES)}\n{text}"


def _checkpoint_writer(model, name: str) -> Callable[[Adapter, int], Path]:
    """Periodic, Cancel and NaN checkpoints: ``models/loras/<checkpoint_name>_step000123`` (+ .lora2state)."""
    key_for = patches.kohya_key_for(model)

    def save(adapter: Adapter, step: int) -> Path:
        path = files.safe_lora_path(checkpoint_name(name, step))
        save_adapter(path, adapter, key_for)
        return path

    return save
