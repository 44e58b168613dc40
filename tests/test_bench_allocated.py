"""The CPU memory counter the speed benchmark's ratios read (``bench/allocated.py``)."""

from __future__ import annotations

import pytest
import torch

from comfyui_lora2.bench import allocated

pytestmark = pytest.mark.skipif(not allocated.available(), reason="glibc's mallinfo2 is not in this C library")


def test_in_use_count_follows_a_tensor_allocated_and_freed() -> None:
    before = allocated.malloc_in_use()
    block = torch.empty(16 * 2**20, dtype=torch.uint8)  # 16 MiB
    held = allocated.malloc_in_use() - before
    del block
    freed = allocated.malloc_in_use() - before
    assert 15 * 2**20 < held < 17 * 2**20
    assert abs(freed) < 2**20


def test_peak_sees_a_temporary_that_is_gone_when_the_mode_exits() -> None:
    """The peak is what was live between operations, though nothing of it is live at the end."""
    x = torch.ones(2**20)  # 4 MiB
    for _ in range(2):  # the first pass also pays for the mode's one-time imports and caches
        with allocated.PeakAllocated() as tracker:
            start = tracker.peak
            total = (x * 2 + 1).sum()  # two 4 MiB temporaries, freed before the mode exits
    assert total.item() == 3 * 2**20
    assert tracker.peak - start > 7 * 2**20
    assert allocated.malloc_in_use() - start < 2**20
