"""lora2/run.py from plain Python, no ComfyUI: a whole run, Cancel to a file, resume from it, hooks, NaN."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from comfyui_lora2.lora2 import LoRA2Config, LoRA2Error
from comfyui_lora2.lora2.lora_file import load_resume_state, save_adapter, state_path
from comfyui_lora2.lora2.noise import DDPMRule
from comfyui_lora2.lora2.run import (
    CALLER_FIELDS,
    RunHooks,
    StepEvent,
    TrainingTarget,
    checkpoint_name,
    plan_resume,
    train_run,
)
from comfyui_lora2.lora2.train import TrainConfig


@dataclass
class Batch:
    latents: torch.Tensor
    conditioning: dict[str, torch.Tensor]


class TinyDenoiser(nn.Module):
    """A three-layer MLP on 4x2x2 latents, conditioned on a pooled text vector and the timestep."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid, self.out = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        h = torch.tanh(self.inp(x.flatten(1)) + cond["cross_attn"].mean(1) + t.float().view(-1, 1) / 1000)
        return self.out(torch.tanh(self.mid(h))).view_as(x)


LATENTS = torch.randn(6, 4, 2, 2, generator=torch.Generator().manual_seed(1))
TEXT = torch.randn(6, 3, 32, generator=torch.Generator().manual_seed(2))
RULE = DDPMRule(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0))


def batches(batch_size: int, generator: torch.Generator):
    while True:
        pick = torch.randperm(len(LATENTS), generator=generator)[:batch_size]
        yield Batch(LATENTS[pick], {"cross_attn": TEXT[pick]})


def target(**overrides) -> TrainingTarget:
    model = TinyDenoiser()
    return TrainingTarget(module=model, denoiser=model, rule=RULE, batches=batches, **overrides)


LORA2 = LoRA2Config(targets=r"^(inp|mid|out)$", init_rank=3, max_rank=8, prior_strength=1e-4, decide_every=2)
TRAIN = TrainConfig(steps=12, batch_size=2, lr=5e-3, dtype="float32", seed=3)


def file_saver(folder: Path, saved: list[Path]):
    def save(adapter, step: int) -> Path:
        path = folder / f"{checkpoint_name('run', step)}.safetensors"
        save_adapter(path, adapter)
        saved.append(path)
        return path

    return save


def test_a_run_leaves_the_model_as_it_came_and_returns_a_folded_adapter() -> None:
    run_target = target()
    x = torch.randn(2, 4, 2, 2)
    before = run_target.module(x, torch.tensor([5, 9]), {"cross_attn": TEXT[:2]})
    result = train_run(run_target, LORA2, TRAIN)
    assert not result.stopped and result.resume is None and result.adapter.steps == 12
    assert len(result.history.loss) == 12 and set(result.adapter.components) == {"inp", "mid", "out"}
    assert result.adapter.resume is not None and result.adapter.resume.train_config["train"] == TRAIN.to_dict()
    after = run_target.module(x, torch.tensor([5, 9]), {"cross_attn": TEXT[:2]})
    assert torch.equal(before, after)  # detached: the adapters are gone from the model


def test_cancel_writes_a_checkpoint_and_a_plain_python_resume_from_it_equals_the_straight_run(tmp_path: Path) -> None:
    straight = train_run(target(), LORA2, TRAIN)

    saved: list[Path] = []
    steps_seen: list[int] = []
    hooks = RunHooks(save=file_saver(tmp_path, saved), should_stop=lambda: len(steps_seen) >= 5)
    hooks.on_step.append(lambda event: steps_seen.append(event.step))
    cancelled = train_run(target(), LORA2, TRAIN, hooks)
    assert cancelled.stopped and cancelled.checkpoint == tmp_path / "run_step000005.safetensors"
    assert saved == [cancelled.checkpoint] and state_path(cancelled.checkpoint).is_file()

    with torch.inference_mode():  # as a host's executor reads it: the run must cope with inference tensors
        state = load_resume_state(state_path(cancelled.checkpoint))
    resumed = train_run(target(), LORA2, TRAIN, resume=state, resume_source="run_step000005")
    assert resumed.resume is not None and resumed.resume.step == 5 and not resumed.resume.overridden
    assert resumed.history.loss == straight.history.loss  # 5 + 7 = 12, bit for bit (data order too)
    # Cancel adds an evaluation at step 5; every other one, the last included, is the straight run's
    straight_eval = dict(zip(straight.history.eval_steps, straight.history.eval_loss, strict=True))
    resumed_eval = dict(zip(resumed.history.eval_steps, resumed.history.eval_loss, strict=True))
    assert resumed_eval == {**straight_eval, 5: resumed_eval[5]} and resumed.history.eval_steps[-1] == 12
    for name, component in straight.adapter.components.items():
        assert torch.equal(component.delta(), resumed.adapter.components[name].delta()), name


def test_resume_reads_the_saved_settings_back_and_names_every_one_it_overrides(tmp_path: Path) -> None:
    saved: list[Path] = []
    hooks = RunHooks(save=file_saver(tmp_path, saved), should_stop=lambda: True)
    train_run(target(), LORA2, TRAIN, hooks)  # cancelled after step 1
    state = load_resume_state(state_path(saved[0]))

    asked_lora2 = LoRA2Config(targets="^inp$", init_rank=2, max_rank=8, prior_strength=1e-4, decide_every=2)
    asked = TrainConfig(steps=9, batch_size=1, lr=1e-2, dtype="float32", seed=3, save_every=4, eval_every=3)
    plan = plan_resume(state, asked_lora2, asked, "'run_step000001'")
    assert plan.lora2 == LORA2  # what the adapter is: the file's
    assert (plan.train.lr, plan.train.batch_size) == (TRAIN.lr, TRAIN.batch_size)  # what it learns with: the file's
    assert (plan.train.steps, plan.train.save_every, plan.train.eval_every) == (9, 4, 3)  # how long: the caller's
    assert set(plan.from_caller) == set(CALLER_FIELDS)
    assert plan.overridden == {
        "targets": (LORA2.targets, "^inp$"),
        "init_rank": (3, 2),
        "lr": (TRAIN.lr, 1e-2),
        "batch_size": (2, 1),
    }
    text = plan.describe({"lr": "learning_rate"})
    assert "at step 1" in text and "learning_rate: 0.005 from the file (asked 0.01)" in text and "steps=9" in text

    result = train_run(target(), asked_lora2, asked, resume=state)
    assert result.adapter.config == LORA2 and result.adapter.steps == 9
    assert result.adapter.resume.train_config["train"]["lr"] == TRAIN.lr

    with pytest.raises(LoRA2Error, match="already did 1 steps"):
        plan_resume(state, LORA2, TrainConfig(steps=1), "'run_step000001'")


def test_a_file_without_training_settings_takes_them_all_from_the_caller(tmp_path: Path) -> None:
    saved: list[Path] = []
    train_run(target(), LORA2, TRAIN, RunHooks(save=file_saver(tmp_path, saved), should_stop=lambda: True))
    state = load_resume_state(state_path(saved[0]))
    del state.train_config["train"]
    asked = TrainConfig(steps=4, batch_size=2, lr=1e-2, dtype="float32", seed=3)
    plan = plan_resume(state, LORA2, asked)
    assert plan.train == asked and not plan.train_from_file and "records no training settings" in plan.describe()


def test_step_hooks_see_the_live_adapter_and_the_eval_batch_is_the_runs_first_batch() -> None:
    events: list[tuple[int, float]] = []
    eval_batches = []

    def hook(event: StepEvent) -> None:
        name = "mid"
        torch.testing.assert_close(event.handle.delta(name), event.adapter().delta(name), atol=1e-6, rtol=1e-5)
        events.append((event.step, float(event.handle.delta(name).norm())))
        eval_batches.append(event.trainer.eval_batch)

    train_run(target(), LORA2, TRAIN, RunHooks(on_step=[hook]))
    assert [step for step, _ in events] == list(range(1, 13))
    assert len({norm for _, norm in events}) == 12  # a new adapter state after every step
    first = next(batches(TRAIN.batch_size, torch.Generator().manual_seed(TRAIN.seed)))
    assert torch.equal(eval_batches[0].latents, first.latents)


def test_a_host_interrupt_is_a_cancel_and_a_nan_saves_the_last_finite_adapter(tmp_path: Path) -> None:
    class HostInterrupt(Exception):
        pass

    def interrupt(report) -> None:
        if report.step == 4:
            raise HostInterrupt

    saved: list[Path] = []
    hooks = RunHooks(save=file_saver(tmp_path, saved), on_progress=interrupt)
    result = train_run(target(interrupt_errors=(HostInterrupt,)), LORA2, TRAIN, hooks)
    assert result.stopped and result.adapter.steps == 4 and saved == [tmp_path / "run_step000004.safetensors"]

    run_target = target()
    model = run_target.module
    steps: list[int] = []
    hooks = RunHooks(save=file_saver(tmp_path, saved), on_progress=lambda report: steps.append(report.step))
    run_target.denoiser = lambda x, t, c: model(x, t, c) * (float("nan") if len(steps) >= 3 else 1.0)
    with pytest.raises(LoRA2Error, match=r"step 3.*saved to"):
        train_run(run_target, LORA2, TRAIN, hooks)
    assert saved[-1] == tmp_path / "run_step000003.safetensors"
    assert not any(module._forward_hooks for module in model.modules())  # detached after the error too


@pytest.mark.parametrize("checkpointing", [True, False])
def test_gradient_checkpointing_wraps_the_blocks_for_the_run_only(checkpointing: bool) -> None:
    run_target = target()
    block = run_target.module.mid
    run_target.checkpoint_modules = [block]
    wrapped: list[bool] = []
    hooks = RunHooks(on_step=[lambda event: wrapped.append("forward" in vars(block))])
    train = TrainConfig(steps=2, batch_size=2, dtype="float32", gradient_checkpointing=checkpointing)
    train_run(run_target, LORA2, train, hooks)
    assert wrapped == [checkpointing, checkpointing] and "forward" not in vars(block)
