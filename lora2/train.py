"""The LoRA² training loop: frozen denoiser + noise rule + cached batches + an attached handle.

It owns everything between "here is a model and data" and "here is a trained adapter": device
placement of the batches, autocast, gradient checkpointing, the optimizer and its schedule, the
grow/shrink call after every optimizer step, the final rank-freeze phase, periodic checkpoints, and
progress / cancel callbacks. It knows nothing about ComfyUI: the node passes a denoiser callable and a
:class:`~lora2.noise.DenoisedRule` built from the model's own ``model_sampling``; plain Python passes a
diffusers UNet and a :class:`~lora2.noise.DDPMRule`.

Why a final rank-freeze phase (``rank_freeze_fraction``): the priors that let a component grow also
shrink its factors a little; for the last fraction of the steps the ranks are frozen and the priors
dropped, so the factors fit the data at the ranks found (AdaLoRA's final fine-tuning phase).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import torch

from .adapter import ResumeState
from .attach import LoRA2Handle
from .checkpointing import checkpointed
from .config import DTYPES
from .errors import LoRA2Error
from .noise import Prepared
from .rank_decision import freeze_step
from .sizes import FP16_BYTES, megabytes


class BatchLike(Protocol):
    latents: torch.Tensor
    conditioning: dict[str, torch.Tensor]


class NoiseRuleLike(Protocol):
    def prepare(self, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator) -> Prepared: ...


Denoiser = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]

log = logging.getLogger(__name__)

BASE_OPTIMIZERS = ("adamw", "adam", "sgd")
AUTO_EVAL_MIN_INTERVAL = 10
"""``eval_every = 0`` evaluates about 10 times per run, but never more often than every this many steps."""
OPTIONAL_OPTIMIZERS = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}
EVAL_NOISE_SEED_OFFSET = 12345
"""The evaluation's noise and noise levels are drawn from ``seed + this``: fixed for a run, and apart from the
training noise stream (which starts at ``seed``), so evaluating never shifts what training draws."""


def available_optimizers() -> list[str]:
    """AdamW, Adam, SGD, and AdamW8bit / Prodigy when their packages are installed."""
    extra = [name for name, module in OPTIONAL_OPTIMIZERS.items() if importlib.util.find_spec(module) is not None]
    return [*BASE_OPTIMIZERS, *extra]


def _one_kernel(kind: type[torch.optim.Optimizer], groups: list[dict], **settings) -> torch.optim.Optimizer:
    """``kind`` with its fused kernel where the parameters allow it (CUDA, CPU), else its foreach one.

    Why: a LoRA² model has two factor tensors per component, a few hundred in all, and torch's default
    on CPU is a Python loop of about ten small kernels per tensor; the fused step is one kernel for
    them all (measured in bench/NOTES.md). The update is the same algorithm, only the kernel differs.
    """
    try:
        return kind(groups, fused=True, **settings)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not take
        return kind(groups, foreach=True, **settings)


def make_optimizer(name: str, groups: list[dict], weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Build the named optimizer over ``groups`` (each group keeps its own ``lr``)."""
    if name == "adamw":
        return _one_kernel(torch.optim.AdamW, groups, weight_decay=weight_decay)
    if name == "adam":
        return _one_kernel(torch.optim.Adam, groups, weight_decay=weight_decay)
    if name == "sgd":
        return _one_kernel(torch.optim.SGD, groups, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw8bit" and "adamw8bit" in available_optimizers():
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=weight_decay)
    if name == "prodigy" and "prodigy" in available_optimizers():
        import prodigyopt

        # Prodigy estimates one step size for everything and refuses groups with different lr; ν then
        # moves at the factors' (adapted) rate. Use lr = 1 with Prodigy, as its authors recommend.
        if len({group["lr"] for group in groups}) > 1:
            log.warning("Prodigy uses one learning rate for all parameters; the rank learning rate is ignored")
            groups = [{**group, "lr": groups[0]["lr"]} for group in groups]
        return prodigyopt.Prodigy(groups, weight_decay=weight_decay)
    raise LoRA2Error(
        f"optimizer {name!r} is not available; choose one of {available_optimizers()} "
        f"(AdamW8bit needs `pip install bitsandbytes`, Prodigy needs `pip install prodigyopt`)"
    )


@dataclass
class TrainConfig:
    """How to train (what to adapt is :class:`~lora2.config.LoRA2Config`)."""

    steps: int = 500
    batch_size: int = 1
    lr: float = 1e-4
    """Learning rate of the LoRA factors."""
    nu_lr: float = 1e-2
    """Learning rate of every component's ν (the rank parameters)."""
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    """Decoupled weight decay; 0 by default because the weight prior already is one."""
    dtype: str = "bfloat16"
    """Autocast compute dtype: bfloat16, float16 (CUDA: with loss scaling) or float32."""
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    rank_freeze_fraction: float = 0.2
    """Final fraction of the steps with ranks frozen and the priors dropped (0 disables)."""
    save_every: int = 0
    """Call ``on_checkpoint`` every this many steps (0: never; the caller also saves at the end)."""
    eval_every: int = 0
    """Measure the loss on one fixed batch (fixed noise and noise levels) every this many steps, and at
    the start and the end; 0 picks about 10 points, at most one every 10 steps (an evaluation costs about
    a third of a step: every step would add 35-45 % to a short run). The training loss jumps with every
    random noise level; this one only moves when the model does, so it shows whether training helps."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise LoRA2Error(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise LoRA2Error(f"batch_size must be at least 1, got {self.batch_size}")
        if self.lr <= 0 or self.nu_lr < 0:
            raise LoRA2Error(f"learning rates must be positive (lr={self.lr}, nu_lr={self.nu_lr})")
        if self.dtype not in DTYPES:
            raise LoRA2Error(f"training dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.eval_every < 0:
            raise LoRA2Error(f"eval_every must be 0 (automatic) or a number of steps, got {self.eval_every}")
        if not 0.0 <= self.rank_freeze_fraction < 1.0:
            raise LoRA2Error(f"rank_freeze_fraction must be in [0, 1), got {self.rank_freeze_fraction}")

    @property
    def freeze_step(self) -> int:
        """The step from which ranks are frozen."""
        return freeze_step(self.steps, self.rank_freeze_fraction)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict`; unknown fields are refused (a typo must not be dropped silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoRA2Error(f"unknown training config fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)


@dataclass
class History:
    """Per optimizer step: the data loss and every component's rank (for charts and heatmaps)."""

    components: list[str]
    loss: list[float] = field(default_factory=list)
    ranks: list[list[int]] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    validation_steps: list[int] = field(default_factory=list)
    """Steps at which validation samples were drawn (see :mod:`lora2.validation`); the heatmap marks them."""

    def record(self, loss: float, ranks: dict[str, int]) -> None:
        self.loss.append(loss)
        self.ranks.append([ranks[name] for name in self.components])

    @property
    def total_rank(self) -> list[int]:
        return [sum(row) for row in self.ranks]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        return cls(
            components=list(data["components"]),
            loss=list(data["loss"]),
            ranks=[list(r) for r in data["ranks"]],
            eval_steps=list(data.get("eval_steps", [])),
            eval_loss=list(data.get("eval_loss", [])),
            validation_steps=list(data.get("validation_steps", [])),
        )


@dataclass
class StepReport:
    """What progress callbacks receive after each step."""

    step: int
    total_steps: int
    loss: float
    total_rank: int
    adapter_megabytes: float
    seconds: float


@dataclass
class TrainResult:
    history: History
    step: int
    """Optimizer steps done in total (including any resumed ones)."""
    stopped_early: bool
    optimizer: torch.optim.Optimizer
    generator: torch.Generator


def adapter_megabytes(handle: LoRA2Handle, bytes_per_number: int = FP16_BYTES) -> float:
    """Projected size of the exported adapter (fp16 by default)."""
    return megabytes(handle.num_parameters(), bytes_per_number)


def _warmup_factor(warmup: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class Trainer:
    """One training run. Build it, optionally :meth:`resume`, then :meth:`run`.

    Args:
        denoiser: ``(model_input, timestep, conditioning) -> output``; the frozen model with the
            handle's adapters attached.
        rule: noise rule (see :mod:`lora2.noise`).
        batches: an endless iterator of batches with ``latents`` and a ``conditioning`` dict.
        handle: the attached LoRA² components.
        config: training settings.
        device: where the denoiser runs (batches are moved there).
        checkpoint_modules: blocks to run under gradient checkpointing when it is enabled.
        on_step: called after every step with a :class:`StepReport`.
        should_stop: polled after every step; True ends training cleanly (Cancel).
        on_checkpoint: called with ``(step, trainer)`` every ``save_every`` steps.
        eval_batch: a fixed batch for the evaluation loss (see ``TrainConfig.eval_every``); None: no evaluation.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        rule: NoiseRuleLike,
        batches: Iterator[BatchLike],
        handle: LoRA2Handle,
        config: TrainConfig,
        device: torch.device | str = "cpu",
        checkpoint_modules: Sequence[torch.nn.Module] = (),
        on_step: Callable[[StepReport], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_checkpoint: Callable[[int, Trainer], None] | None = None,
        eval_batch: BatchLike | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.rule = rule
        self.batches = batches
        self.handle = handle
        self.config = config
        self.device = torch.device(device)
        self.checkpoint_modules = list(checkpoint_modules)
        self.on_step = on_step
        self.should_stop = should_stop
        self.on_checkpoint = on_checkpoint
        self.eval_batch = eval_batch
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.history = History(components=list(handle.ranks()))
        self.optimizer = self._build_optimizer()

    def _build_optimizer(self) -> torch.optim.Optimizer:
        groups = self.handle.param_groups(self.config.lr, self.config.nu_lr)
        optimizer = make_optimizer(self.config.optimizer, groups, self.config.weight_decay)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.handle.bind(optimizer)
        return optimizer

    def state_dict(self) -> ResumeState:
        """Everything continuing this run exactly needs: adapter state (weights, ν, widths, evidence, step),
        optimizer moments, the noise generator, and the settings and history it ran with.

        The ``train_config`` entry holds ``train`` (this :class:`TrainConfig`), ``lora2`` (the handle's
        :class:`~lora2.config.LoRA2Config`) and ``history``; :mod:`lora2.run` reads ``train`` and ``lora2``
        back on resume, so a resumed run is the saved one, not whatever the caller passes this time.
        """
        return ResumeState(
            handle_state=self.handle.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            generator_state=self.generator.get_state(),
            train_config={
                "train": self.config.to_dict(),
                "lora2": self.handle.config.to_dict(),
                "history": self.history.to_dict(),
            },
        )

    def load_state_dict(self, state: ResumeState, source: str = "the resume state") -> None:
        """Continue from :meth:`state_dict` (of a trainer built with the same ``lora2`` config).

        ``batches`` must be the run's stream from its start (the same dataset and seed): the first
        ``step`` batches are drawn and dropped, one per step done, so the data order continues where it
        stopped and ``n + m`` steps equal ``n + m`` straight ones bit for bit on CPU.
        """
        history = state.train_config.get("history") if isinstance(state.train_config, dict) else None
        if not isinstance(history, dict):
            raise LoRA2Error(f"{source} holds no training history; it was not written by a LoRA² run")
        self.handle.load_state_dict(state.handle_state)
        step = self.handle.step_count
        if step >= self.config.steps:
            raise LoRA2Error(f"the saved run already did {step} steps; raise steps above that to continue it")
        self.optimizer = self._build_optimizer()  # the handle's parameters were replaced by load_state_dict
        if state.optimizer_state is not None:
            self.optimizer.load_state_dict(state.optimizer_state)
        for _ in range(step):
            next(self.batches)
        self.step = step
        self.history = History.from_dict(history)
        self.generator.set_state(state.generator_state)

    def _set_lr(self) -> None:
        factor = _warmup_factor(self.config.warmup_steps)(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def _loss(self, batch: BatchLike, generator: torch.Generator | None = None) -> torch.Tensor:
        generator = generator if generator is not None else self.generator
        x0 = batch.latents.to(self.device, torch.float32)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        prepared = self.rule.prepare(x0, noise, generator)
        conditioning = {k: v.to(self.device) for k, v in batch.conditioning.items()}
        with _autocast(self.device, DTYPES[self.config.dtype]):
            output = self.denoiser(prepared.model_input, prepared.timestep, conditioning)
        error = (output.float() - prepared.target.float()).pow(2).flatten(1).mean(dim=1)
        return (error * prepared.weight.to(error)).mean()

    @property
    def eval_interval(self) -> int:
        return self.config.eval_every or max(AUTO_EVAL_MIN_INTERVAL, self.config.steps // 10)

    def evaluate(self) -> float:
        """The loss on the fixed evaluation batch: same images, noise and noise levels every time."""
        if self.eval_batch is None:
            raise LoRA2Error("this trainer has no eval_batch to evaluate on")
        with torch.no_grad():
            loss = self._loss(self.eval_batch, torch.Generator().manual_seed(self.config.seed + EVAL_NOISE_SEED_OFFSET))
        return float(loss)

    def _record_eval(self) -> None:
        if self.eval_batch is None or (self.history.eval_steps and self.history.eval_steps[-1] == self.step):
            return
        self.history.eval_steps.append(self.step)
        self.history.eval_loss.append(self.evaluate())

    def _clip_and_read(self, data_loss: torch.Tensor, check_norm: bool) -> tuple[float, float | None]:
        """Clip the gradients; the loss and the gradient norm, read from the device together.

        The step's one device-to-host read (three before: the loss before the backward, the norm after
        it, the loss again for the history; each drains the device's queue). A non-finite loss is now
        caught after its backward, which is harmless: the optimizer step is skipped either way, and the
        NaN the backward fed the gradient sketches is discarded by :meth:`_stop_on_non_finite`. With a
        float16 ``GradScaler`` the norm is not checked: inf gradients are the scaler's to skip.
        """
        values = [data_loss.detach().float().reshape(())]
        if self.config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(list(self.handle.parameters()), self.config.max_grad_norm)
            if check_norm:
                values.append(norm.detach().float().reshape(()).to(values[0].device))
        read = torch.stack(values).tolist()
        return read[0], (read[1] if len(read) > 1 else None)

    def _stop_on_non_finite(self, batch: BatchLike, what: str) -> None:
        """NaN/inf within one step: keep the last finite adapter (like Cancel) and say the likely cause.

        The check runs before the optimizer step, so the factors are still those of the last finite
        step; ``on_checkpoint`` writes them. The cause is read off what is at hand: non-finite latents or
        conditioning mean the data; float16 compute means its range; otherwise the learning rate.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.handle.discard_non_finite_evidence()  # the backward may have fed the sketches NaN
        saved = self.on_checkpoint(self.step, self) if self.on_checkpoint is not None and self.step > 0 else None
        tensors = [batch.latents, *batch.conditioning.values()]
        if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
            cause = "the training data holds NaN/inf values (check the dataset's latents and conditioning)"
        elif self.config.dtype == "float16":
            cause = "float16 overflowed; train in bfloat16 or float32"
        else:
            cause = f"the learning rate is probably too high (lr={self.config.lr}); lower it"
        where = f"; the last finite adapter (step {self.step}) was saved to {saved}" if saved else ""
        raise LoRA2Error(f"{what} at step {self.step}: {cause}{where}")

    def run(self) -> TrainResult:
        """Train until ``config.steps`` (or a stop request); returns the history and the optimizer."""
        cfg = self.config
        use_scaler = cfg.dtype == "float16" and self.device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        stopped = False
        started = time.perf_counter()
        context = checkpointed(self.checkpoint_modules) if cfg.gradient_checkpointing else contextlib.nullcontext()
        with context:
            if not self.history.eval_steps:
                self._record_eval()
            while self.step < cfg.steps:
                if self.step >= cfg.freeze_step and not self.handle.ranks_frozen:
                    self.handle.freeze_ranks()
                self._set_lr()
                batch = next(self.batches)
                data_loss = self._loss(batch)
                objective = data_loss if self.handle.ranks_frozen else data_loss + self.handle.regularizer()
                if scaler is not None:
                    scaler.scale(objective).backward()
                    scaler.unscale_(self.optimizer)
                else:
                    objective.backward()
                loss_value, norm = self._clip_and_read(data_loss, scaler is None)
                if not math.isfinite(loss_value):
                    self._stop_on_non_finite(batch, f"the loss became {loss_value}")
                if norm is not None and not math.isfinite(norm):
                    self._stop_on_non_finite(batch, f"the gradient norm became {norm}")
                if scaler is not None:
                    scaler.step(self.optimizer)
                    scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.handle.step(self.optimizer)
                self.step += 1
                ranks = self.handle.ranks()
                self.history.record(loss_value, ranks)
                if self.on_step is not None:
                    self.on_step(
                        StepReport(
                            step=self.step,
                            total_steps=cfg.steps,
                            loss=loss_value,
                            total_rank=sum(ranks.values()),
                            adapter_megabytes=adapter_megabytes(self.handle),
                            seconds=time.perf_counter() - started,
                        )
                    )
                if self.step % self.eval_interval == 0 or self.step == cfg.steps:
                    self._record_eval()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.on_checkpoint is not None:
                    self.on_checkpoint(self.step, self)
                if self.should_stop is not None and self.step < cfg.steps and self.should_stop():
                    stopped = True
                    break
        if stopped:
            self._record_eval()
        return TrainResult(self.history, self.step, stopped, self.optimizer, self.generator)
