"""Peak allocated bytes on CPU: the number ``torch.cuda.max_memory_allocated`` gives on a GPU.

Why not the resident set alone: on CPU, glibc serves every tensor of ≥ 32 MB (SD1.x-width attention
maps) with a fresh ``mmap`` and keeps freed smaller blocks in its heap, so the RSS high-water mark
measures the allocator's slack and fragmentation as much as what a trainer holds. Measured on the
SD1.x-width model, ``all`` r32 (bench/NOTES.md §12): native +683 MB RSS / +526 MB allocated, fixed
rank +662 / +450: the two readings disagree on the ratio by 0.1, the size of issue 13's target.

``malloc_in_use`` reads glibc's own count of bytes handed out and not freed (``mallinfo2``: heap chunks
in use plus mmapped chunks), which every CPU tensor goes through. :class:`PeakAllocated` samples it
after every ATen operation (forward and backward both dispatch through the mode), so its peak is the
peak of live tensors between operations: an operation's internal scratch space, freed before it
returns, is not seen (CUDA's counter does see it). Sampling costs microseconds per operation, so the
benchmark tracks one extra step after the timed ones (``speed_worker.StepClock``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

from torch.utils._python_dispatch import TorchDispatchMode

_MALLINFO2_FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2``: ten ``size_t`` fields, in this order."""

    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS]


@cache
def _mallinfo2():
    """glibc's ``mallinfo2`` (2.33+), or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        function = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    function.argtypes = []
    return function


def available() -> bool:
    return _mallinfo2() is not None


def malloc_in_use() -> int:
    """Bytes malloc has handed out and not had back: heap chunks in use plus mmapped chunks."""
    function = _mallinfo2()
    if function is None:
        raise RuntimeError("mallinfo2 is not available in this C library")
    info = function()
    return int(info.uordblks + info.hblkhd)


class PeakAllocated(TorchDispatchMode):
    """While entered, the highest :func:`malloc_in_use` seen after any ATen operation."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __enter__(self):
        self.peak = malloc_in_use()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        in_use = malloc_in_use()
        if in_use > self.peak:
            self.peak = in_use
        return out
