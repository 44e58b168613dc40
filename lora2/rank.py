"""The rank distribution of one LoRA² component: how its rank is decided.

Each component ℓ owns one learnable scalar ν. Its rate ``λ = softplus(ν) + LAMBDA_FLOOR`` parameterises
an exponential distribution discretised over rank positions ``i = 0, 1, 2, ...``::

    π(i) = Φ(i + 1) − Φ(i) = e^{−λ i} (1 − e^{−λ}),      Φ(x) = 1 − e^{−λ x}

``π`` decreases in ``i``: position 0 is the most important, later ones less. The component's width
(effective rank) is where the distribution's mass reaches ``k`` (the *importance mass*), plus a small
safety margin, clamped to ``[1, max_rank]``::

    D = ⌈−ln(1 − k) / λ⌉ + margin

and the forward pass weights position ``i < D`` by ``p(i) = π(i) / Σ_{j<D} π(j)``, computed in log
space (exact and stable for every λ: tiny λ → uniform weights; huge λ → all weight on position 0).
``p`` is smooth in ν, so the data loss has a gradient on ν although ``D`` is an integer; see
:func:`importance` for which gradient, and why.

Why the margin: a component grows only if the data term pays for a flatter distribution, and it can
only see that through a position that is already there and learning something. ``margin`` spare
positions beyond the quantile are that probe. One (the default) is enough for growth and keeps a
planted rank-1 update at width 2; AWN uses two.

Everything here is pure math on floats and tensors, with closed forms; nothing about layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .errors import LoRA2Error

LAMBDA_FLOOR = 1e-4
"""Smallest rate λ. Keeps ``−ln(1−k)/λ`` finite; widths that large are clamped by ``max_rank`` anyway."""


def check_mass(mass: float) -> float:
    """Validate the importance mass ``k``; returns it."""
    if not (0.0 < mass < 1.0):
        raise LoRA2Error(f"importance mass must lie strictly between 0 and 1, got {mass!r} (0.9 is the usual value)")
    return float(mass)


def mass_quantile(mass: float) -> float:
    """``−ln(1 − k)``: the product ``λ · D`` at which the distribution's mass reaches ``k``."""
    return -math.log1p(-check_mass(mass))


def rate(nu: torch.Tensor) -> torch.Tensor:
    """λ = softplus(ν) + floor: positive, smooth, and linear in ν for large ν."""
    return F.softplus(nu) + LAMBDA_FLOOR


def nu_for_rate(lam: float) -> float:
    """Inverse of :func:`rate` (``softplus⁻¹(λ − floor)``), stable for small and large λ."""
    x = max(float(lam) - LAMBDA_FLOOR, 1e-12)
    if x > 30.0:
        return x
    return x + math.log(-math.expm1(-x))


def pmf(positions: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """π(i) = e^{−λ i}(1 − e^{−λ}), computed in log space so large λ·i underflows to 0, not NaN."""
    return torch.exp(-lam * positions + torch.log(-torch.expm1(-lam)))


def width_for_rate(lam: float, mass: float, margin: int, max_rank: int) -> int:
    """The component's width: ``⌈−ln(1−k)/λ⌉ + margin`` clamped to ``[1, max_rank]``.

    The ceiling is taken with a relative tolerance of 1e-9 so that ``λ`` values produced by
    :func:`rate_for_width` (and float64 brute force) land on the width they were made for.
    """
    quantile = mass_quantile(mass) / max(float(lam), LAMBDA_FLOOR)
    if quantile > max_rank:  # also covers inf/huge values before ceil
        return max_rank
    width = math.ceil(quantile * (1.0 - 1e-9)) + margin
    return max(1, min(int(width), int(max_rank)))


def rate_for_width(width: int, mass: float, margin: int) -> float:
    """A rate λ whose :func:`width_for_rate` is ``width`` (used to start at ``init_rank``).

    ``⌈q/λ⌉ = width − margin`` holds for ``q/λ`` anywhere in ``(width−margin−1, width−margin]``;
    we aim at the middle of that interval so that a small step in ν does not change the width.
    """
    quantile_positions = width - margin
    if quantile_positions < 1:
        raise LoRA2Error(
            f"init_rank={width} is below the smallest width the distribution can have "
            f"(1 + margin = {1 + margin}); raise init_rank or lower margin"
        )
    return mass_quantile(mass) / (quantile_positions - 0.5)


def importance(lam: torch.Tensor, width: int) -> torch.Tensor:
    """p(i) = π(i) / Σ_{j<width} π(j) for ``i < width``; sums to 1. The normaliser carries no gradient.

    Forward, this is exactly the renormalised distribution. Backward, ``∂p(i)/∂λ = p(i)(E_∞[i] − i)``:
    the derivative of the *untruncated* pmf π (``E_∞ = 1/(e^λ − 1)``), times the constant normaliser.

    Why stop the normaliser's gradient: the width is a step function of λ, so the true objective is
    piecewise smooth and its minimum sits at a jump the gradient never sees. Inside one plateau the
    normaliser's derivative adds a force ``∝ D·(1−k)/k`` towards flatter weights, and plain gradient
    descent settles where that force balances, 1.5-2× wider than the cost-minimising width (the
    overshoot we measured). With the untruncated gradient the stationary point is the smooth
    minimum of ``Σ_{i<r} 1/π(i)`` (the weight-prior cost of r needed directions), ``λ·r ≈ 1.594``, which
    the quantile at k = 0.8 reads as ``D ≈ r + margin``.
    """
    positions = torch.arange(width, device=lam.device, dtype=lam.dtype)
    log_pmf = -lam * positions + torch.log(-torch.expm1(-lam))
    return torch.exp(log_pmf - torch.logsumexp(log_pmf, dim=0).detach())


def uniform_importance(width: int, device: torch.device | None = None) -> torch.Tensor:
    """Plain LoRA's weights, ``1/width`` each: the λ → 0 limit of :func:`importance`."""
    return torch.full((width,), 1.0 / width, device=device)


def rank_prior(lams: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Σ_ℓ (λ_ℓ − μ_λ)² / (2σ_λ²): the Gaussian prior on each rate (negative log, up to a constant).

    A larger ``mean`` prefers larger λ, i.e. smaller rank; a smaller ``std`` pulls harder.
    """
    return ((lams - mean) ** 2).sum() / (2.0 * std**2)


def weight_prior(tensors: Iterable[torch.Tensor], std: float) -> torch.Tensor:
    """Σ_θ θ² / (2σ_θ²): the Gaussian prior on the LoRA factors (weight decay written as a prior)."""
    total = None
    for tensor in tensors:
        term = tensor.float().pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total / (2.0 * std**2)
