"""The MB rule, written once: an adapter's size is its parameter count times the bytes each number takes.

Why fp16 (2 bytes) by default: LoRA² Save writes float16, and that is the size a user sees on disk (the
file adds a small header and one alpha per component on top). Megabytes are decimal (10⁶ bytes), as
file browsers and model hubs show them.
"""

from __future__ import annotations

from .errors import LoRA2Error

FP16_BYTES = 2
"""Bytes per number of the saved file's default dtype (float16)."""
BYTES_PER_MB = 1_000_000


def check_bytes_per_number(bytes_per_number: int) -> None:
    if bytes_per_number < 1:
        raise LoRA2Error(f"bytes_per_number must be at least 1 (2 for fp16), got {bytes_per_number}")


def megabytes(parameters: int, bytes_per_number: int = FP16_BYTES) -> float:
    """Size in MB of ``parameters`` numbers stored with ``bytes_per_number`` bytes each."""
    check_bytes_per_number(bytes_per_number)
    return parameters * bytes_per_number / BYTES_PER_MB


def parameters_in(megabytes_: float, bytes_per_number: int = FP16_BYTES) -> int:
    """The most numbers that fit in ``megabytes_`` MB at ``bytes_per_number`` bytes each (the inverse)."""
    check_bytes_per_number(bytes_per_number)
    return int(megabytes_ * BYTES_PER_MB // bytes_per_number)
