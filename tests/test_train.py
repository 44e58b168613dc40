"""lora2/train.py from plain Python on a tiny diffusers UNet: loss falls, ranks move, cancel, resume."""

from __future__ import annotations

import collections
import copy
import re

import pytest
import torch
from torch.overrides import TorchFunctionMode

from comfyui_lora2.devtools.saved_tensors import saved_storages
from comfyui_lora2.devtools.tiny_unet import RULE, Batch, data, denoiser_for, tiny_unet
from comfyui_lora2.lora2 import LoRA2Config, LoRA2Error, attach
from comfyui_lora2.lora2.checkpointing import DEFAULT_BLOCK_PATTERN, checkpointed, find_blocks
from comfyui_lora2.lora2.train import TrainConfig, Trainer, available_optimizers, make_optimizer


@torch.no_grad()
def eval_loss(unet, latents, conditioning) -> float:
    generator = torch.Generator().manual_seed(123)
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.tensor([100, 400, 700, 900])
    abar = RULE.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    return float((unet(noisy, t, encoder_hidden_states=conditioning).sample - noise).pow(2).mean())


def make_trainer(unet, batches, steps: int = 40, rank_control: str = "evidence", **kwargs) -> Trainer:
    config = LoRA2Config(targets="attn", init_rank=2, max_rank=16, prior_strength=1e-4, rank_control=rank_control)
    handle = attach(unet, config)
    settings = {"steps": steps, "batch_size": 2, "lr": 3e-3, "nu_lr": 0.1, "dtype": "float32", "seed": 0}
    config = TrainConfig(**{**settings, **kwargs})
    return Trainer(denoiser_for(unet), RULE, batches(), handle, config)


def test_training_a_diffusers_unet_lowers_the_loss_and_moves_ranks() -> None:
    unet = tiny_unet()
    latents, conditioning, batches = data()
    before = eval_loss(unet, latents, conditioning)
    trainer = make_trainer(unet, batches, steps=60)
    trainer.eval_batch = Batch(latents, {"cross_attn": conditioning})
    reports = []
    trainer.on_step = reports.append
    result = trainer.run()
    after = eval_loss(unet, latents, conditioning)
    assert result.step == 60 and not result.stopped_early
    assert after < 0.9 * before, (before, after)
    assert len(result.history.loss) == 60 and len(result.history.ranks[0]) == len(trainer.handle.ranks())
    assert any(r != 2 for r in trainer.handle.ranks().values())
    assert [r.step for r in reports] == list(range(1, 61))
    assert reports[-1].total_rank == sum(trainer.handle.ranks().values())
    assert reports[-1].adapter_megabytes == pytest.approx(trainer.handle.num_parameters() * 2 / 1e6)
    assert trainer.handle.ranks_frozen  # the final 20 % ran with ranks frozen
    assert result.history.ranks[-1] == result.history.ranks[int(60 * 0.8)]
    # eval_every = 0: about 10 points, but at most one every 10 steps (steps // 10 = 6 would cost too much)
    assert result.history.eval_steps == [0, 10, 20, 30, 40, 50, 60]
    assert result.history.eval_loss[-1] < 0.95 * result.history.eval_loss[0]


def test_cancel_stops_after_the_current_step() -> None:
    unet = tiny_unet()
    _, _, batches = data()
    trainer = make_trainer(unet, batches)
    trainer.should_stop = lambda: trainer.step >= 5
    result = trainer.run()
    assert result.stopped_early and result.step == 5 and len(result.history.loss) == 5


def _poisoned(batches, at: int):
    """The same batches, with NaN latents from the ``at``-th on (bad data)."""

    def generate():
        for index, batch in enumerate(batches()):
            if index >= at:
                batch = Batch(torch.full_like(batch.latents, float("nan")), batch.conditioning)
            yield batch

    return generate


@pytest.mark.parametrize("source", ["data", "model"])
def test_non_finite_loss_saves_the_last_finite_adapter_and_names_the_cause(source: str) -> None:
    unet = tiny_unet()
    _, _, batches = data()
    trainer = make_trainer(unet, _poisoned(batches, 4) if source == "data" else batches, steps=10)
    if source == "model":  # finite data, a blow-up inside the model: blame the learning rate
        denoise = trainer.denoiser
        trainer.denoiser = lambda x, t, c: denoise(x, t, c) * (float("inf") if trainer.step >= 4 else 1.0)
    saved: list[tuple[int, torch.Tensor]] = []
    trainer.on_checkpoint = lambda step, t: saved.append((step, t.handle.delta(next(iter(t.handle.ranks()))))) or "ckpt"
    name = next(iter(trainer.handle.ranks()))
    with pytest.raises(LoRA2Error, match="data" if source == "data" else "learning rate") as error:
        trainer.run()
    assert "step 4" in str(error.value) and "saved to ckpt" in str(error.value)
    assert [step for step, _ in saved] == [4]
    torch.testing.assert_close(saved[0][1], trainer.handle.delta(name))  # nothing stepped on the bad batch
    assert bool(torch.isfinite(trainer.handle.delta(name)).all())


class HostReads(TorchFunctionMode):
    """Counts the tensor-to-Python reads (each one a device sync on a GPU) made inside the mode."""

    READS = frozenset({torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__bool__})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_the_device_once() -> None:
    """The loss and the gradient norm come back in one read (no eval, no rank decision in these steps)."""
    _, _, batches = data()
    trainer = make_trainer(tiny_unet(), batches, steps=5)
    with HostReads() as reads:
        result = trainer.run()
    assert reads.count == result.step == 5
    assert all(isinstance(loss, float) for loss in result.history.loss)


def test_resume_continues_exactly_where_it_stopped() -> None:
    _, _, batches = data()
    straight = make_trainer(tiny_unet(), batches, steps=20)
    straight.run()

    first = make_trainer(tiny_unet(), batches, steps=20)
    first.should_stop = lambda: first.step >= 7
    first.run()
    saved = copy.deepcopy(first.state_dict())
    assert saved.train_config["train"] == first.config.to_dict() and saved.train_config["lora2"]["init_rank"] == 2

    unet = tiny_unet()
    second = make_trainer(unet, batches, steps=20)  # the stream from its start: resume skips what was seen
    second.load_state_dict(saved)
    result = second.run()
    assert result.step == 20 and second.history.loss[:7] == first.history.loss
    assert second.handle.ranks() == straight.handle.ranks()
    assert second.history.loss == straight.history.loss  # bit for bit, data order included
    for name in straight.handle.ranks():
        torch.testing.assert_close(second.handle.delta(name), straight.handle.delta(name), atol=0, rtol=0)
    with pytest.raises(LoRA2Error, match="already did 20 steps"):
        make_trainer(tiny_unet(), batches, steps=20).load_state_dict(second.state_dict())


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    unet = tiny_unet()
    blocks = find_blocks(unet)
    kinds = collections.Counter(type(b).__name__ for b in blocks)
    # each transformer block with the norm and projections around it, ResBlocks, the glue of more
    # than one layer; a down block holding a single ResBlock is taken whole
    assert kinds == {
        "Transformer2DModel": 4,
        "ResnetBlock2D": 7,
        "DownBlock2D": 1,
        "Downsample2D": 1,
        "Upsample2D": 1,
        "TimestepEmbedding": 1,
    }
    inner = {id(m) for b in blocks for m in b.modules() if m is not b}
    assert not any(id(b) in inner for b in blocks)  # no region inside another
    handle = attach(unet, targets="attn", init_rank=3)
    with torch.no_grad():
        for c in handle.components.values():
            c.up.normal_(0, 0.1)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    cond = torch.randn(2, 5, 16)

    def grads():
        unet(x, t, encoder_hidden_states=cond).sample.pow(2).mean().backward()
        out = [p.grad.clone() for p in handle.parameters() if p.grad is not None]
        for p in handle.parameters():
            p.grad = None
        return out

    plain = grads()
    with checkpointed(blocks):
        recomputed = grads()
    assert len(plain) == len(recomputed) > 0
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(a, b)
    assert all("forward" not in vars(b) for b in blocks)


def _saved_outside(unet, handle, regions) -> int:
    """Bytes of activations one forward saves outside the checkpointed ``regions`` (what they cannot free)."""
    x, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 5, 16)
    with checkpointed(regions), saved_storages([*unet.parameters(), *handle.parameters()]) as storages:
        unet(x, t, encoder_hidden_states=cond).sample.pow(2).mean().backward()
    return sum(storages.values())


def test_checkpointed_regions_cover_the_glue_between_blocks() -> None:
    """With the norms, projections and upsamplers inside the regions, what stays saved outside them
    (bare layers between blocks) is a small share; checkpointing the matching blocks alone left twice it."""
    pattern = re.compile(DEFAULT_BLOCK_PATTERN)

    def blocks_alone(module: torch.nn.Module) -> list[torch.nn.Module]:
        found = []
        for child in module.children():
            found.extend([child] if pattern.search(type(child).__name__) else blocks_alone(child))
        return found

    unet = tiny_unet()
    handle = attach(unet, targets="all", init_rank=3)
    everything = _saved_outside(unet, handle, [])
    regions = _saved_outside(unet, handle, find_blocks(unet))
    alone = _saved_outside(unet, handle, blocks_alone(unet))
    assert regions < 0.15 * everything
    assert regions < 0.7 * alone


def test_bfloat16_autocast_and_checkpointing_run() -> None:
    unet = tiny_unet()
    _, _, batches = data()
    trainer = make_trainer(unet, batches, steps=3, gradient_checkpointing=True)
    trainer.config.dtype = "bfloat16"
    trainer.checkpoint_modules = find_blocks(unet)
    result = trainer.run()
    assert result.step == 3 and all(torch.isfinite(torch.tensor(result.history.loss)))


def test_save_every_calls_back() -> None:
    unet = tiny_unet()
    _, _, batches = data()
    saved = []
    trainer = make_trainer(unet, batches, steps=7, save_every=3)
    trainer.on_checkpoint = lambda step, _: saved.append(step)
    trainer.run()
    assert saved == [3, 6]


def test_optimizers() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    assert {"adamw", "adam", "sgd"} <= set(available_optimizers())
    for name in ("adamw", "adam", "sgd"):
        assert isinstance(make_optimizer(name, [{"params": [param], "lr": 0.1}]), torch.optim.Optimizer)
    with pytest.raises(LoRA2Error, match="not available"):
        make_optimizer("lion", [{"params": [param], "lr": 0.1}])


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"steps": 0}, "steps"), ({"lr": 0.0}, "learning rates"), ({"dtype": "int8"}, "training dtype")],
)
def test_train_config_validation(fields: dict, message: str) -> None:
    with pytest.raises(LoRA2Error, match=message):
        TrainConfig(**fields)


@pytest.mark.skipif("prodigy" not in available_optimizers(), reason="prodigyopt is not installed")
def test_prodigy_trains_through_resizes(caplog: pytest.LogCaptureFixture) -> None:
    """Prodigy keeps extra per-element state (p0, s); resizes must carry it like Adam's moments."""
    from comfyui_lora2.lora2 import rank as R

    unet = tiny_unet()
    _, _, batches = data()
    trainer = make_trainer(
        unet,
        batches,
        steps=3,
        optimizer="prodigy",
        lr=1.0,
        nu_lr=1.0,
        rank_freeze_fraction=0.0,
        rank_control="gradient",
    )
    trainer.run()
    with torch.no_grad():  # ask every component for width 5: the next step() resizes all of them
        for component in trainer.handle.components.values():
            component.nu.fill_(R.nu_for_rate(R.rate_for_width(5, 0.85, 1)))
    trainer.config.steps = 8
    with caplog.at_level("WARNING"):
        result = trainer.run()
    assert "restarts from zero" not in caplog.text  # re-indexed, not dropped
    assert result.step == 8 and all(torch.isfinite(torch.tensor(result.history.loss)))
    assert result.history.ranks[2] != result.history.ranks[3]  # the resize happened after step 4
    for component in trainer.handle.components.values():
        state = trainer.optimizer.state[component.up]
        per_element = [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
        assert per_element and all(value.numel() == component.up.numel() for value in per_element)


@pytest.mark.skipif("adamw8bit" not in available_optimizers(), reason="bitsandbytes is not installed")
def test_adamw8bit_trains_through_resizes() -> None:
    """8-bit AdamW: small tensors keep per-element state (re-indexed at a resize), large ones block-quantised
    state (restarted, with a warning); either way training goes on with state shaped like the new factor."""
    from comfyui_lora2.lora2 import rank as R

    unet = tiny_unet()
    _, _, batches = data()
    trainer = make_trainer(
        unet, batches, steps=3, optimizer="adamw8bit", rank_freeze_fraction=0.0, rank_control="gradient"
    )
    trainer.run()
    with torch.no_grad():
        for component in trainer.handle.components.values():
            component.nu.fill_(R.nu_for_rate(R.rate_for_width(5, 0.85, 1)))
    trainer.config.steps = 8
    result = trainer.run()
    assert result.step == 8 and all(torch.isfinite(torch.tensor(result.history.loss)))
    assert result.history.ranks[2] != result.history.ranks[3]
    for component in trainer.handle.components.values():
        state = trainer.optimizer.state[component.up]
        assert state, "the optimizer re-created its state for the resized factor"
        assert all(v.shape == component.up.shape for k, v in state.items() if k in ("state1", "state2"))
