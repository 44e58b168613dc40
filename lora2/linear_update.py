"""A linear component's update ``up · (scale ⊙ (down · x))`` as one autograd node that keeps no hidden activation.

Why a Function and not the autograd ops it replaces: built from ``F.linear`` and a multiply, autograd
keeps the hidden activation ``scale ⊙ (down · x)`` (tokens × width) of every adapted layer alive from
its forward until its backward, besides ``x`` (which the ``down`` gradient needs anyway). On the
SD1.x-width model at rank 32 that was ~4 MB of the step's peak (bench/NOTES.md §14). The backward
here recomputes the hidden activation from ``x``, one skinny matmul, the same cost as the forward's
``down · x``, which is small next to the base layer's own product when the rank is well below the
width. It also replaces about ten small autograd nodes per component (two slices, casts, the
matmuls' views, the multiply, the sketch's identity) with one, and hands the sketch its
``(x, ∂L/∂out)`` pair directly (what ``layers._ObserveGradient`` does for convolutions).

Under autocast the casts autocast would make are made here, explicitly, in the forward and again in
the backward (which autograd runs outside autocast), and the cast input is what is saved, as autocast's
own linear saves it. The products, casts and layouts are the ones autograd computes for the unfused
ops, so the output and the gradients are the same to the bit (``tests/test_fast_paths.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # layers.py imports this module
    from .layers import AdaptiveLoRA


class LinearUpdate(torch.autograd.Function):
    """``apply(x, down, up, scale, width, component)``: the update of the first ``width`` positions.

    ``down`` and ``up`` are the full-capacity Parameters (their gradients are zero beyond ``width``, as
    a slice's backward makes them); ``scale`` is ``alpha·p`` in ``x``'s dtype with no gradient of its
    own; ``component`` is the one whose sketch this backward feeds, or None.
    """

    @staticmethod
    def forward(ctx, x, down, up, scale, width: int, component: AdaptiveLoRA | None):
        device = x.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            x_cast = x.to(compute)
            rows = x_cast.reshape(-1, x_cast.shape[-1])
            hidden = _hidden(rows, _cast(down[:width], x.dtype, compute), scale)
            out = hidden.to(compute).mm(_cast(up[:, :width], x.dtype, compute).t())
        # The sketch reads the layer's own input, as _ObserveGradient does; saved twice costs nothing
        # when no cast was made, and the count of saved tensors never depends on observing (a
        # checkpointed block's recomputation must save what its first pass saved).
        observed = x if component is not None else x_cast
        ctx.save_for_backward(x_cast, observed, down, up, scale)
        ctx.width, ctx.component, ctx.compute, ctx.x_dtype = width, component, compute, x.dtype
        return out.view(*x.shape[:-1], up.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Unpack first: under gradient checkpointing this is what recomputes the block, and the
        # recomputation must find the component in the state the first pass saw (see _ObserveGradient).
        x_cast, observed, down, up, scale = ctx.saved_tensors
        component, width, compute = ctx.component, ctx.width, ctx.compute
        if component is not None and component._observed_token != component.observe_token:
            component._observed_token = component.observe_token
            component._observe(observed.detach(), grad)
        need_x, need_down, need_up = ctx.needs_input_grad[:3]
        with torch.autocast(grad.device.type, enabled=False):
            rows = x_cast.reshape(-1, x_cast.shape[-1])
            grad_rows = grad.reshape(-1, up.shape[0])
            x_dtype = ctx.x_dtype
            active_up = _cast(up[:, :width], x_dtype, compute)
            down_cast = _cast(down[:width], x_dtype, compute)
            grad_x = grad_down = grad_up = None
            if need_x or need_down:
                # ``· scale`` promotes as the forward's multiply did; the cast back is autograd's to ``hidden``.
                grad_hidden = (grad_rows.mm(active_up) * scale).to(compute)
                if need_x:
                    grad_x = grad_hidden.mm(down_cast).view(x_cast.shape).to(x_dtype)
                if need_down:
                    grad_down = _padded(_cast(grad_hidden.t().mm(rows), x_dtype, down.dtype), down)
            if need_up:
                hidden = _hidden(rows, down_cast, scale).to(compute)  # recomputed, not saved
                # In the layout autograd's mm backward picks (by whether the active columns of ``up``
                # reach the product contiguous): the other layout rounds differently.
                if active_up.is_contiguous():
                    grad_up = grad_rows.t().mm(hidden)
                else:
                    grad_up = hidden.t().mm(grad_rows).t()
                grad_up = _padded(_cast(grad_up, x_dtype, up.dtype), up, dim=1)
        return grad_x, grad_down, grad_up, None, None, None


def _cast(tensor: torch.Tensor, via: torch.dtype, to: torch.dtype) -> torch.Tensor:
    """``tensor.to(via).to(to)``: the unfused forward casts a factor to the input's dtype, then autocast
    casts it to its own; going through both keeps the rounding of every combination (no-ops when equal)."""
    return tensor.to(via).to(to)


def _hidden(rows: torch.Tensor, down_cast: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale ⊙ (down · x)`` over rows, in the dtype the multiply promotes to (as the unfused ops)."""
    return rows.mm(down_cast.t()) * scale


def _padded(grad: torch.Tensor, parameter: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``grad`` of the active positions as a gradient of the whole ``parameter`` (zero beyond them)."""
    if grad.shape[dim] == parameter.shape[dim]:
        return grad
    full = grad.new_zeros(parameter.shape)
    full.narrow(dim, 0, grad.shape[dim]).copy_(grad)
    return full
