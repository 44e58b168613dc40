"""The MB rule (lora2/sizes.py): decimal megabytes of fp16 numbers, the same everywhere a size is shown."""

from __future__ import annotations

import pytest
import torch

from comfyui_lora2.lora2 import LoRA2Error
from comfyui_lora2.lora2.adapter import Adapter, Component
from comfyui_lora2.lora2.prune import prune_to_budget
from comfyui_lora2.lora2.sizes import megabytes, parameters_in


def test_megabytes_are_decimal_and_fp16_by_default() -> None:
    assert megabytes(1_000_000) == 2.0 and megabytes(1_000_000, 4) == 4.0
    assert parameters_in(2.0) == 1_000_000 and parameters_in(2.0 - 1e-9) == 999_999
    for bad in (0, -2):
        with pytest.raises(LoRA2Error, match="bytes_per_number"):
            megabytes(10, bad)


def test_every_size_shown_follows_the_one_rule() -> None:
    adapter = Adapter({"fc": Component(torch.randn(300, 8), torch.randn(8, 200))})
    assert adapter.megabytes() == megabytes(4000) == 0.008
    pruned, report = prune_to_budget(adapter, max_megabytes=0.004)  # 2000 numbers: 4 of the 8 directions
    assert pruned.ranks() == {"fc": 4} and report.megabytes_after == pruned.megabytes() == 0.004
