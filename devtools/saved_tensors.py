"""Counting what autograd saves for the backward: the memory tests of issue 13 (tests/test_fast_paths.py,
tests/test_train.py) read it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def saved_storages(excluded: Iterable[torch.Tensor] = ()) -> Iterator[dict[int, int]]:
    """Within the ``with``: ``{storage address: bytes}`` of every tensor autograd saves, each storage once.

    Storages of ``excluded`` (parameters, which exist anyway) are left out. A checkpointed region saves
    through its own hooks, so what is counted while one runs is what it cannot free.
    """
    owned = {tensor.untyped_storage().data_ptr() for tensor in excluded}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield storages
