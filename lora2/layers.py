"""One LoRA² component: the factors of one adapted ``nn.Linear`` or ``nn.Conv2d`` and its ν.

The update is applied in activation space, ``x → down → × alpha·p → up``, so the full ΔW is never
built during training, and only the ``width`` active positions are computed. In the paper's notation (arXiv 2603.21884)
``down`` is A (``width × in``) and ``up`` is B (``out × width``).

Storage (``capacity`` positions) and the active ``width`` are separate on purpose: the width follows
ν at every optimizer step, while storage is reallocated every ``resize_every`` steps. Positions in
storage beyond the width are kept with ``up = 0`` so that re-activating them cannot make the output
jump; reallocating storage never changes the output at all (see :meth:`AdaptiveLoRA.set_width`).

A reallocation makes new Parameter objects for ``down`` and ``up``: swapping ``param.data`` to a new
shape would keep the old autograd accumulator alive in any graph still referenced (a ``loss`` kept
from the previous iteration), and the next backward would fail on the stale shape.
:mod:`lora2.optimizer_state` swaps the new tensors into the optimizer and resizes their state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import rank as rank_math
from .growth import GradientSketch
from .linear_update import LinearUpdate
from .spectrum import factor_svd

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes :class:`LinearUpdate` has been checked in against the unfused ops (tests/test_fast_paths.py)."""


class AdaptiveLoRA(nn.Module):
    """LoRA² factors for one base layer. ``adaptive=False`` is plain LoRA with the same arithmetic.

    Args:
        base: the frozen layer (``nn.Linear`` or a non-grouped ``nn.Conv2d``, or a subclass such as
            ComfyUI's ``comfy.ops`` layers). It is read for its shape and conv settings only.
        width: starting width (= ``init_rank``).
        nu: starting ν (ignored when not adaptive).
        alpha: output scale; plain LoRA's scale ``alpha / rank`` comes out of ``p = 1/rank``.
        adaptive: learn ν and follow it, or keep the width fixed with equal weights.
        compensate: rows written by rank control get norms ``∝ p(0)/p(i)`` (see :meth:`row_norms`).
        dtype, device: storage of the factors.
        generator: seeds the initial ``down`` rows and every row added later.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        width: int,
        nu: float,
        alpha: float,
        adaptive: bool,
        compensate: bool = False,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            if base.groups != 1:
                raise ValueError("grouped convolutions are not supported")
            in_features, out_features = base.in_channels, base.out_channels
            self.kernel_size = tuple(base.kernel_size)
            self.conv_kwargs = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
            self.padding_mode = base.padding_mode
            self._reversed_padding = getattr(base, "_reversed_padding_repeated_twice", None)
        else:
            in_features, out_features = base.in_features, base.out_features
            self.kernel_size = ()
        self.in_features = in_features
        self.out_features = out_features
        self.alpha = float(alpha)
        self.adaptive = adaptive
        self.compensate = compensate
        self.generator = generator
        self.width = int(width)
        self.down = nn.Parameter(self._new_down_rows(self.width, dtype, device))
        self.up = nn.Parameter(torch.zeros(self._up_shape(self.width), dtype=dtype, device=device))
        self.nu = nn.Parameter(torch.tensor(float(nu), dtype=torch.float32, device=device), requires_grad=adaptive)
        self.sketch: GradientSketch | None = None
        """Set by the handle when widths follow gradient evidence; fed from the backward pass."""
        self.observe_token: object = 0
        """Changes once per optimizer step: the sketch takes one gradient per step (not a recomputation's).
        None: the coming steps are not observed (the handle sets it where no decision could use them)."""
        self._observed_token: object = None
        self._scale_key: tuple | None = None
        self._scale: torch.Tensor | None = None

    # ----------------------------------------------------------------- shapes and initialisation
    @property
    def capacity(self) -> int:
        """Positions held in storage (≥ ``width``)."""
        return self.down.shape[0]

    @property
    def sketchable(self) -> bool:
        """Whether the gradient sketch can read this layer (string paddings such as 'same' cannot be unfolded)."""
        return not self.is_conv or not isinstance(self.conv_kwargs["padding"], str)

    @property
    def fan_in(self) -> int:
        return self.in_features * math.prod(self.kernel_size)

    def _up_shape(self, positions: int) -> tuple[int, ...]:
        return (self.out_features, positions, 1, 1) if self.is_conv else (self.out_features, positions)

    def _new_down_rows(self, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Rows for new positions: ``U(−1/√fan_in, 1/√fan_in)``, as ``nn.Linear`` and PEFT start A.

        Every position, first or grown later, is drawn from the same distribution: with ``up = 0`` the
        output does not move, and Adam's per-coordinate step makes a new position learn at the same
        pace as the old ones, whatever its importance.
        """
        bound = 1.0 / math.sqrt(self.fan_in)
        shape = (count, self.in_features, *self.kernel_size)
        rows = torch.rand(shape, generator=self.generator, dtype=torch.float32) * (2 * bound) - bound
        return rows.to(device=device, dtype=dtype)

    # ----------------------------------------------------------------- importance and output
    def rate(self) -> torch.Tensor:
        return rank_math.rate(self.nu)

    def importance(self) -> torch.Tensor:
        """``p`` over the active positions: learned decay when adaptive, ``1/width`` each when not."""
        if not self.adaptive:
            return rank_math.uniform_importance(self.width, self.nu.device)
        return rank_math.importance(self.rate(), self.width)

    def scale(self, dtype: torch.dtype) -> torch.Tensor:
        """``alpha·p`` in ``dtype``: computed once and reused by every forward until ν or the width changes.

        ``p`` costs about ten small kernels; a model with a hundred components calls its hooks a hundred
        times per forward (twice with gradient checkpointing, again in every evaluation), which on a
        small model was a tenth of the step. The cache is keyed on what ``p`` depends on: the width and
        ν's storage and version counter (every in-place change, an optimizer step or ``fill_``, bumps
        it). Only when ν is being learned and gradients are on is ``p`` part of the graph, and rebuilt.
        """
        if self.nu.requires_grad and torch.is_grad_enabled():
            return (self.alpha * self.importance()).to(dtype)
        key = (self.width, self.nu.data_ptr(), self.nu._version, dtype, self.adaptive)
        if self._scale_key != key or self._scale is None:
            with torch.no_grad():
                self._scale = (self.alpha * self.importance()).to(dtype)
            self._scale_key = key
        return self._scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW·x without building ΔW: ``up · (alpha·p ⊙ (down · x))`` on the active positions only."""
        compute_dtype = x.dtype if x.is_floating_point() else torch.float32
        scale = self.scale(compute_dtype)
        if self._fused_linear(x, scale):
            component = self if self.sketch is not None and self.observing else None
            return LinearUpdate.apply(x, self.down, self.up, scale, self.width, component)
        down = self.down[: self.width].to(compute_dtype)
        up = self.up[:, : self.width].to(compute_dtype)
        if not self.is_conv:
            out = F.linear(F.linear(x, down) * scale, up)
        elif self.padding_mode != "zeros":
            padded = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            hidden = F.conv2d(padded, down, stride=self.conv_kwargs["stride"], dilation=self.conv_kwargs["dilation"])
            out = F.conv2d(hidden * scale.view(1, -1, 1, 1), up)
        else:
            out = F.conv2d(F.conv2d(x, down, **self.conv_kwargs) * scale.view(1, -1, 1, 1), up)
        if self.sketch is not None and out.requires_grad and self.observing:
            out = _ObserveGradient.apply(out, x, self)
        return out

    def _fused_linear(self, x: torch.Tensor, scale: torch.Tensor) -> bool:
        """Whether :class:`LinearUpdate` computes this forward: a linear layer with a fixed ``alpha·p``
        (autocast and mixed dtypes included). The unfused ops remain for convolutions, a ν learned
        through its gradient, forwards without gradients (which save nothing anyway), and devices
        autocast does not know (``meta``: the Function switches autocast off around its products)."""
        return (
            not self.is_conv
            and torch.is_grad_enabled()
            and torch.amp.is_autocast_available(x.device.type)
            and x.dtype in _FUSED_DTYPES
            and self.down.dtype in _FUSED_DTYPES
            and self.up.dtype in _FUSED_DTYPES
            and not scale.requires_grad
            and (x.requires_grad or self.down.requires_grad or self.up.requires_grad)
        )

    @property
    def observing(self) -> bool:
        """Whether this step's backward still feeds the sketch (outside it, no autograd node is added)."""
        return self.observe_token is not None and self._observed_token != self.observe_token

    def _observe(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Hand the sketch this step's inputs and output gradients (``G = δᵀx``, rows = tokens or patches)."""
        if self.sketch is None:
            return
        if not self.is_conv:
            self.sketch.observe(x.reshape(-1, self.in_features), grad.reshape(-1, self.out_features))
            return
        padding = self.conv_kwargs["padding"]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            padding = (0, 0)
        self.sketch.observe_conv(
            x,
            grad,
            self.kernel_size,
            stride=self.conv_kwargs["stride"],
            padding=padding,
            dilation=self.conv_kwargs["dilation"],
        )

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """ΔW in the base weight's shape (float32): ``alpha · B diag(p) A`` over the active positions."""
        p = self.alpha * self.importance().float()
        down = self.down[: self.width].float().flatten(1)
        up = self.up[:, : self.width].float().flatten(1)
        delta = up @ (p[:, None] * down)
        return delta.view(self.out_features, self.in_features, *self.kernel_size)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Trainable factor tensors (for the weight prior)."""
        return self.down, self.up

    def num_parameters(self) -> int:
        """Trainable numbers in the active positions (what a saved adapter will hold)."""
        return self.width * (self.fan_in + self.out_features)

    # ----------------------------------------------------------------- width changes
    @torch.no_grad()
    def set_width(self, new_width: int, reallocate: bool, nu: float | None = None) -> WidthChange:
        """Activate ``new_width`` positions; with ``reallocate``, make storage exactly that wide.

        ``nu`` (optional) sets ν in the same move, for rank control that derives ν from the width.

        Output continuity, by case (``p`` before, ``p'`` after: the importance weights of the old and
        new width, at the old and new ν):

        * grow: the newly active positions have ``up = 0`` (fresh rows, or rows whose ``up`` was zeroed
          when they were deactivated), so they add nothing; each survivor's ``up`` column is multiplied
          by ``p(i) / p'(i)``, which keeps its contribution. The output is unchanged to float rounding.
        * shrink: the survivors are rescaled the same way, so the only change is the removal of the
          dropped positions' own contributions, the least important ones by construction. Their
          ``up`` is zeroed (and, by the caller, their optimizer moments) so that they come back
          silent if ν asks for them again before storage is reallocated.
        * reallocation only drops inactive positions (``up = 0``) or appends silent ones: no change.

        Without ``reallocate`` the width cannot pass the storage: the caller clamps it.
        """
        new_width = int(new_width)
        old_width = self.width
        if not reallocate and new_width > self.capacity:
            raise ValueError(f"width {new_width} exceeds storage {self.capacity} without reallocation")
        change = WidthChange(old_width=old_width, new_width=new_width)
        before = self.importance().float()
        if nu is not None:
            self.nu.fill_(float(nu))
        if new_width != old_width or nu is not None:
            self.width = new_width
            after = self.importance().float()
            survivors = min(old_width, new_width)
            ratio = (before[:survivors] / after[:survivors]).to(self.up.dtype)
            self.up.data[:, :survivors] *= ratio.view(1, -1, *([1] * (self.up.dim() - 2)))
            if new_width < old_width:
                self.up.data[:, new_width:old_width] = 0
                change.silenced = (new_width, old_width)
        if reallocate and new_width != self.capacity:
            change.kept_index, change.replaced = self._reallocate(new_width)
        self.width = new_width
        return change

    def row_norms(self, width: int) -> torch.Tensor:
        """The norm each position's ``down`` row gets when rank control (re)writes it.

        ``1/√3`` is the expected norm of a ``U(−1/√fan_in, 1/√fan_in)`` row, the initial one. With
        ``compensate`` (see :class:`~lora2.config.LoRA2Config`), position ``i`` gets ``p(0)/p(i)`` times
        that, so that every position's ΔW moves at the first position's pace under Adam.
        """
        norms = torch.full((width,), 1.0 / math.sqrt(3.0))
        if self.compensate and self.adaptive:
            p = self.importance().float().cpu()
            norms = norms * (p[0] / p)
        return norms

    @torch.no_grad()
    def grow(self, directions: torch.Tensor, nu: float) -> WidthChange:
        """Add ``len(directions)`` positions whose ``down`` rows point along ``directions [g, fan_in]``.

        Their ``up`` columns start at zero, so the output does not move; the gradient of a new ``up``
        column is then ``alpha·p·G·a``, the largest first-order decrease of the loss a rank-one step can
        have when ``a`` is ``G``'s top right singular vector (GradMax).
        """
        old_width = self.width
        change = self.set_width(old_width + directions.shape[0], reallocate=True, nu=nu)
        norms = self.row_norms(self.width)[old_width:].to(self.down.device)
        rows = directions.to(self.down.device, torch.float32) * norms[:, None]
        self.down.data[old_width : self.width] = rows.view(-1, self.in_features, *self.kernel_size).to(self.down.dtype)
        return change

    @torch.no_grad()
    def refactor(self, keep: int, nu: float) -> WidthChange:
        """Re-write the factors as ΔW's leading ``keep`` singular directions, in decreasing order.

        Exact for what is kept (Eckart–Young for what is dropped), and it puts the strongest direction
        at position 0, where the importance weights expect it. New Parameters, so the optimizer state
        of this component restarts (its coordinates were rotated): ``WidthChange.kept_index`` is None.
        """
        scaled_up = self.up[:, : self.width].float().flatten(1) * (self.alpha * self.importance().float())
        u, s, vh = factor_svd(scaled_up, self.down[: self.width].float().flatten(1))
        keep = max(1, min(int(keep), s.numel()))
        change = WidthChange(old_width=self.width, new_width=keep)
        self.width = keep
        self.nu.fill_(float(nu))
        norms = self.row_norms(keep).double().to(s.device)
        weights = self.alpha * self.importance().double()
        down = vh[:keep] * norms[:, None]
        up = u[:, :keep] * (s[:keep] / (weights * norms))
        dtype, device = self.down.dtype, self.down.device
        old_down, old_up = self.down, self.up
        self.down = nn.Parameter(
            down.view(keep, self.in_features, *self.kernel_size).to(device, dtype).contiguous(),
            requires_grad=old_down.requires_grad,
        )
        self.up = nn.Parameter(
            up.view(self._up_shape(keep)).to(device, dtype).contiguous(), requires_grad=old_up.requires_grad
        )
        change.replaced = ((old_down, self.down, 0), (old_up, self.up, 1))
        return change

    @torch.no_grad()
    def load_factors(self, down: torch.Tensor, up: torch.Tensor) -> None:
        """Replace storage with saved factors (new Parameters; any optimizer must be built after)."""
        dtype, device = self.down.dtype, self.down.device
        self.down = nn.Parameter(down.to(device, dtype).clone(), requires_grad=self.down.requires_grad)
        self.up = nn.Parameter(up.to(device, dtype).clone(), requires_grad=self.up.requires_grad)

    def _reallocate(self, new_capacity: int) -> tuple[torch.Tensor, tuple]:
        """Make storage ``new_capacity`` wide with new Parameters.

        Returns, per new position, its old position or −1, and the ``(old, new, dim)`` parameter pairs.
        """
        old_capacity = self.capacity
        kept = min(old_capacity, new_capacity)
        dtype, device = self.down.dtype, self.down.device
        down = torch.empty((new_capacity, self.in_features, *self.kernel_size), dtype=dtype, device=device)
        down[:kept] = self.down.data[:kept]
        up = torch.zeros(self._up_shape(new_capacity), dtype=dtype, device=device)
        up[:, :kept] = self.up.data[:, :kept]
        if new_capacity > old_capacity:
            down[old_capacity:] = self._new_down_rows(new_capacity - old_capacity, dtype, device)
        old_down, old_up = self.down, self.up
        self.down = nn.Parameter(down, requires_grad=old_down.requires_grad)
        self.up = nn.Parameter(up, requires_grad=old_up.requires_grad)
        index = torch.full((new_capacity,), -1, dtype=torch.long)
        index[:kept] = torch.arange(kept)
        return index, ((old_down, self.down, 0), (old_up, self.up, 1))


class _ObserveGradient(torch.autograd.Function):
    """Identity on a component's output whose backward hands ``(x, ∂L/∂out)`` to its gradient sketch.

    Why a Function and not a hook on ``out`` whose closure holds ``x``: ``x`` saved here goes through
    autograd's saved-tensor machinery, so gradient checkpointing frees and recomputes it like every other
    activation, while a closure kept every adapted layer's input alive through the whole forward
    (measured: +240 MB on the SD1.x-width model with checkpointing, bench/NOTES.md). It is applied in
    every forward with gradients (a checkpointed block's recomputation must save what the first pass
    saved); the sketch takes one gradient per optimizer step, the first backward that reaches it.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, x: torch.Tensor, component: AdaptiveLoRA) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.component = component
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        component = ctx.component
        if component._observed_token != component.observe_token:
            # Unpack first: in a checkpointed block this can trigger the block's recomputation, which
            # must still see this component observing (as the first pass did) to save the same tensors.
            (x,) = ctx.saved_tensors
            component._observed_token = component.observe_token
            component._observe(x.detach(), grad)
        return grad, None, None


@dataclass
class WidthChange:
    """What :meth:`AdaptiveLoRA.set_width` did, for optimizer-state surgery and for logs."""

    old_width: int
    new_width: int
    silenced: tuple[int, int] | None = None
    """Positions ``[start, stop)`` deactivated but kept in storage: zero their optimizer state."""
    kept_index: torch.Tensor | None = None
    """Set when storage was reallocated: per new position, the old position it holds, or −1 (new).
    None with ``replaced`` set: the factors were rotated (re-factored) and their optimizer state restarts."""
    replaced: tuple[tuple[nn.Parameter, nn.Parameter, int], ...] = ()
    """Set when storage was reallocated: ``(old parameter, new parameter, rank dimension)`` pairs."""
