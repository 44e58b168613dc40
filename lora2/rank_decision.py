"""How a run decides ranks, end to end, in one place: where widths start, how they follow ν, when they stop.

The math of one component's distribution is :mod:`lora2.rank`; the evidence rule that grows and shrinks
widths under the default ``rank_control="evidence"`` is :mod:`lora2.rank_control` (with
:mod:`lora2.growth`). This module is the run-level policy that ties them to a config:

* **Start** (:func:`start_nu`): every component starts at ``init_rank`` positions, with the ν whose
  quantile width is ``init_rank`` (mid-interval, so a small step in ν does not change it); plain LoRA
  (``adaptive=False``) starts at ν = 0 and keeps it.
* **Follow** (:func:`target_widths`): under ``rank_control="gradient"`` (the ablation) each component's
  width is read off its rate λ every step: ``⌈−ln(1−k)/λ⌉ + margin`` within ``[1, max_rank]``.
* **Freeze** (:func:`freeze_step`): for the last ``rank_freeze_fraction`` of the steps widths are frozen
  and the priors dropped, so the factors fit the data at the ranks found (AdaLoRA's final phase).
* **After training** (:func:`mass_width`): pruning by importance keeps the fewest leading positions
  whose importance reaches a mass, the same distribution read the other way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import rank as rank_math
from .config import LoRA2Config


def start_nu(config: LoRA2Config) -> float:
    """The ν every component starts with: the one whose width is ``init_rank`` (0 for plain LoRA)."""
    if not config.adaptive:
        return 0.0
    return rank_math.nu_for_rate(rank_math.rate_for_width(config.init_rank, config.mass, config.margin))


def target_widths(rates: Sequence[float], config: LoRA2Config) -> list[int]:
    """The width each component's rate λ asks for (``rank_control="gradient"``), in the given order."""
    return [rank_math.width_for_rate(lam, config.mass, config.margin, config.max_rank) for lam in rates]


def freeze_step(steps: int, rank_freeze_fraction: float) -> int:
    """The first step of the final phase with widths frozen: the last ``fraction`` of ``steps`` (rounded down)."""
    return steps - int(steps * rank_freeze_fraction)


def mass_width(nu: float, width: int, mass: float, tolerance: float = 1e-12) -> int:
    """Fewest leading positions whose importance ``p`` (over ``width`` positions) sums to ``mass`` (at least 1).

    ``tolerance`` is relative slack on the cumulative sum, so that exact ties land on the tie.
    """
    if mass >= 1.0:
        return width
    p = rank_math.importance(rank_math.rate(torch.tensor(float(nu), dtype=torch.float64)), width)
    cumulative = p.cumsum(0)
    k = int(torch.searchsorted(cumulative, torch.tensor([mass * (1.0 - tolerance)], dtype=torch.float64)).item()) + 1
    return max(1, min(k, width))
