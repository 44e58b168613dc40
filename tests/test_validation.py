"""lora2/validation.py: the schedule, the grid, its files, and training left bit-identical by sampling."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_lora2.devtools.tiny_unet import data, training_target
from comfyui_lora2.lora2 import LoRA2Config, LoRA2Error
from comfyui_lora2.lora2.heatmap_charts import VALIDATION_MARK, render_history
from comfyui_lora2.lora2.run import RunHooks, train_run
from comfyui_lora2.lora2.train import TrainConfig
from comfyui_lora2.lora2.validation import (
    ValidationConfig,
    ValidationRun,
    grid_name,
    is_due,
    parse_prompts,
    preserved_rng,
    render_grid,
    run_folder,
    schedule,
)


def test_schedule_samples_at_the_start_every_n_steps_and_at_the_end() -> None:
    assert schedule(500, 100) == [0, 100, 200, 300, 400, 500]
    assert schedule(250, 100) == [0, 100, 200, 250]
    assert schedule(12, 5, start=7) == [7, 10, 12]  # a resumed run shows where it resumed from
    assert schedule(3, 100) == [0, 3]
    assert is_due(0, 10, 4) and is_due(8, 10, 4) and is_due(10, 10, 4) and not is_due(9, 10, 4)


def test_config_refuses_what_cannot_be_sampled() -> None:
    for bad in ({"every": 0}, {"steps": 0}, {"width": 100}, {"height": 8}, {"cfg": 0.0}):
        with pytest.raises(LoRA2Error):
            ValidationConfig(**bad)
    with pytest.raises(LoRA2Error, match="eval_every"):
        TrainConfig(eval_every=-1)


def test_prompts_are_one_per_line() -> None:
    assert parse_prompts("  a photo of sks dog \n\n a sks dog in the snow\n") == [
        "a photo of sks dog",
        "a sks dog in the snow",
    ]
    with pytest.raises(LoRA2Error, match="at most"):
        parse_prompts("\n".join(f"prompt {i}" for i in range(65)))


def test_grid_places_each_image_under_a_step_and_rank_header() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    images = [Image.new("RGB", (64, 48), colour) for colour in colours]
    grid = render_grid(images, ["red", "green", "blue", "yellow", "cyan"], step=120, total_steps=500, total_rank=212)
    blank = render_grid(images, ["red", "green", "blue", "yellow", "cyan"], step=7, total_steps=500, total_rank=3)
    assert grid.width > 3 * 64 and grid.height > 2 * 48  # 5 images: 3 columns, 2 rows
    found = {colour: None for colour in colours}
    pixels = grid.load()
    for y in range(grid.height):
        for x in range(grid.width):
            if pixels[x, y] in found and found[pixels[x, y]] is None:
                found[pixels[x, y]] = (x, y)
    assert all(found.values()), found
    xs = sorted({found[c][0] for c in colours[:3]})
    assert len(xs) == 3 and found[colours[3]][0] == found[colours[0]][0]  # row 2 starts under column 1
    assert found[colours[3]][1] > found[colours[0]][1] + 48
    header = grid.crop((0, 0, grid.width, found[colours[0]][1]))
    assert header.getextrema() != ((255, 255), (255, 255), (255, 255))  # the overlay text is drawn
    assert header.tobytes() != blank.crop((0, 0, grid.width, found[colours[0]][1])).tobytes()  # and says the step


def test_run_folder_never_reuses_a_folder_with_grids_and_stays_inside(tmp_path: Path) -> None:
    first = run_folder(tmp_path, "dog")
    assert first == (tmp_path / "dog").resolve()
    first.mkdir()
    assert run_folder(tmp_path, "dog") == first  # an empty folder is free
    (first / grid_name(0)).write_bytes(b"png")
    assert run_folder(tmp_path, "dog") == first.with_name("dog_2")
    assert run_folder(tmp_path, "runs/dog").parent == (tmp_path / "runs").resolve()
    root = tmp_path / "output"
    root.mkdir()
    for name in ("../escape", "/etc/x", "a/../../b"):  # ".." and "/" never leave the output folder
        assert run_folder(root, name).is_relative_to(root.resolve()), name
    (root / "link").symlink_to(tmp_path)  # a symlink inside that points out is refused
    with pytest.raises(LoRA2Error, match="outside"):
        run_folder(root, "link/x")
    with pytest.raises(LoRA2Error, match="empty"):
        run_folder(tmp_path, " / . ")


def test_preserved_rng_puts_every_generator_back() -> None:
    own = torch.Generator().manual_seed(5)
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), own.get_state())
    with preserved_rng("cpu", [own]):
        torch.manual_seed(0)
        torch.randn(10)
        random.random()
        np.random.rand(3)
        own.manual_seed(99)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert torch.equal(own.get_state(), before[3])


def _train(with_validation: bool, tmp_path: Path, steps: int = 24):
    """A tiny diffusers UNet run through ``train_run``; with validation, a sampler that disturbs every RNG
    it can reach and runs the adapted model forward, at steps 0, 8, 16 and 24."""
    target = training_target()
    unet, conditioning = target.module, data()[1]
    lora2 = LoRA2Config(targets="attn", init_rank=2, max_rank=16, prior_strength=1e-4)
    train = TrainConfig(steps=steps, batch_size=2, lr=3e-3, nu_lr=0.1, dtype="float32", seed=0, eval_every=6)
    drawn, live = [], {}

    def sample() -> list[Image.Image]:
        torch.manual_seed(1234)  # what ComfyUI's prepare_noise does
        random.random()
        np.random.rand()
        live["trainer"].generator.manual_seed(4321)  # shared code touching the trainer's own generator
        x = torch.randn(1, 4, 8, 8)
        out = unet(x, torch.tensor([500]), encoder_hidden_states=conditioning[:1]).sample  # adapters attached
        drawn.append(float(out.abs().mean()))
        return [Image.new("RGB", (16, 16), (int(255 * min(1.0, drawn[-1])), 0, 0))]

    hooks = RunHooks()
    if with_validation:
        run = ValidationRun(ValidationConfig(every=8, width=16, height=16), ["p"], sample, tmp_path / "grids")

        def start(trainer) -> None:
            live["trainer"] = trainer
            run.observe(trainer, start=True)

        hooks = RunHooks(on_start=[start], on_step=[lambda event: run.observe(event.trainer)])
    result = train_run(target, lora2, train, hooks)
    return result, drawn


def test_validation_leaves_the_trained_adapter_bit_identical(tmp_path: Path) -> None:
    plain, _ = _train(False, tmp_path)
    rng_after_plain = torch.get_rng_state()
    validated, drawn = _train(True, tmp_path)
    assert len(drawn) == 4 and len(set(drawn)) > 1  # sampled 4 times, and the adapter changed in between
    assert validated.history.validation_steps == [0, 8, 16, 24]
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == [grid_name(s) for s in (0, 8, 16, 24)]
    assert not plain.history.validation_steps
    assert validated.history.loss == plain.history.loss
    assert validated.history.eval_steps == [0, 6, 12, 18, 24]  # eval_every is the caller's
    assert validated.history.eval_loss == plain.history.eval_loss
    assert validated.adapter.ranks() == plain.adapter.ranks()
    for name, component in plain.adapter.components.items():
        assert torch.equal(validated.adapter.components[name].delta(), component.delta()), name
    plain_state, validated_state = plain.adapter.resume, validated.adapter.resume
    for key, tensor in plain_state.handle_state.items():  # factors, ν, widths and the gradient sketches
        assert torch.equal(validated_state.handle_state[key], tensor), key
    for index, state in plain_state.optimizer_state["state"].items():
        for name, value in state.items():
            assert torch.equal(validated_state.optimizer_state["state"][index][name], value), (index, name)
    assert torch.equal(validated_state.generator_state, plain_state.generator_state)
    assert torch.equal(torch.get_rng_state(), rng_after_plain)


def test_history_panel_marks_the_validation_steps() -> None:
    losses, ranks = [1.0 / (i + 1) for i in range(40)], [[4 + i // 10] for i in range(40)]
    history = {"components": ["a"], "loss": losses, "ranks": ranks}
    plain = render_history(history)
    marked = render_history({**history, "validation_steps": [0, 20, 40]})
    colours = {colour for _, colour in marked.getcolors(1 << 20)}
    assert VALIDATION_MARK in colours and VALIDATION_MARK not in {c for _, c in plain.getcolors(1 << 20)}
    with pytest.raises(LoRA2Error, match="validation_steps"):
        render_history({**history, "validation_steps": ["x"]})


def test_a_resumed_run_samples_where_it_resumed_and_keeps_the_earlier_steps(tmp_path: Path) -> None:
    target = training_target()
    lora2 = LoRA2Config(targets="attn", init_rank=2, max_rank=8)
    train = TrainConfig(steps=10, batch_size=2, lr=3e-3, dtype="float32")

    def hooks(folder: Path, stop_after: int | None = None) -> RunHooks:
        run = ValidationRun(
            ValidationConfig(every=4, width=16, height=16), ["p"], lambda: [Image.new("RGB", (16, 16))], folder
        )
        live = {}

        def start(trainer) -> None:
            live["trainer"] = trainer
            run.observe(trainer, start=True)

        stop = (lambda: live["trainer"].step >= stop_after) if stop_after else None
        return RunHooks(on_start=[start], on_step=[lambda event: run.observe(event.trainer)], should_stop=stop)

    first = train_run(target, lora2, train, hooks(tmp_path / "a", stop_after=5))
    assert first.stopped and first.history.validation_steps == [0, 4]
    resumed = train_run(target, lora2, train, hooks(tmp_path / "b"), resume=first.adapter.resume)
    assert resumed.history.validation_steps == [0, 4, 5, 8, 10]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [grid_name(s) for s in (5, 8, 10)]
