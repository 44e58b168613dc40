"""LoRA² Train: adaptive-rank LoRA training on any MODEL ComfyUI loads."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import comfy.model_management
import torch
from comfy_api.latest import io

from ..lora2 import PRESETS, LoRA2Config, attach
from ..lora2.adapter import Adapter, ResumeState
from ..lora2.checkpointing import find_blocks
from ..lora2.errors import LoRA2Error
from ..lora2.lora_file import load_resume_state, save_adapter, with_file_keys
from ..lora2.resume_check import check_resume_optimizer
from ..lora2.train import History, TrainConfig, Trainer, available_optimizers
from . import host
from .types import CATEGORY, Dataset
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
        io.String.Input(
            "checkpoint_name",
            default="lora2/checkpoint",
            tooltip="Name for periodic and Cancel checkpoints in models/loras (the step is appended).",
        ),
        io.Combo.Input(
            "resume",
            options=host.resume_choices(),
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
    ]


class LoRA2Train(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2Train",
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
    def execute(cls, model, dataset, **settings) -> io.NodeOutput:
        with torch.inference_mode(False), torch.enable_grad():
            adapter, history = _train(model, dataset, settings)
        return io.NodeOutput(host.apply_adapter(model, adapter, 1.0), adapter, history)


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
        seed=settings["seed"],
    )


def _batches(model, dataset, batch_size: int, generator: torch.Generator) -> Iterator:
    for batch in dataset.batches(batch_size, generator):
        yield dataclasses.replace(batch, latents=host.process_latents(model, batch.latents))


def _train(model, dataset, settings: dict) -> tuple[Adapter, dict]:
    """Attach, train, fold into an Adapter, detach (always: the hooks sit on the shared model).

    Cancel: the trainer stops after the current step; the adapter trained so far is written to
    models/loras (with its resume state) and the interrupt is raised again, so that ComfyUI neither
    runs the rest of the graph nor caches a half-trained result as this node's output.
    """
    resume = None if settings["resume"] == "none" else load_resume_state(host.resume_path(settings["resume"]))
    if resume is not None:
        check_resume_optimizer(resume, settings["optimizer"], settings["resume"])
    lora2_config = LoRA2Config.from_dict(resume.train_config["lora2"]) if resume else _lora2_config(settings)
    train_config = _train_config(settings)
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    diffusion = host.base_model(model).diffusion_model
    host.make_trainable(diffusion)
    handle = attach(diffusion, lora2_config)
    try:
        if resume is not None:
            handle.load_state_dict(resume.handle_state)
        data_generator = torch.Generator().manual_seed(train_config.seed)
        eval_batch = next(_batches(model, dataset, train_config.batch_size, torch.Generator().manual_seed(1)))
        trainer = Trainer(
            denoiser=host.make_denoiser(model),
            rule=host.noise_rule(model),
            batches=_batches(model, dataset, train_config.batch_size, data_generator),
            handle=handle,
            config=train_config,
            device=model.load_device,
            checkpoint_modules=find_blocks(diffusion),
            on_step=host.Progress(train_config.steps),
            should_stop=host.interrupted,
            on_checkpoint=lambda step, t: _save_checkpoint(model, _adapter(model, t), settings, step),
            eval_batch=eval_batch,
        )
        if resume is not None:
            history = History.from_dict(resume.train_config["history"])
            trainer.resume(handle.step_count, resume.optimizer_state, history, resume.generator_state)
        try:
            with host.inplace_safe_norms(diffusion):
                stopped = trainer.run().stopped_early
        except comfy.model_management.InterruptProcessingException:
            stopped = True
        adapter = _adapter(model, trainer)
        if stopped:
            path = _save_checkpoint(model, adapter, settings, trainer.step)
            host.log.warning("LoRA² training cancelled at step %d; saved what was trained to %s", trainer.step, path)
            raise comfy.model_management.InterruptProcessingException()
    finally:
        handle.detach()
    return adapter, trainer.history.to_dict()


def _adapter(model, trainer: Trainer) -> Adapter:
    handle = trainer.handle
    resume = ResumeState(
        handle_state=handle.state_dict(),
        optimizer_state=trainer.optimizer.state_dict(),
        generator_state=trainer.generator.get_state(),
        train_config={
            "train": dataclasses.asdict(trainer.config),
            "lora2": handle.config.to_dict(),
            "history": trainer.history.to_dict(),
        },
    )
    adapter = Adapter.from_handle(handle, host.model_family(model), trainer.history.to_dict(), resume)
    return with_file_keys(adapter, host.kohya_key_for(model))  # the model's names survive a Save without MODEL


def _save_checkpoint(model, adapter: Adapter, settings: dict, step: int):
    path = host.safe_lora_path(f"{settings['checkpoint_name']}_step{step:06d}")
    save_adapter(path, adapter, host.kohya_key_for(model))
    return path
