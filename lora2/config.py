"""What a LoRA² run is configured with, validated once where it arrives.

Worked example (the defaults): every attention projection (``targets="attn"``) starts at width 4
(``init_rank``). While it trains, its gradient sketch looks for directions of the loss gradient that
no position can follow; every ``decide_every=10`` steps a component grows by each such direction whose
evidence passes ``growth_z=4`` (up to 4 at once, never past ``max_rank=64``), and, 50 steps after its
last growth, sheds directions whose singular value fell below 5 % of its largest (``rank_control.py``).
ν follows the width. The loss the caller minimises is ``data_loss + handle.regularizer()``, where the
regulariser is ``prior_strength · Σ_θ θ²/2`` (the weight prior; ``prior_strength`` plays the role of
``1/N`` in the ELBO). With ``rank_control="gradient"`` (the ablation), ν is learned instead and the
regulariser adds the rank prior ``Σ_ℓ (λ_ℓ − 2)²/2``; the width is read off ν's quantile every step.

``adaptive=False`` turns the same code into plain fixed-rank LoRA: ν is frozen, every position gets the
same weight ``1/init_rank`` (so the scale is the familiar ``alpha / rank``), and the width never changes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import LoRA2Error
from .rank import check_mass
from .rank_control import RANK_CONTROLS

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoRA2Config:
    """Settings of one LoRA² (or fixed-rank LoRA) adapter set. Validates itself on construction."""

    targets: str = "attn"
    """Preset (``attn``, ``attn+ff``, ``all-linear``, ``all``) or a regular expression on module names."""
    exclude: str | None = None
    """Optional regular expression: matching module names are never adapted."""
    init_rank: int = 4
    """Width every component starts at (and keeps, when ``adaptive`` is off)."""
    max_rank: int = 64
    """Memory ceiling: no component grows wider than this."""
    mass: float = 0.85
    """Importance mass ``k``: the width is where the rank distribution's mass reaches it.

    Why 0.85 and not AWN's 0.9: once the data is fitted, the weight prior alone sets λ, at the minimum
    of ``Σ_{i<r} 1/π(i)`` (the cost of the factors that undo the importance of the r needed
    directions), ``λ·r ≈ 1.594`` (see ``rank.importance``). The quantile ``−ln(1−k)/λ`` reads that as
    ``1.44 r`` at k = 0.9, ``1.01 r`` at k = 0.8 and ``1.19 r`` at k = 0.85: the last leaves room for the
    directions the priors shrink while they are being learned. Measured: width ≈ 1.15·r + 1 on the
    rank-recovery benchmark, with every planted direction fitted.
    """
    margin: int = 1
    """Spare positions beyond the quantile; they are how a component notices it needs more rank."""
    adaptive: bool = True
    """False: plain LoRA at fixed ``init_rank`` through the same code path (ν frozen, equal weights)."""
    alpha: float = 4.0
    """Output scale: ``ΔW = alpha · B diag(p) A`` with ``Σ p = 1`` (``alpha / rank`` for plain LoRA).

    It also sets how much the weight prior, which is what lets a component grow, weighs: factors of a
    given ΔW shrink as ``1/√alpha``, so their prior cost as ``1/alpha``.
    """
    prior_mean: float = 2.0
    """μ_λ: the rate the rank prior pulls towards; larger means a preference for lower rank."""
    prior_std: float = 1.0
    """σ_λ: how loosely the rank prior holds each rate."""
    weight_prior_std: float = 1.0
    """σ_θ: the Gaussian prior on the LoRA factors (weight decay in disguise)."""
    prior_strength: float = 1e-5
    """Multiplier of both priors; the ELBO's ``1/N``."""
    resize_every: int = 1
    """Reallocate each component's storage to its width every this many optimizer steps."""
    dtype: str = "float32"
    """Storage dtype of the adapter weights (the compute dtype follows the activations)."""
    seed: int = 0
    """Seed of the factors' initialisation (and of new positions when a component grows)."""
    module_types: tuple[str, ...] = field(default=("linear", "conv2d"))
    """Which layer kinds a regular-expression target may pick (presets choose for themselves)."""
    rank_control: str = "evidence"
    """How widths change: ``evidence`` (gradient evidence grows, singular values shrink; see
    ``rank_control.py``) or ``gradient`` (ν by backpropagation against the rank prior; an ablation)."""
    decide_every: int = 10
    """Evidence rule: steps between two grow/shrink decisions of every component."""
    growth_z: float = 4.0
    """Evidence rule: z-statistic a gradient direction outside the span needs to count as real."""
    growth_fade: float = 0.02
    """Evidence rule: a direction also needs this share of the strongest wish the component ever showed."""
    growth_alignment: float = 0.9
    """Evidence rule: how converged a direction must be (``GradientSketch.alignment``, 0..1) to be grown."""
    growth_directions: int = 4
    """Evidence rule: directions tracked per component, and so the most positions added at once."""
    evidence_beta: float = 0.9
    """Evidence rule: EMA factor of the gradient sketch (averages over about (1+β)/(1−β) = 19 steps)."""
    growth_patience: int = 50
    """Evidence rule: steps after a growth before the component may shrink (new positions start at 0)."""
    shrink_ratio: float = 0.05
    """Evidence rule: a direction of ΔW is dropped below this share of the component's largest one..."""
    shrink_floor: float = 1e-3
    """...or below this share of the adapted weight's spectral norm (a ΔW that is nothing next to W)."""
    shrink_horizon: int = 200
    """Evidence rule: a small direction still counts as young (kept) while its rise since the last check
    would carry it past the keep size within this many steps. Traced: young tail directions were 50-100
    steps short of it, one left by round-off ~70,000 (README, "Where the diffusion benchmark stands")."""
    compensate_importance: bool = True
    """Evidence rule: new positions' ``down`` rows are scaled by ``p(0)/p(i)`` so that a tail position
    learns as fast as the first one (under Adam a position's ΔW moves ∝ alpha·p(i)·‖down row‖)."""

    def __post_init__(self) -> None:
        self.module_types = tuple(self.module_types)
        check_mass(self.mass)
        if self.init_rank < 1:
            raise LoRA2Error(f"init_rank must be at least 1, got {self.init_rank}")
        if self.max_rank < 1:
            raise LoRA2Error(f"max_rank must be at least 1, got {self.max_rank}")
        if self.init_rank > self.max_rank:
            raise LoRA2Error(f"init_rank ({self.init_rank}) is larger than max_rank ({self.max_rank}); lower it")
        if self.margin < 0:
            raise LoRA2Error(f"margin must be 0 or more, got {self.margin}")
        if self.adaptive and self.init_rank < 1 + self.margin:
            raise LoRA2Error(
                f"init_rank={self.init_rank} is below the smallest adaptive width 1 + margin = {1 + self.margin}"
            )
        if self.resize_every < 1:
            raise LoRA2Error(f"resize_every must be at least 1, got {self.resize_every}")
        for name in ("prior_std", "weight_prior_std"):
            if getattr(self, name) <= 0:
                raise LoRA2Error(f"{name} must be positive, got {getattr(self, name)}")
        if self.prior_strength < 0:
            raise LoRA2Error(f"prior_strength must be 0 or more, got {self.prior_strength}")
        if self.dtype not in DTYPES:
            raise LoRA2Error(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        self._check_rank_control()
        unknown = set(self.module_types) - {"linear", "conv2d"}
        if unknown:
            raise LoRA2Error(f"module_types may hold 'linear' and 'conv2d', got {sorted(unknown)}")

    def _check_rank_control(self) -> None:
        if self.rank_control not in RANK_CONTROLS:
            raise LoRA2Error(f"rank_control must be one of {list(RANK_CONTROLS)}, got {self.rank_control!r}")
        for name in ("decide_every", "growth_directions"):
            if getattr(self, name) < 1:
                raise LoRA2Error(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < self.evidence_beta < 1.0:
            raise LoRA2Error(f"evidence_beta must lie strictly between 0 and 1, got {self.evidence_beta}")
        for name in ("growth_z", "growth_fade", "growth_patience", "shrink_ratio", "shrink_floor", "shrink_horizon"):
            if getattr(self, name) < 0:
                raise LoRA2Error(f"{name} must be 0 or more, got {getattr(self, name)}")

    @property
    def evidence_driven(self) -> bool:
        """Widths follow gradient evidence (ν then follows the width instead of being learned)."""
        return self.adaptive and self.rank_control == "evidence"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["module_types"] = list(self.module_types)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRA2Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoRA2Error(f"unknown LoRA² config fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)
