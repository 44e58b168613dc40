"""Keep an optimizer's per-parameter state in step with factors whose rank dimension changed size.

The engine resizes a factor by replacing its Parameter with a new, differently sized one
(:mod:`lora2.layers` says why). :func:`replace_parameter` puts the new Parameter where the old one
stood in the optimizer's param groups and moves its state over. Every state tensor shaped like the old parameter (Adam's
``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq``, SGD's ``momentum_buffer``, RMSprop's
``square_avg``, Prodigy's moments and ``p0`` ...) is rebuilt along the rank dimension: surviving
positions keep their values, new positions start at zero, dropped ones go. Scalars such as ``step``
are left alone, so a new position starts with zero moments under the same bias correction as the
rest (a gentle warm-up of that position; AWN instead resets the whole tensor's state).

State that is shaped differently from the parameter (block-quantised 8-bit states) cannot be
re-indexed; that parameter's state is dropped and the optimizer re-initialises it on its next step.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def _state_of(optimizer: torch.optim.Optimizer | None, param: torch.nn.Parameter) -> dict | None:
    if optimizer is None:
        return None
    state = optimizer.state.get(param)
    return state if state else None


def _per_element(value: torch.Tensor, param: torch.Tensor) -> bool:
    """Shaped like the parameter, or its flattened copy (one number per element either way)."""
    return value.shape == param.shape or (value.dim() == 1 and value.numel() == param.numel())


def _is_shaped_like(value: object, shape: torch.Size) -> bool:
    return torch.is_tensor(value) and value.shape == shape


def replace_parameter(
    optimizer: torch.optim.Optimizer | None,
    old: torch.nn.Parameter,
    new: torch.nn.Parameter,
    kept_index: torch.Tensor | None,
    dim: int,
) -> None:
    """Swap ``new`` in for ``old`` in ``optimizer`` and re-index ``old``'s state along ``dim``.

    ``kept_index[j]`` is the old position that new position ``j`` holds, or −1 for a new position.
    ``kept_index=None``: the new parameter's coordinates mean something else (a re-factored component);
    its state restarts as the optimizer initialises it.
    """
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if not state or kept_index is None:
        return
    if any(torch.is_tensor(v) and v.dim() > 0 and not _per_element(v, old) for v in state.values()):
        log.warning("optimizer state of a resized LoRA² factor is not per-element; it restarts from zero")
        return
    kept = kept_index >= 0
    new_positions = torch.nonzero(kept).flatten()
    old_positions = kept_index[kept]
    for key, value in list(state.items()):
        if not torch.is_tensor(value) or value.dim() == 0:
            continue
        shaped = value.view(old.shape)  # flat per-element state (Prodigy's p0) is re-indexed the same way
        fresh = torch.zeros(new.shape, dtype=value.dtype, device=value.device)
        if len(new_positions):
            source = shaped.index_select(dim, old_positions.to(value.device))
            fresh.index_copy_(dim, new_positions.to(value.device), source)
        state[key] = fresh if value.shape == old.shape else fresh.flatten()
    optimizer.state[new] = state


def zero_positions(
    optimizer: torch.optim.Optimizer | None, param: torch.nn.Parameter, start: int, stop: int, dim: int
) -> None:
    """Zero the state of positions ``[start, stop)`` along ``dim`` (deactivated, kept in storage)."""
    state = _state_of(optimizer, param)
    if state is None:
        return
    for value in state.values():
        if _is_shaped_like(value, param.shape):
            value.narrow(dim, start, stop - start).zero_()
