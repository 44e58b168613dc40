"""lora2/optimizer_state.py: optimizer state follows the rank positions through a resize."""

from __future__ import annotations

import logging

import pytest
import torch

from comfyui_lora2.lora2.optimizer_state import replace_parameter, zero_positions


def stepped(optimizer_cls, shape=(5, 4), **kwargs):
    param = torch.nn.Parameter(torch.randn(shape))
    optimizer = optimizer_cls([param], lr=0.1, **kwargs)
    for _ in range(3):
        param.grad = torch.randn(shape)
        optimizer.step()
    return param, optimizer


@pytest.mark.parametrize("dim", [0, 1])
def test_adam_moments_follow_their_positions(dim: int) -> None:
    old, optimizer = stepped(torch.optim.Adam, amsgrad=True)
    state = {k: v.clone() for k, v in optimizer.state[old].items()}
    size = old.shape[dim]
    kept_index = torch.tensor([0, 1, 2, -1, -1, -1]) if size == 5 else torch.tensor([0, 1, -1])
    new_shape = list(old.shape)
    new_shape[dim] = len(kept_index)
    new = torch.nn.Parameter(torch.zeros(new_shape))
    replace_parameter(optimizer, old, new, kept_index, dim)
    assert optimizer.param_groups[0]["params"] == [new]
    assert old not in optimizer.state
    moved = optimizer.state[new]
    kept = int((kept_index >= 0).sum())
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert moved[key].shape == new.shape
        torch.testing.assert_close(moved[key].narrow(dim, 0, kept), state[key].narrow(dim, 0, kept))
        assert moved[key].narrow(dim, kept, len(kept_index) - kept).abs().sum() == 0
    assert float(moved["step"]) == float(state["step"])
    new.grad = torch.randn(new_shape)
    optimizer.step()  # the optimizer accepts the resized state


def test_shrink_drops_the_removed_positions() -> None:
    old, optimizer = stepped(torch.optim.SGD, momentum=0.9)
    buffer = optimizer.state[old]["momentum_buffer"].clone()
    new = torch.nn.Parameter(torch.zeros(2, 4))
    replace_parameter(optimizer, old, new, torch.tensor([0, 1]), dim=0)
    torch.testing.assert_close(optimizer.state[new]["momentum_buffer"], buffer[:2])


def test_state_that_is_not_per_element_restarts(caplog: pytest.LogCaptureFixture) -> None:
    old, optimizer = stepped(torch.optim.Adam)
    optimizer.state[old]["quantised"] = torch.zeros(3)  # what a block-wise 8-bit optimizer keeps
    new = torch.nn.Parameter(torch.zeros(6, 4))
    with caplog.at_level(logging.WARNING):
        replace_parameter(optimizer, old, new, torch.tensor([0, 1, 2, 3, 4, -1]), dim=0)
    assert new not in optimizer.state and old not in optimizer.state
    assert "restarts from zero" in caplog.text


def test_zero_positions_clears_a_slice() -> None:
    param, optimizer = stepped(torch.optim.Adam)
    zero_positions(optimizer, param, 1, 3, dim=1)
    for key in ("exp_avg", "exp_avg_sq"):
        value = optimizer.state[param][key]
        assert value[:, 1:3].abs().sum() == 0 and value[:, 0].abs().sum() > 0


def test_no_optimizer_is_fine() -> None:
    old = torch.nn.Parameter(torch.zeros(2))
    replace_parameter(None, old, torch.nn.Parameter(torch.zeros(3)), torch.tensor([0, 1, -1]), 0)
    zero_positions(None, old, 0, 1, 0)


def test_flat_per_element_state_follows_its_positions() -> None:
    """Prodigy keeps a flattened copy of the parameter (p0); it is re-indexed like the moments."""
    old, optimizer = stepped(torch.optim.Adam)
    optimizer.state[old]["p0"] = old.detach().flatten().clone()
    new = torch.nn.Parameter(torch.zeros(6, 4))
    replace_parameter(optimizer, old, new, torch.tensor([0, 1, 2, 3, 4, -1]), dim=0)
    p0 = optimizer.state[new]["p0"]
    assert p0.shape == (24,)
    torch.testing.assert_close(p0.view(6, 4)[:5], old.detach())
    assert p0.view(6, 4)[5].abs().sum() == 0
