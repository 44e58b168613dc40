"""Singular values and vectors of a low-rank update, computed through its factors.

``ΔW = up @ down`` with ``up [out, r]`` and ``down [r, in]``: ``up = Q₁R₁`` and ``downᵀ = Q₂R₂`` give
``ΔW = Q₁ (R₁R₂ᵀ) Q₂ᵀ``; the SVD of the small ``r × r`` core ``R₁R₂ᵀ = U S Vᵀ`` then yields
``ΔW = (Q₁U) S (Q₂V)ᵀ``. Exact, and ``O((in + out)·r²)`` instead of an SVD of the full weight, which
is what lets training re-factor a component (rank control) and pruning re-factor a file at any width.
"""

from __future__ import annotations

import torch

Spectrum = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(u [out, m], s [m], vh [m, in])`` in float64 with ``ΔW = u · diag(s) · vh`` (s descending)."""


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
