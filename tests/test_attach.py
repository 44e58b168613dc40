"""lora2/attach.py: the handle a training loop uses, end to end on small models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comfyui_lora2.lora2 import LoRA2Config, LoRA2Error, attach
from comfyui_lora2.lora2 import rank as R


class Block(nn.Module):
    """Attention-ish names and a conv, so presets and regexes have something to find."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.to_q = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.ff = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = self.conv(x[:, :48].reshape(-1, 3, 4, 4)).flatten(1)[:, :16]
        h = self.to_q(x[:, :16]) + self.to_v(x[:, 16:32]) + image
        return self.ff(F.gelu(h))


def model_and_input(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(3)
    model = Block().to(dtype).requires_grad_(False)
    return model, torch.randn(8, 48, dtype=dtype)


def merged_output(model: nn.Module, handle, x: torch.Tensor) -> torch.Tensor:
    """The model with every ΔW added into its weight and no adapters: the reference output."""
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name in handle.ranks():
            modules[name].weight += handle.delta(name).to(modules[name].weight.dtype)
    with handle.disabled():
        return merged(x)


def train(handle, model, x, steps: int, optimizer=None, lr: float = 1e-2):
    optimizer = optimizer or torch.optim.Adam(handle.param_groups(lr, nu_lr=0.1))
    target = torch.randn_like(model(x))
    loss = None
    for _ in range(steps):
        loss = F.mse_loss(model(x), target) + handle.regularizer()  # `loss` lives on into the next step
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        handle.step(optimizer)
    return optimizer


def test_attach_finds_targets_and_exposes_parameters() -> None:
    model, _ = model_and_input()
    handle = attach(model, rank_control="gradient", targets="all", init_rank=3)
    assert list(handle.ranks()) == ["conv", "to_q", "to_v", "ff"]
    assert set(handle.ranks().values()) == {3}
    factors, nus = list(handle.factor_parameters()), list(handle.nu_parameters())
    assert len(factors) == 8 and len(nus) == 4
    assert list(handle.parameters()) == factors + nus
    groups = handle.param_groups(1e-3, nu_lr=5e-2)
    assert [g["lr"] for g in groups] == [1e-3, 5e-2]
    assert handle.num_parameters() == 3 * (3 * 9 + 4) + 3 * 3 * (16 + 16)
    assert not any(p.requires_grad for p in model.parameters())


def test_output_is_the_merged_delta() -> None:
    model, x = model_and_input()
    handle = attach(model, targets="all", init_rank=3)
    train(handle, model, x, steps=5)
    torch.testing.assert_close(model(x), merged_output(model, handle, x), atol=1e-5, rtol=1e-4)


def test_regularizer_is_the_documented_sum() -> None:
    model, _ = model_and_input()
    config = LoRA2Config(
        rank_control="gradient", targets="attn", init_rank=3, prior_strength=0.5, prior_mean=1.5, prior_std=2.0
    )
    handle = attach(model, config)
    with torch.no_grad():
        for c in handle.components.values():
            c.up.fill_(0.1)
    lams = handle.rates().detach()
    weights = sum(float(c.down.detach().pow(2).sum() + c.up.detach().pow(2).sum()) for c in handle.components.values())
    weights /= 2.0
    expected = 0.5 * (float(((lams - 1.5) ** 2).sum()) / 8.0 + weights)
    assert float(handle.regularizer().detach()) == pytest.approx(expected, rel=1e-5)


def test_ranks_grow_and_shrink_without_moving_the_output_and_optimizer_follows() -> None:
    model, x = model_and_input()
    handle = attach(model, rank_control="gradient", targets="attn", init_rank=4, max_rank=12)
    optimizer = train(handle, model, x, steps=3)
    component = handle.components["to_q"]
    moments_before = optimizer.state[component.up]["exp_avg"].clone()
    width_before = component.width
    with torch.no_grad():  # what an optimizer step on ν would do; the resize happens in step()
        component.nu.fill_(R.nu_for_rate(R.rate_for_width(9, 0.85, 1)))
    before = model(x).detach()
    changes = handle.step(optimizer)
    assert component.width == 9 and changes["to_q"].old_width == width_before
    torch.testing.assert_close(model(x).detach(), before, atol=1e-6, rtol=1e-5)
    moments = optimizer.state[component.up]["exp_avg"]
    assert moments.shape == component.up.shape
    torch.testing.assert_close(moments[:, :width_before], moments_before)
    assert moments[:, width_before:].abs().sum() == 0
    assert any(p is component.up for p in optimizer.param_groups[0]["params"])
    train(handle, model, x, steps=2, optimizer=optimizer)  # keeps training after the surgery
    with torch.no_grad():
        component.nu.fill_(R.nu_for_rate(R.rate_for_width(3, 0.85, 1)))
    handle.step(optimizer)  # (the exact size of a shrink's change is pinned in test_layers.py)
    assert component.width == component.capacity == 3
    assert optimizer.state[component.up]["exp_avg"].shape == (16, 3)
    torch.testing.assert_close(model(x), merged_output(model, handle, x), atol=1e-5, rtol=1e-4)


def test_max_rank_caps_growth() -> None:
    model, _ = model_and_input()
    handle = attach(model, rank_control="gradient", targets="attn", init_rank=4, max_rank=6)
    with torch.no_grad():
        for component in handle.components.values():
            component.nu.fill_(-50.0)  # λ at its floor: the quantile wants thousands of positions
    handle.step()
    assert set(handle.ranks().values()) == {6}


def test_resize_every_keeps_storage_between_reallocations() -> None:
    model, x = model_and_input()
    handle = attach(model, rank_control="gradient", targets="attn", init_rank=6, resize_every=3)
    optimizer = torch.optim.Adam(handle.param_groups(1e-2))
    component = handle.components["to_v"]
    with torch.no_grad():
        component.nu.fill_(R.nu_for_rate(R.rate_for_width(4, 0.85, 1)))
    handle.step(optimizer)  # step 1: width follows ν, storage stays
    assert (component.width, component.capacity) == (4, 6)
    handle.step(optimizer)
    handle.step(optimizer)  # step 3: reallocation
    assert (component.width, component.capacity) == (4, 4)
    train(handle, model, x, steps=4, optimizer=optimizer)


def test_training_grows_rank_where_the_data_needs_it() -> None:
    """The ν-gradient ablation (rank_control="gradient") still grows where the data needs it (at lr 3e-3)."""
    torch.manual_seed(0)
    dim = 24
    model = nn.ModuleDict({"to_q": nn.Linear(dim, dim), "to_v": nn.Linear(dim, dim)}).requires_grad_(False)
    u, v = torch.linalg.qr(torch.randn(dim, 6))[0], torch.linalg.qr(torch.randn(dim, 6))[0]
    planted = u @ v.T
    handle = attach(model, rank_control="gradient", targets="attn", init_rank=2, max_rank=16)
    optimizer = torch.optim.Adam(handle.param_groups(3e-3, nu_lr=0.1))
    for _ in range(600):
        x = torch.randn(64, dim)
        with torch.no_grad(), handle.disabled():
            target_q = model["to_q"](x) + x @ planted.T
            target_v = model["to_v"](x)
        loss = F.mse_loss(model["to_q"](x), target_q) + F.mse_loss(model["to_v"](x), target_v)
        (loss + handle.regularizer()).backward()
        optimizer.step()
        optimizer.zero_grad()
        handle.step(optimizer)
    ranks = handle.ranks()
    assert 6 <= ranks["to_q"] <= 11
    assert ranks["to_v"] == 2
    assert float((handle.delta("to_q") - planted).norm() / planted.norm()) < 0.2


def test_state_dict_round_trip_is_exact() -> None:
    model, x = model_and_input()
    handle = attach(model, rank_control="gradient", targets="all", init_rank=3, max_rank=10)
    train(handle, model, x, steps=24)
    with torch.no_grad():  # make the shapes differ between components
        handle.components["to_q"].nu.fill_(R.nu_for_rate(R.rate_for_width(7, 0.85, 1)))
    train(handle, model, x, steps=1)
    assert handle.ranks()["to_q"] == 7 and handle.ranks()["to_v"] == 3
    state = handle.state_dict()
    expected = model(x)
    twin = copy.deepcopy(model_and_input()[0])
    restored = attach(twin, rank_control="gradient", targets="all", init_rank=3, max_rank=10)
    restored.load_state_dict(state)
    assert restored.ranks() == handle.ranks()
    assert restored.step_count == handle.step_count == 25
    torch.testing.assert_close(twin(x), expected, atol=0, rtol=0)
    for name in handle.ranks():
        torch.testing.assert_close(restored.components[name].nu, handle.components[name].nu, atol=0, rtol=0)
    with pytest.raises(LoRA2Error, match="does not fit"):
        attach(copy.deepcopy(twin), rank_control="gradient", targets="attn").load_state_dict(state)


def test_detach_restores_the_model_bit_for_bit() -> None:
    model, x = model_and_input()
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    original_out = model(x)
    handle = attach(model, targets="all", init_rank=3)
    train(handle, model, x, steps=5)
    assert not torch.equal(model(x), original_out)
    handle.detach()
    assert torch.equal(model(x), original_out)
    assert model.state_dict().keys() == original_state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original_state.items())
    with pytest.raises(LoRA2Error, match="detached"):
        handle.ranks()


def test_disabled_context_bypasses_adapters() -> None:
    model, x = model_and_input()
    base_out = model(x)
    handle = attach(model, targets="all", init_rank=3)
    train(handle, model, x, steps=3)
    with handle.disabled():
        assert torch.equal(model(x), base_out)
    assert not torch.equal(model(x), base_out)


def test_fixed_rank_never_changes_width() -> None:
    model, x = model_and_input()
    handle = attach(model, targets="attn", init_rank=5, adaptive=False, alpha=5.0)
    assert list(handle.nu_parameters()) == []
    assert len(handle.param_groups(1e-3)) == 1
    train(handle, model, x, steps=10)
    assert set(handle.ranks().values()) == {5}
    assert handle.step_count == 10


def test_freeze_ranks_stops_adaptation() -> None:
    model, _ = model_and_input()
    handle = attach(model, targets="attn", init_rank=4)
    handle.freeze_ranks()
    with torch.no_grad():
        for component in handle.components.values():
            component.nu.fill_(-50.0)
    assert handle.step() == {}
    assert set(handle.ranks().values()) == {4}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_trains_and_base_stays_unchanged(dtype: torch.dtype) -> None:
    model, x = model_and_input(dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    handle = attach(model, targets="attn", init_rank=3)
    assert all(c.down.dtype == torch.float32 for c in handle.components.values())
    train(handle, model, x, steps=5)
    out = model(x)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
    assert all(torch.isfinite(c.up).all() and c.up.abs().sum() > 0 for c in handle.components.values())


def test_storage_dtype_follows_config() -> None:
    model, x = model_and_input()
    handle = attach(model, targets="attn", init_rank=3, dtype="bfloat16")
    assert all(c.up.dtype == torch.bfloat16 for c in handle.components.values())
    train(handle, model, x, steps=2)
    assert model(x).dtype == torch.float32


def test_attach_with_overrides_on_a_config() -> None:
    model, _ = model_and_input()
    handle = attach(model, LoRA2Config(init_rank=5), targets="to_v")
    assert handle.ranks() == {"to_v": 5}
