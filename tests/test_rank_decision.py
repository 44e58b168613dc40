"""lora2/rank_decision.py: where widths start, how they follow ν, when they freeze, how pruning reads them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from comfyui_lora2.lora2 import LoRA2Config, attach
from comfyui_lora2.lora2 import rank as rank_math
from comfyui_lora2.lora2.rank_decision import freeze_step, mass_width, start_nu, target_widths
from comfyui_lora2.lora2.train import TrainConfig


@pytest.mark.parametrize("init_rank", [2, 3, 7, 16])
def test_every_component_starts_at_init_rank(init_rank: int) -> None:
    config = LoRA2Config(init_rank=init_rank, max_rank=32, rank_control="gradient")
    lam = float(rank_math.rate(torch.tensor(start_nu(config))))
    assert target_widths([lam], config) == [init_rank]
    handle = attach(nn.Sequential(nn.Linear(8, 8)), config, targets=r"^0$")
    assert handle.ranks() == {"0": init_rank}
    assert start_nu(LoRA2Config(adaptive=False)) == 0.0


def test_target_widths_follow_the_rate_within_the_bounds() -> None:
    config = LoRA2Config(init_rank=4, max_rank=10, mass=0.85, margin=1)
    q = rank_math.mass_quantile(0.85)
    assert target_widths([q / 3, q / 2.5, q / 100, 1e9], config) == [4, 4, 10, 2]  # ⌈q/λ⌉ + 1, capped at 10


def test_freeze_step_is_the_last_fraction_rounded_down() -> None:
    assert [freeze_step(100, f) for f in (0.0, 0.2, 0.25)] == [100, 80, 75]
    assert freeze_step(9, 0.3) == 7 and TrainConfig(steps=9, rank_freeze_fraction=0.3).freeze_step == 7


def test_mass_width_reads_the_same_distribution_back() -> None:
    nu = rank_math.nu_for_rate(2.0)  # p ∝ e^{-2i}: 86 % on position 0, 98 % on the first two
    assert [mass_width(nu, 8, m) for m in (0.5, 0.9, 0.99, 1.0)] == [1, 2, 3, 8]
