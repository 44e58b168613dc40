"""Singular values and vectors of a low-rank update, computed through its factors.

``ΔW = up @ down`` with ``up [out, r]`` and ``down [r, in]``: ``up = Q₁R₁`` and ``downᵀ = Q₂R₂`` give
``ΔW = Q₁ (R₁R₂ᵀ) Q₂ᵀ``; the SVD of the small ``r × r`` core ``R₁R₂ᵀ = U S Vᵀ`` then yields
``ΔW = (Q₁U) S (Q₂V)ᵀ``. Exact, and ``O((in + out)·r²)`` instead of an SVD of the full weight, which
is what lets training re-factor a component (rank control) and pruning re-factor a file at any width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import LoRA2Error

Spectrum = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(u [out, m], s [m], vh [m, in])`` in float64 with ``ΔW = u · diag(s) · vh`` (s descending)."""

TOLERANCE = 1e-12
"""Relative slack on cumulative sums, so that exact ties (e.g. 9 of 10 equal values at 0.9) land on the tie."""


def factor_svd(up: torch.Tensor, down: torch.Tensor) -> Spectrum:
    """The thin SVD of ``up @ down`` (both flattened to 2-D, computed in float64) from the factors."""
    up = up.detach().double().flatten(1)
    down = down.detach().double().flatten(1)
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u, s, vh @ q_down.T


def orthonormal_basis(matrix: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis ``[n, m]`` of the column span of ``matrix [n, r]`` (m ≤ r; 0 columns when zero).

    Columns whose singular value is below ``rtol`` of the largest are left out, so a factor that is
    still (partly) zero, as ``up`` is at the start of training, spans only what it really spans.
    """
    if matrix.numel() == 0:
        return matrix.new_zeros(matrix.shape[0], 0)
    u, s, _ = torch.linalg.svd(matrix.float(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return matrix.new_zeros(matrix.shape[0], 0, dtype=torch.float32)
    return u[:, s > rtol * s[0]]


def check_fraction(value: float, what: str) -> float:
    if not 0.0 < float(value) <= 1.0:
        raise LoRA2Error(f"{what} must be in (0, 1] (1 keeps everything), got {value!r}")
    return float(value)


def energy_rank(singular_values: torch.Tensor | Sequence[float], fraction: float) -> int:
    """Smallest ``k`` whose ``Σ_{i<k} σᵢ²`` reaches ``fraction`` of ``Σ σ²`` (at least 1).

    σ² is what each direction adds to ``‖ΔW‖²_F``, so ``fraction = 0.9`` keeps a rank whose relative
    Frobenius error is at most ``√0.1``. A zero spectrum gives 1.
    """
    check_fraction(fraction, "the energy fraction")
    energy = torch.as_tensor(singular_values, dtype=torch.float64).flatten().abs().sort(descending=True).values ** 2
    if energy.numel() == 0 or float(energy.sum()) <= 0.0:
        return 1
    cumulative = energy.cumsum(0)
    target = fraction * float(cumulative[-1]) * (1.0 - TOLERANCE)
    k = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)).item()) + 1
    return max(1, min(k, energy.numel()))
