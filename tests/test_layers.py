"""lora2/layers.py: one component's output, ΔW, dtypes, and what happens to the output at a resize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comfyui_lora2.lora2 import rank as R
from comfyui_lora2.lora2.layers import AdaptiveLoRA


def make_component(base: nn.Module, width: int = 6, adaptive: bool = True, lam: float = 0.3) -> AdaptiveLoRA:
    component = AdaptiveLoRA(
        base,
        width=width,
        nu=R.nu_for_rate(lam),
        alpha=4.0,
        adaptive=adaptive,
        dtype=torch.float32,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(1),
    )
    with torch.no_grad():  # a trained-looking component: non-zero up
        component.up.normal_(0.0, 0.2)
    return component


BASES = {
    "linear": lambda: nn.Linear(12, 10),
    "conv1x1": lambda: nn.Conv2d(6, 5, 1),
    "conv3x3": lambda: nn.Conv2d(6, 5, 3, padding=1),
    "conv3x3_stride2": lambda: nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=False),
    "conv3x3_reflect": lambda: nn.Conv2d(6, 5, 3, padding=1, padding_mode="reflect"),
}


def sample_input(base: nn.Module) -> torch.Tensor:
    if isinstance(base, nn.Conv2d):
        return torch.randn(2, base.in_channels, 9, 9)
    return torch.randn(3, 4, base.in_features)


def apply_delta(base: nn.Module, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the layer computes with ΔW merged into its weight (the reference for the hook)."""
    if isinstance(base, nn.Conv2d):
        return base._conv_forward(x, base.weight + delta, base.bias) - base(x)
    return F.linear(x, delta)


@pytest.mark.parametrize("kind", list(BASES))
def test_activation_space_update_equals_merged_delta(kind: str) -> None:
    base = BASES[kind]()
    component = make_component(base)
    x = sample_input(base)
    delta = component.delta_weight()
    assert delta.shape == base.weight.shape
    torch.testing.assert_close(component(x), apply_delta(base, delta, x), atol=1e-5, rtol=1e-4)


def test_delta_is_alpha_b_diag_p_a() -> None:
    base = nn.Linear(8, 7)
    component = make_component(base, width=5)
    p = component.importance().detach()
    expected = 4.0 * component.up.detach() @ torch.diag(p) @ component.down.detach()
    torch.testing.assert_close(component.delta_weight(), expected)
    assert component.num_parameters() == 5 * (8 + 7)


def test_fixed_rank_is_plain_lora_scale() -> None:
    base = nn.Linear(8, 7)
    component = make_component(base, width=4, adaptive=False)
    torch.testing.assert_close(component.importance(), torch.full((4,), 0.25))
    assert not component.nu.requires_grad
    expected = (4.0 / 4) * component.up.detach() @ component.down.detach()
    torch.testing.assert_close(component.delta_weight(), expected)


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_gradients_reach_nu_and_both_factors(kind: str) -> None:
    base = BASES[kind]()
    component = make_component(base)
    component(sample_input(base)).pow(2).mean().backward()
    for param in (component.down, component.up, component.nu):
        assert param.grad is not None and float(param.grad.abs().sum()) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations(dtype: torch.dtype) -> None:
    base = nn.Linear(16, 12)
    component = make_component(base)
    x = torch.randn(5, 16)
    reference = component(x)
    out = component(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)
    out.float().pow(2).sum().backward()
    assert component.up.grad.dtype == torch.float32 and torch.isfinite(component.up.grad).all()
    assert torch.isfinite(component.nu.grad)


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("new_width", [9, 13])
def test_grow_keeps_the_output(kind: str, new_width: int) -> None:
    base = BASES[kind]()
    component = make_component(base, width=6)
    x = sample_input(base)
    before = component(x).detach()
    change = component.set_width(new_width, reallocate=True)
    assert component.width == component.capacity == new_width
    assert change.kept_index.tolist() == list(range(6)) + [-1] * (new_width - 6)
    assert component.up[:, 6:].abs().sum() == 0  # new positions start silent
    torch.testing.assert_close(component(x).detach(), before, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", list(BASES))
def test_shrink_removes_exactly_the_dropped_positions(kind: str) -> None:
    """Survivors are rescaled for the new normaliser; only the dropped positions' own terms vanish."""
    base = BASES[kind]()
    component = make_component(base, width=8)
    x = sample_input(base)
    p = component.importance().detach()
    before = component(x).detach()
    dropped = component.up.detach()[:, 5:8] if not component.is_conv else component.up.detach()[:, 5:8, 0, 0]
    down = component.down.detach()[5:8].flatten(1)
    dropped_delta = (4.0 * dropped @ torch.diag(p[5:8]) @ down).view_as(base.weight)
    component.set_width(5, reallocate=False)  # deactivate, keep storage
    deactivated = component(x).detach()
    torch.testing.assert_close(deactivated, before - apply_delta(base, dropped_delta, x), atol=1e-5, rtol=1e-4)
    component.set_width(5, reallocate=True)  # now free the storage: no change at all
    assert component.capacity == 5
    torch.testing.assert_close(component(x).detach(), deactivated, atol=0, rtol=0)


def test_reactivated_positions_come_back_silent() -> None:
    base = nn.Linear(12, 10)
    component = make_component(base, width=8)
    x = sample_input(base)
    component.set_width(5, reallocate=False)
    shrunk = component(x).detach()
    change = component.set_width(8, reallocate=False)
    assert change.kept_index is None and component.capacity == 8
    torch.testing.assert_close(component(x).detach(), shrunk, atol=1e-6, rtol=1e-5)


def test_width_cannot_pass_storage_without_reallocation() -> None:
    component = make_component(nn.Linear(4, 4), width=3)
    with pytest.raises(ValueError, match="exceeds storage"):
        component.set_width(5, reallocate=False)


def test_grouped_convolutions_are_refused() -> None:
    with pytest.raises(ValueError, match="grouped"):
        make_component(nn.Conv2d(4, 4, 3, groups=2))
