"""A MODEL and a LoRA² dataset as one :class:`lora2.run.TrainingTarget`: what LoRA² Train hands the core."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import comfy.model_management
import torch

from ...lora2.run import TrainingTarget
from .model import base_model, make_denoiser, model_family, noise_rule, process_latents
from .patches import kohya_key_for


def training_target(model, dataset) -> TrainingTarget:
    """A MODEL and a LoRA² dataset as the plain pieces :func:`lora2.run.train_run` trains (model loaded fully)."""
    comfy.model_management.load_models_gpu([model], force_full_load=True)

    def batches(batch_size: int, generator: torch.Generator) -> Iterator:
        for batch in dataset.batches(batch_size, generator):
            yield dataclasses.replace(batch, latents=process_latents(model, batch.latents))

    return TrainingTarget(
        module=base_model(model).diffusion_model,
        denoiser=make_denoiser(model),
        rule=noise_rule(model),
        batches=batches,
        device=model.load_device,
        family=model_family(model),
        key_for=kohya_key_for(model),
        inplace_residuals=True,
        interrupt_errors=(comfy.model_management.InterruptProcessingException,),
    )
