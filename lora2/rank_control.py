"""How a LoRA² component's rank is decided while it trains: the rules, as pure functions.

Every ``decide_every`` optimizer steps, each component asks two questions (``rank_control="evidence"``,
the default):

* **Grow?** Its :class:`~lora2.growth.GradientSketch` tracks the directions of the loss gradient that
  no existing position can follow. Direction ``j`` counts when its z-statistic exceeds ``growth_z``
  (it is not noise) *and* its strength is at least ``growth_fade`` of the strongest this component ever
  showed (it has not faded to round-off). The component grows by the number of leading directions that
  count (at most ``growth_directions`` at once, never past ``max_rank``), each new position starting
  along its direction with ``up = 0``, so the output does not move.
* **Shrink?** Not within ``growth_patience`` steps of its last growth (a new position starts at zero
  and needs time to learn). Otherwise the SVD of its ΔW, taken through the factors, keeps the leading
  directions whose singular value is at least ``shrink_ratio`` of the largest and at least
  ``shrink_floor`` of the adapted weight's own spectral norm, *or* whose singular value (or a later
  one's) rises fast enough to reach that size within ``shrink_horizon`` more steps: a small direction
  that is still growing is young, not unneeded.
  The component is re-factored onto them. The weight prior is what makes an unneeded direction fade,
  and this rule is what removes it once it has stopped growing.

Between the two, a position's importance ``p(i)`` (``rank.importance``) still orders the positions:
ν follows the width (the rate whose quantile is the width), and a re-factored component's positions
come out in decreasing singular value, so position 0 stays the most important and pruning by
importance mass keeps meaning what it says.

``rank_control="gradient"`` is the previous mechanism (ν learned by backpropagation against a Gaussian
rank prior, the width read off its quantile at every step), kept as an ablation: in diffusion training
its widths collapse to the floor (README, "How the ranks are decided").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from . import rank as rank_math
from .growth import GradientSketch
from .spectrum import factor_svd

if TYPE_CHECKING:
    from .config import LoRA2Config
    from .layers import AdaptiveLoRA, WidthChange

RANK_CONTROLS = ("evidence", "gradient")


def growth_count(
    z: torch.Tensor, strength: torch.Tensor, peak: float, rule: LoRA2Config, alignment: torch.Tensor | None = None
) -> int:
    """How many new positions the evidence asks for: the leading directions that pass every test."""
    passes = (z > rule.growth_z) & (strength > rule.growth_fade * peak) & (strength > 0)
    if alignment is not None:
        passes &= alignment > rule.growth_alignment
    count = 0
    for ok in passes.tolist()[: rule.growth_directions]:
        if not ok:
            break
        count += 1
    return count


def keep_threshold(singular_values: torch.Tensor, weight_norm: float, rule: LoRA2Config) -> float:
    """The singular value a direction of ΔW needs to stay: ``shrink_ratio`` of the top, ``shrink_floor`` of ‖W‖."""
    top = float(singular_values[0]) if singular_values.numel() else 0.0
    return max(rule.shrink_ratio * top, rule.shrink_floor * weight_norm)


def kept_directions(singular_values: torch.Tensor, weight_norm: float, rule: LoRA2Config) -> int:
    """How many leading singular directions of ΔW stay (at least one: a width is never zero)."""
    if singular_values.numel() == 0:
        return 1
    threshold = keep_threshold(singular_values, weight_norm, rule)
    return max(1, int((singular_values >= threshold).sum()))


def rising_count(singular_values: torch.Tensor, before: torch.Tensor | None, threshold: float, horizon: float) -> int:
    """How many leading directions are still being learned: up to the last one on course to be kept.

    A direction the weight prior faded is small *and* no longer growing; one that is still being learned
    is small because it is young (new positions start at zero, the initial ones too, and at a LoRA
    learning rate they take hundreds of steps to reach their size). Only the first may be shed. A young
    direction is one whose singular value, rising at its rate since the previous check for ``horizon``
    more checks (``shrink_horizon`` steps), would reach ``threshold`` (what :func:`kept_directions`
    asks). Measured in the diffusion rank benchmark: weak but real tail directions were 5-10 checks short
    of the threshold, while one at 0.05 % of the top that crept up by round-off was thousands of checks
    short, and a mere-rise rule kept it for ever (sd15 seed 3: planted 1, kept 5). ``before`` is
    the previous check's singular values (None: no previous check since the width changed, so nothing
    is known to have stopped).
    """
    if before is None:
        return int(singular_values.numel())
    shared = min(singular_values.numel(), before.numel())
    now, then = singular_values[:shared], before[:shared]
    rise = now - then
    on_course = (rise > 0) & (now + rise * horizon >= threshold)
    young = on_course.nonzero()
    return int(young[-1]) + 1 if young.numel() else 0


def nu_for_width(width: int, mass: float, margin: int) -> float:
    """The ν whose quantile width is ``width`` (mid-plateau: a small step does not change it)."""
    return rank_math.nu_for_rate(rank_math.rate_for_width(max(int(width), 1 + margin), mass, margin))


@torch.no_grad()
def spectral_norm(weight: torch.Tensor, iterations: int = 20) -> float:
    """‖W‖₂ of a (flattened) weight by power iteration: the scale ``shrink_floor`` is measured against."""
    matrix = weight.detach().flatten(1).float()
    vector = torch.ones(matrix.shape[1], device=matrix.device) / matrix.shape[1] ** 0.5
    for _ in range(iterations):
        vector = matrix.T @ (matrix @ vector)
        norm = vector.norm()
        if float(norm) == 0.0:
            return 0.0
        vector = vector / norm
    return float((matrix @ vector).norm())


class EvidenceControl:
    """One component's evidence rule: its gradient sketch, its last growth, and the decision."""

    def __init__(self, component: AdaptiveLoRA, layer: nn.Module, config: LoRA2Config, generator: torch.Generator):
        self.component = component
        self.layer = layer
        self.config = config
        self.last_growth = 0
        self.last_singular: torch.Tensor | None = None
        """Singular values at the last shrink check (None after a width change): see :func:`rising_count`."""
        self.weight_norm: float | None = None
        if component.sketchable:
            component.sketch = GradientSketch(
                component.fan_in, component.out_features, config.growth_directions, config.evidence_beta, generator
            ).to(component.nu.device)
            self.refresh_spans()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"last_growth": torch.tensor(self.last_growth, dtype=torch.int64)}
        if self.last_singular is not None:
            state["last_singular"] = self.last_singular.clone()
        if self.sketch is not None:
            state.update(self.sketch.state_dict())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (an empty one restarts the evidence); spans follow the loaded factors."""
        if "last_growth" in state:
            self.last_growth = int(state["last_growth"])
        last = state.get("last_singular")
        self.last_singular = None if last is None else last.detach().float().cpu().clone()
        if self.sketch is not None and "u" in state:
            self.sketch.load_state_dict(state)
        else:
            self.refresh_spans()

    def reset_sketch(self) -> None:
        """Start the evidence afresh (fresh directions and statistics) on the current spans."""
        c = self.component
        if c.sketch is not None:
            c.sketch = GradientSketch(
                c.fan_in, c.out_features, self.config.growth_directions, self.config.evidence_beta, c.generator
            ).to(c.nu.device)
            self.refresh_spans()

    @property
    def sketch(self) -> GradientSketch | None:
        return self.component.sketch

    def refresh_spans(self) -> None:
        c = self.component
        if c.sketch is not None:
            c.sketch.set_spans(c.down[: c.width].flatten(1), c.up[:, : c.width].flatten(1))

    def _nu(self, width: int) -> float:
        return nu_for_width(width, self.config.mass, self.config.margin)

    def decide(self, step: int) -> WidthChange | None:
        """Grow, shrink or keep the component; returns what changed (None: nothing)."""
        change = self._grow(step)
        if change is None and step - self.last_growth >= self.config.growth_patience:
            change = self._shrink()
        if change is not None:
            self.last_singular = None
        if change is not None and self.sketch is not None:
            self.sketch.reset_evidence()
        self.refresh_spans()
        return change

    def _grow(self, step: int) -> WidthChange | None:
        sketch, c = self.sketch, self.component
        room = self.config.max_rank - c.width
        if sketch is not None:
            sketch.flush()  # the handle folds every sketch before deciding; this keeps a lone call right
        if sketch is None or room <= 0 or sketch.count < self.config.decide_every:
            return None
        count = min(
            room,
            growth_count(sketch.z_scores(), sketch.strength(), float(sketch.peak), self.config, sketch.alignment()),
        )
        if count == 0:
            return None
        self.last_growth = step
        return c.grow(sketch.new_directions(count), self._nu(c.width + count))

    def _shrink(self) -> WidthChange | None:
        c = self.component
        if c.width <= 1:
            return None
        if self.weight_norm is None:
            self.weight_norm = spectral_norm(self.layer.weight)
        scaled_up = c.up[:, : c.width].float().flatten(1) * (c.alpha * c.importance().float())
        singular = factor_svd(scaled_up, c.down[: c.width].float().flatten(1))[1]
        singular = singular.float().cpu()
        rule = self.config
        horizon = rule.shrink_horizon / rule.decide_every  # in checks: shrink checks are decide_every apart
        young = rising_count(singular, self.last_singular, keep_threshold(singular, self.weight_norm, rule), horizon)
        keep = max(kept_directions(singular, self.weight_norm, rule), young)
        self.last_singular = singular
        if keep >= c.width:
            return None
        return c.refactor(keep, self._nu(keep))
