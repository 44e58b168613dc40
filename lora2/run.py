"""One training run, start to finish: attach → train → fold → detach, with resume and checkpoints.

Every caller (the Train node, plain Python, the CLI) trains through :func:`train_run`, so they all get
the same run: the same resume rules, the same checkpoint names, the same Cancel and NaN behaviour, the
same evaluation batch. A caller brings the model as plain callables (:class:`TrainingTarget`; ComfyUI's
layer builds one from a MODEL in ``nodes/comfy/model.py``) and its side effects as :class:`RunHooks`
(where checkpoints go, a progress bar, Cancel, per-step hooks such as validation samples).

Resume (``resume=`` a :class:`~lora2.adapter.ResumeState`, e.g. from
:func:`lora2.lora_file.load_resume_state`): a saved run continues as the run it was. What the adapter is
(the whole :class:`~lora2.config.LoRA2Config`) and what decides the numbers it learns (learning rates,
optimizer, batch size, seed, schedule) are read back from the file; only the fields in
:data:`CALLER_FIELDS` (how long and how to compute) come from the caller. :func:`plan_resume` says
which is which, and lists every setting the caller asked for that the file overrides, so that a changed
widget is never ignored silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapter import Adapter, ResumeState
from .attach import LoRA2Handle, attach
from .checkpointing import find_blocks
from .config import LoRA2Config
from .errors import LoRA2Error
from .lora_file import with_file_keys
from .lora_keys import default_key
from .model_prep import inplace_safe_norms, make_trainable, ordinary_tensors
from .resume_check import check_resume_optimizer
from .train import BatchLike, Denoiser, History, NoiseRuleLike, StepReport, TrainConfig, Trainer

log = logging.getLogger("LoRA²")

CALLER_FIELDS: tuple[str, ...] = ("steps", "save_every", "eval_every", "gradient_checkpointing", "dtype")
""":class:`TrainConfig` fields a resumed run takes from the caller: the new total length, how often to
save and evaluate, and how to compute (memory, precision). Every other setting is read from the file,
because changing it would not continue the saved run but start a different one on top of it."""


def checkpoint_name(name: str, step: int) -> str:
    """The name of a periodic, Cancel or NaN checkpoint: ``<name>_step000123`` (sorts by step)."""
    return f"{name}_step{step:06d}"


def eval_generator(seed: int) -> torch.Generator:
    """The generator the evaluation batch is drawn with: the run's own seed.

    So the evaluation batch is the first batch of the run's data order: fixed for a seed, present in
    every dataset (however small), and no second seed to choose. Its noise and noise levels are fixed
    separately by :meth:`lora2.train.Trainer.evaluate`.
    """
    return torch.Generator().manual_seed(seed)


@dataclass
class TrainingTarget:
    """The model to train, as the plain pieces :class:`~lora2.train.Trainer` takes."""

    module: nn.Module
    """The network the adapters attach to (frozen by the run; e.g. a diffusers UNet, ComfyUI's diffusion_model)."""
    denoiser: Denoiser
    """``(model_input, timestep, conditioning) -> output`` through ``module``."""
    rule: NoiseRuleLike
    """Noise levels, forward process and loss weighting (see :mod:`lora2.noise`)."""
    batches: Callable[[int, torch.Generator], Iterator[BatchLike]]
    """``(batch_size, generator)`` -> a fresh, endless batch stream in the order the generator picks (called
    for training and for the evaluation batch; the batch size is the run's, which a resume reads from its file)."""
    device: torch.device | str = "cpu"
    family: str = "unknown"
    """Model family recorded in the adapter (ComfyUI's name: ``SD15``, ``SDXL``, ``Flux``, ...)."""
    key_for: Callable[[str], str] = default_key
    """Component name -> LoRA key in saved files (the model's own names survive a Save without it)."""
    checkpoint_modules: Sequence[nn.Module] | None = None
    """Blocks run under gradient checkpointing when it is on; None: :func:`lora2.checkpointing.find_blocks`."""
    inplace_residuals: bool = False
    """The model updates residuals in place (ComfyUI's DiTs): train under ``model_prep.inplace_safe_norms``."""
    interrupt_errors: tuple[type[BaseException], ...] = ()
    """Exceptions a host raises from inside a step to cancel (ComfyUI's interrupt): treated as Cancel."""


@dataclass
class StepEvent:
    """What a per-step hook receives: the step's report and the live run.

    ``module`` holds the adapters as they are after this step (the hooks are attached), so a hook can
    sample or measure the model in its current state; :meth:`adapter` folds the same state into an
    :class:`~lora2.adapter.Adapter` (a copy, e.g. to apply it to a host's model object). A hook must leave
    the model as it found it (no grad, train/eval mode restored).
    """

    report: StepReport
    trainer: Trainer
    target: TrainingTarget

    @property
    def step(self) -> int:
        return self.report.step

    @property
    def handle(self) -> LoRA2Handle:
        return self.trainer.handle

    @property
    def module(self) -> nn.Module:
        return self.target.module

    def adapter(self) -> Adapter:
        return fold(self.trainer, self.target)


StepHook = Callable[[StepEvent], None]


@dataclass
class RunHooks:
    """A run's side effects, all optional (plain Python may pass none)."""

    save: Callable[[Adapter, int], Any] | None = None
    """Write a checkpoint ``(adapter, step) -> where``: every ``save_every`` steps, on Cancel and on NaN."""
    on_progress: Callable[[StepReport], None] | None = None
    """After every step (progress bar, console line)."""
    should_stop: Callable[[], bool] | None = None
    """Polled after every step; True stops cleanly after it (Cancel)."""
    on_step: list[StepHook] = field(default_factory=list)
    """Generic per-step hooks (validation samples, custom logging), called after ``on_progress``."""
    on_start: list[Callable[[Trainer], None]] = field(default_factory=list)
    """Called once before this run's first step (after a resume is loaded), with the adapters attached:
    e.g. validation samples of the starting point (step 0, or the step a resumed run continues from)."""


@dataclass
class ResumePlan:
    """The settings a resumed run uses, and where each came from."""

    source: str
    step: int
    lora2: LoRA2Config
    train: TrainConfig
    from_caller: dict[str, Any]
    """Settings taken from the caller (name -> value)."""
    overridden: dict[str, tuple[Any, Any]]
    """Settings the caller asked for that the file overrides: name -> (used from the file, asked)."""
    train_from_file: bool
    """False for a file that records no training settings (all of them then come from the caller)."""

    def describe(self, labels: dict[str, str] | None = None) -> str:
        """One paragraph for the log and the node's UI; ``labels`` maps field names to widget names."""

        def name(key: str) -> str:
            return (labels or {}).get(key, key)

        lines = [f"Resuming {self.source} at step {self.step}."]
        caller = ", ".join(f"{name(k)}={v!r}" for k, v in self.from_caller.items())
        if self.train_from_file:
            lines.append(f"From the widgets/caller: {caller}. Every other setting comes from the file.")
        else:
            lines.append(f"The file records no training settings: all taken from the widgets/caller ({caller}).")
        if self.overridden:
            changed = "; ".join(
                f"{name(k)}: {used!r} from the file (asked {asked!r})" for k, (used, asked) in self.overridden.items()
            )
            lines.append(
                f"Ignored, because the file's value continues the saved run: {changed}. "
                "Set resume to 'none' to train with these settings from scratch."
            )
        return " ".join(lines)


def plan_resume(
    state: ResumeState, lora2: LoRA2Config, train: TrainConfig, source: str = "the resume state"
) -> ResumePlan:
    """Merge a saved run's settings with the caller's (see :data:`CALLER_FIELDS`); refuse what cannot continue."""
    saved = state.train_config if isinstance(state.train_config, dict) else {}
    if not isinstance(saved.get("lora2"), dict):
        raise LoRA2Error(f"{source} records no LoRA² config; it was not written by a LoRA² run and cannot be resumed")
    saved_lora2 = LoRA2Config.from_dict(saved["lora2"])
    saved_train = TrainConfig.from_dict(saved["train"]) if isinstance(saved.get("train"), dict) else None
    overridden: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(LoRA2Config):
        used, asked = getattr(saved_lora2, f.name), getattr(lora2, f.name)
        if used != asked:
            overridden[f.name] = (used, asked)
    if saved_train is not None:
        caller = {name: getattr(train, name) for name in CALLER_FIELDS}
        merged = dataclasses.replace(saved_train, **caller)
        for f in dataclasses.fields(TrainConfig):
            used, asked = getattr(merged, f.name), getattr(train, f.name)
            if used != asked and f.name not in overridden:
                overridden[f.name] = (used, asked)
    else:
        caller = dataclasses.asdict(train)
        merged = train
    check_resume_optimizer(state, merged.optimizer, source)
    step = int(state.handle_state["__step__"]) if "__step__" in state.handle_state else 0
    if step >= merged.steps:
        raise LoRA2Error(f"{source} already did {step} steps; raise steps above that to continue it")
    return ResumePlan(source, step, saved_lora2, merged, caller, overridden, saved_train is not None)


@dataclass
class RunResult:
    adapter: Adapter
    """The trained adapter, folded (with its resume state, so it can be saved and continued)."""
    history: History
    stopped: bool
    """Cancelled (by ``should_stop`` or a host interrupt) before ``steps``; the adapter is what was trained."""
    checkpoint: Any = None
    """Where the Cancel checkpoint went (``RunHooks.save``'s return value), when stopped."""
    resume: ResumePlan | None = None


def fold(trainer: Trainer, target: TrainingTarget) -> Adapter:
    """The run's current state as an :class:`~lora2.adapter.Adapter` carrying its resume state and file keys."""
    history = trainer.history.to_dict()
    adapter = Adapter.from_handle(trainer.handle, target.family, history, trainer.state_dict())
    return with_file_keys(adapter, target.key_for)


def train_run(
    target: TrainingTarget,
    lora2: LoRA2Config,
    train: TrainConfig,
    hooks: RunHooks | None = None,
    resume: ResumeState | None = None,
    resume_source: str = "the resume state",
) -> RunResult:
    """Train ``target`` and return the folded adapter; the model is left exactly as it came (detached).

    With ``resume``, the settings are merged by :func:`plan_resume` (logged, and returned in
    :attr:`RunResult.resume`). Cancel (``hooks.should_stop`` or ``target.interrupt_errors``) stops after
    the current step, saves a checkpoint through ``hooks.save`` and returns with ``stopped``; a NaN/inf
    loss or gradient saves the last finite adapter the same way and raises :class:`LoRA2Error`.
    """
    hooks = hooks or RunHooks()
    plan = plan_resume(resume, lora2, train, resume_source) if resume is not None else None
    if plan is not None:
        lora2, train = plan.lora2, plan.train
        log.info("LoRA² %s", plan.describe())
    with torch.inference_mode(False), torch.enable_grad():  # hosts may run us under inference mode
        make_trainable(target.module)
        handle = attach(target.module, lora2)
        try:
            trainer = _trainer(target, handle, train, hooks)
            if resume is not None:
                state = dataclasses.replace(
                    resume,
                    handle_state=ordinary_tensors(resume.handle_state),
                    optimizer_state=ordinary_tensors(resume.optimizer_state),
                    generator_state=ordinary_tensors(resume.generator_state),
                )
                trainer.load_state_dict(state, resume_source)
            norms = inplace_safe_norms(target.module) if target.inplace_residuals else contextlib.nullcontext()
            try:
                with norms:
                    for start in hooks.on_start:
                        start(trainer)
                    stopped = trainer.run().stopped_early
            except target.interrupt_errors:
                stopped = True
            adapter = fold(trainer, target)
            saved = hooks.save(adapter, trainer.step) if stopped and hooks.save is not None else None
            if stopped:
                log.warning("LoRA² training cancelled at step %d; saved what was trained to %s", trainer.step, saved)
        finally:
            handle.detach()
    return RunResult(adapter, trainer.history, stopped, saved, plan)


def _trainer(target: TrainingTarget, handle: LoRA2Handle, train: TrainConfig, hooks: RunHooks) -> Trainer:
    blocks = target.checkpoint_modules if target.checkpoint_modules is not None else find_blocks(target.module)
    trainer: Trainer

    def on_step(report: StepReport) -> None:
        if hooks.on_progress is not None:
            hooks.on_progress(report)
        for hook in hooks.on_step:
            hook(StepEvent(report, trainer, target))

    def on_checkpoint(step: int, current: Trainer) -> Any:
        return hooks.save(fold(current, target), step) if hooks.save is not None else None

    trainer = Trainer(
        denoiser=target.denoiser,
        rule=target.rule,
        batches=target.batches(train.batch_size, torch.Generator().manual_seed(train.seed)),
        handle=handle,
        config=train,
        device=target.device,
        checkpoint_modules=blocks,
        on_step=on_step,
        should_stop=hooks.should_stop,
        on_checkpoint=on_checkpoint,
        eval_batch=next(target.batches(train.batch_size, eval_generator(train.seed))),
    )
    return trainer
