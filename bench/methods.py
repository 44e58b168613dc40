"""The students a training benchmark compares, and how each one is trained.

Why one place: the diffusion rank-recovery and personalisation benchmarks train every method the same
way (a copy of the base, the method's adapter attached, the ordinary :class:`~lora2.train.Trainer` over
seeded batches at the ``train.*`` settings) and differ only in what the loss compares against; that
difference is the ``objective`` hook.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..lora2 import LoRA2Handle, attach
from ..lora2.train import Trainer
from .image_data import ImageSet, batch_stream
from .settings import train_config
from .tiny_diffusion import Family


@dataclass
class Method:
    """One student: a name and its adapter config."""

    name: str
    config: Any


@dataclass
class Trained:
    handle: LoRA2Handle
    model: nn.Module
    seconds: float
    losses: list[float] = field(default_factory=list)


Objective = Callable[[nn.Module, Callable, Any], tuple[Callable, Any]]
"""``(student model, its denoiser, noise rule) -> (denoiser, noise rule)`` the Trainer is given instead of the
family's own (the model, with the adapter attached, for objectives that call its layers directly)."""


def train_method(
    method: Method,
    base: nn.Module,
    fam: Family,
    data: ImageSet,
    train_settings: dict[str, Any],
    progress: Callable[[str], None] | None = None,
    objective: Objective | None = None,
) -> Trained:
    """Attach ``method`` to a copy of ``base`` and train it on ``data`` with the Trainer; returns it trained.

    The loss is the family's denoising loss, or what ``objective`` makes of its denoiser and noise rule.
    ``progress(method.name)`` is called once per step.
    """
    started = time.perf_counter()
    model = copy.deepcopy(base)
    handle = attach(model, method.config)
    config = train_config(train_settings)
    denoiser, rule = fam.denoiser(model), fam.rule()
    if objective is not None:
        denoiser, rule = objective(model, denoiser, rule)
    batches = batch_stream(data, fam, config.batch_size, config.seed)
    on_step = (lambda report: progress(method.name)) if progress is not None else None
    result = Trainer(denoiser, rule, batches, handle, config, on_step=on_step).run()
    return Trained(handle, model, time.perf_counter() - started, result.history.loss)
