"""One LoRA² component: the factors of one adapted ``nn.Linear`` or ``nn.Conv2d`` and its ν.

The update is applied in activation space, ``x → down → × alpha·p → up``, so the full ΔW is never
built during training, and only the ``width`` active positions are computed. In METHOD.md's notation
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


class AdaptiveLoRA(nn.Module):
    """LoRA² factors for one base layer. ``adaptive=False`` is plain LoRA with the same arithmetic.

    Args:
        base: the frozen layer (``nn.Linear`` or a non-grouped ``nn.Conv2d``, or a subclass such as
            ComfyUI's ``comfy.ops`` layers). It is read for its shape and conv settings only.
        width: starting width (= ``init_rank``).
        nu: starting ν (ignored when not adaptive).
        alpha: output scale; plain LoRA's scale ``alpha / rank`` comes out of ``p = 1/rank``.
        adaptive: learn ν and follow it, or keep the width fixed with equal weights.
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
        self.generator = generator
        self.width = int(width)
        self.down = nn.Parameter(self._new_down_rows(self.width, dtype, device))
        self.up = nn.Parameter(torch.zeros(self._up_shape(self.width), dtype=dtype, device=device))
        self.nu = nn.Parameter(torch.tensor(float(nu), dtype=torch.float32, device=device), requires_grad=adaptive)

    # ----------------------------------------------------------------- shapes and initialisation
    @property
    def capacity(self) -> int:
        """Positions held in storage (≥ ``width``)."""
        return self.down.shape[0]

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW·x without building ΔW: ``up · (alpha·p ⊙ (down · x))`` on the active positions only."""
        compute_dtype = x.dtype if x.is_floating_point() else torch.float32
        scale = (self.alpha * self.importance()).to(compute_dtype)
        down = self.down[: self.width].to(compute_dtype)
        up = self.up[:, : self.width].to(compute_dtype)
        if not self.is_conv:
            return F.linear(F.linear(x, down) * scale, up)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            hidden = F.conv2d(x, down, stride=self.conv_kwargs["stride"], dilation=self.conv_kwargs["dilation"])
        else:
            hidden = F.conv2d(x, down, **self.conv_kwargs)
        return F.conv2d(hidden * scale.view(1, -1, 1, 1), up)

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
    def set_width(self, new_width: int, reallocate: bool) -> WidthChange:
        """Activate ``new_width`` positions; with ``reallocate``, make storage exactly that wide.

        Output continuity, by case (λ is the current rate, ``Z_D = Σ_{j<D} e^{−λ j}``):

        * grow: the newly active positions have ``up = 0`` (fresh rows, or rows whose ``up`` was zeroed
          when they were deactivated), so they add nothing; the survivors' weights drop from
          ``1/Z_old`` to ``1/Z_new`` and we multiply their ``up`` columns by ``Z_new / Z_old``.
          The output is unchanged to float rounding.
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
        if new_width != old_width:
            positions = torch.arange(max(new_width, old_width), device=self.nu.device, dtype=torch.float32)
            lam = self.rate().float() if self.adaptive else torch.zeros((), device=self.nu.device)
            weights = torch.exp(-lam * positions)
            z_old, z_new = weights[:old_width].sum(), weights[:new_width].sum()
            survivors = min(old_width, new_width)
            self.up.data[:, :survivors] *= (z_new / z_old).to(self.up.dtype)
            if new_width < old_width:
                self.up.data[:, new_width:old_width] = 0
                change.silenced = (new_width, old_width)
        if reallocate and new_width != self.capacity:
            change.kept_index, change.replaced = self._reallocate(new_width)
        self.width = new_width
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


@dataclass
class WidthChange:
    """What :meth:`AdaptiveLoRA.set_width` did, for optimizer-state surgery and for logs."""

    old_width: int
    new_width: int
    silenced: tuple[int, int] | None = None
    """Positions ``[start, stop)`` deactivated but kept in storage: zero their optimizer state."""
    kept_index: torch.Tensor | None = None
    """Set when storage was reallocated: per new position, the old position it holds, or −1 (new)."""
    replaced: tuple[tuple[nn.Parameter, nn.Parameter, int], ...] = ()
    """Set when storage was reallocated: ``(old parameter, new parameter, rank dimension)`` pairs."""
