"""Make an adapter smaller after training: choose a rank per component, then keep the best factors.

Three policies, each ``(adapter, setting) -> (pruned adapter, PruneReport)``, share one second half:

- :func:`prune_by_mass` reads LoRA²'s own ordering. A component trained here carries ν, and its
  positions are ranked by importance ``p(i)`` (:func:`lora2.rank.importance`); keeping the fewest
  leading positions whose ``p`` sums to ``mass`` is the question "how much of what training weighted
  do I keep". ``mass = 1`` keeps every position. Components without ν (plain LoRA, foreign files)
  have no such ordering, so they fall back to singular-value energy at the same fraction.
- :func:`prune_to_budget` fits a parameter (or megabyte) budget across the whole adapter.
- :func:`prune_by_energy` keeps each component's singular-value energy fraction; works on any LoRA.

Whatever chose the rank ``k``, the component is then re-factored by SVD (:func:`svd_refactor`) at ``k``:
the best rank-``k`` approximation of its ΔW (Eckart–Young), which is never worse than cutting the tail
positions off the trained factors. The SVD is taken through the factors (QR of ``up`` and ``downᵀ``,
then an SVD of the small ``r × r`` core) in float64, so it costs ``O((in + out)·r²)`` instead of an SVD
of the full weight, and the reported errors come straight from the discarded singular values.

The pruned adapter has ``source="pruned"`` and keeps ``base_model``, ``steps``, ``config`` and
``history``; it drops ``resume``: the saved optimizer moments and widths describe factors that no
longer exist, so a pruned adapter can be applied, inspected and saved, but not trained further.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from . import sizes
from .adapter import Adapter, Component
from .errors import LoRA2Error
from .rank_decision import mass_width
from .spectrum import TOLERANCE, Spectrum, check_fraction, energy_rank, factor_svd


# ----------------------------------------------------------------------------- SVD of one component
def component_svd(component: Component) -> Spectrum:
    """The thin SVD of the component's (flattened) ΔW, computed from its factors (:func:`factor_svd`)."""
    return factor_svd(component.up, component.down)


def singular_values(component: Component) -> torch.Tensor:
    """Singular values of the component's ΔW (float64, descending); at most its rank of them."""
    return component_svd(component)[1]


def _refactor(component: Component, spectrum: Spectrum, rank: int) -> Component:
    u, s, vh = spectrum
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    up = u[:, :k] * root
    down = root[:, None] * vh[:k]
    dtype = component.up.dtype if component.up.is_floating_point() else torch.float32
    up = up.reshape(component.up.shape[0], k, *component.up.shape[2:]).to(dtype).contiguous()
    down = down.reshape(k, *component.down.shape[1:]).to(dtype).contiguous()
    return Component(up=up, down=down, nu=component.nu)


def svd_refactor(component: Component, rank: int) -> Component:
    """The best rank-``rank`` factorisation of the component's ΔW (a new Component; ν kept as is).

    Conv weights are flattened to ``[out, in·kh·kw]`` and reshaped back. ``√S`` is split evenly into
    ``up`` and ``down`` (both factors in the same range, as :mod:`lora2.adapter` stores them), and the
    positions come out in decreasing singular value. A ``rank`` above what ΔW can have (the
    component's rank, or the weight's smaller side) is clamped to it: nothing is lost either way.
    """
    if int(rank) < 1:
        raise LoRA2Error(f"svd_refactor needs a rank of at least 1, got {rank}; drop the component instead")
    return _refactor(component, component_svd(component), int(rank))


# ----------------------------------------------------------------------------- rank choices
def mass_rank(nu: float, width: int, mass: float) -> int:
    """Fewest leading positions whose LoRA² importance ``p`` (over ``width`` positions) sums to ``mass``."""
    check_fraction(mass, "the importance mass")
    return mass_width(nu, width, mass, TOLERANCE)


# ----------------------------------------------------------------------------- report
@dataclass
class ComponentPrune:
    """What pruning did to one component (``rank_after = 0``: dropped from the adapter)."""

    name: str
    rank_before: int
    rank_after: int
    parameters_before: int
    parameters_after: int
    relative_error: float
    """``‖ΔW − ΔW'‖_F / ‖ΔW‖_F`` (0 for a component whose ΔW is zero)."""


@dataclass
class PruneReport:
    """Per component ranks, parameters and errors of one pruning run, plus totals."""

    policy: str
    setting: dict[str, Any]
    components: list[ComponentPrune] = field(default_factory=list)
    bytes_per_number: int = sizes.FP16_BYTES

    @property
    def parameters_before(self) -> int:
        return sum(c.parameters_before for c in self.components)

    @property
    def parameters_after(self) -> int:
        return sum(c.parameters_after for c in self.components)

    @property
    def megabytes_before(self) -> float:
        return sizes.megabytes(self.parameters_before, self.bytes_per_number)

    @property
    def megabytes_after(self) -> float:
        return sizes.megabytes(self.parameters_after, self.bytes_per_number)

    @property
    def dropped(self) -> list[str]:
        return [c.name for c in self.components if c.rank_after == 0]

    @property
    def max_error(self) -> float:
        return max((c.relative_error for c in self.components), default=0.0)

    def totals(self) -> dict[str, Any]:
        return {
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "megabytes_before": round(self.megabytes_before, 6),
            "megabytes_after": round(self.megabytes_after, 6),
            "components_before": len(self.components),
            "components_after": len(self.components) - len(self.dropped),
            "max_relative_error": self.max_error,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: policy, setting, totals and one entry per component."""
        return {
            "policy": self.policy,
            "setting": dict(self.setting),
            "bytes_per_number": self.bytes_per_number,
            "totals": self.totals(),
            "components": [asdict(c) for c in self.components],
        }

    def to_table(self) -> str:
        """Aligned text: one line per component, then the totals."""
        width = max([len("component"), *(len(c.name) for c in self.components)])
        setting = ", ".join(f"{k}={v}" for k, v in self.setting.items())
        lines = [
            f"prune policy: {self.policy} ({setting})",
            f"{'component':<{width}} {'rank':>5} {'kept':>5} {'params':>10} {'kept':>10} {'rel_err':>8}",
            "-" * (width + 43),
        ]
        for c in self.components:
            kept = "drop" if c.rank_after == 0 else str(c.rank_after)
            lines.append(
                f"{c.name:<{width}} {c.rank_before:>5} {kept:>5} {c.parameters_before:>10} "
                f"{c.parameters_after:>10} {c.relative_error:>8.4f}"
            )
        lines.append(
            f"total: {self.parameters_before} -> {self.parameters_after} parameters "
            f"({self.megabytes_before:.3f} -> {self.megabytes_after:.3f} MB at {self.bytes_per_number} bytes/number), "
            f"{len(self.dropped)} dropped, max rel_err {self.max_error:.4f}"
        )
        return "\n".join(lines)


# ----------------------------------------------------------------------------- shared second half
def _spectra(adapter: Adapter) -> dict[str, Spectrum]:
    if not adapter.components:
        raise LoRA2Error("the adapter has no components to prune")
    return {name: component_svd(c) for name, c in adapter.components.items()}


def _relative_error(s: torch.Tensor, kept: int) -> float:
    total = float((s**2).sum())
    if total <= 0.0:
        return 0.0
    return (float((s[kept:] ** 2).sum()) / total) ** 0.5


def _apply_ranks(
    adapter: Adapter,
    spectra: dict[str, Spectrum],
    ranks: dict[str, int],
    policy: str,
    setting: dict[str, Any],
    bytes_per_number: int = sizes.FP16_BYTES,
) -> tuple[Adapter, PruneReport]:
    """Re-factor every component at its chosen rank (0 drops it) and build the report."""
    report = PruneReport(policy=policy, setting=setting, bytes_per_number=bytes_per_number)
    components: dict[str, Component] = {}
    for name, component in adapter.components.items():
        s = spectra[name][1]
        kept = min(ranks[name], s.numel())
        if kept > 0:
            components[name] = _refactor(component, spectra[name], kept)
        report.components.append(
            ComponentPrune(
                name=name,
                rank_before=component.rank,
                rank_after=kept,
                parameters_before=component.num_parameters,
                parameters_after=components[name].num_parameters if kept > 0 else 0,
                relative_error=_relative_error(s, kept),
            )
        )
    if not components:
        raise LoRA2Error(f"pruning with {policy} {setting} would drop every component; allow more parameters")
    extra = copy.deepcopy(adapter.extra)
    extra.setdefault("pruned", []).append({"policy": policy, **setting, **report.totals()})
    pruned = Adapter(
        components=components,
        base_model=adapter.base_model,
        steps=adapter.steps,
        config=copy.deepcopy(adapter.config),
        history=copy.deepcopy(adapter.history),
        resume=None,
        source="pruned",
        extra=extra,
    )
    return pruned, report


# ----------------------------------------------------------------------------- policies
def prune_by_energy(adapter: Adapter, fraction: float) -> tuple[Adapter, PruneReport]:
    """Per component, the smallest rank keeping ``fraction`` of its singular-value energy (any LoRA)."""
    check_fraction(fraction, "the energy fraction")
    spectra = _spectra(adapter)
    ranks = {name: energy_rank(s, fraction) for name, (_, s, _) in spectra.items()}
    return _apply_ranks(adapter, spectra, ranks, "energy", {"fraction": fraction})


def prune_by_mass(adapter: Adapter, mass: float) -> tuple[Adapter, PruneReport]:
    """Keep the leading positions holding ``mass`` of LoRA²'s importance (energy for components without ν).

    ``mass = 1`` keeps every position and is lossless. The count comes from ν; the kept directions
    are the best ones by SVD, so the error is at most that of truncating the trained factors.
    """
    check_fraction(mass, "the importance mass")
    spectra = _spectra(adapter)
    ranks = {
        name: mass_rank(c.nu, c.rank, mass) if c.nu is not None else energy_rank(spectra[name][1], mass)
        for name, c in adapter.components.items()
    }
    return _apply_ranks(adapter, spectra, ranks, "mass", {"mass": mass})


Weighting = Literal["per_parameter", "energy"]


def _budget(max_parameters: int | None, max_megabytes: float | None, bytes_per_number: int) -> int:
    sizes.check_bytes_per_number(bytes_per_number)
    limits = []
    if max_parameters is not None:
        if max_parameters < 0:
            raise LoRA2Error(f"max_parameters must be 0 or more, got {max_parameters}")
        limits.append(int(max_parameters))
    if max_megabytes is not None:
        if max_megabytes < 0:
            raise LoRA2Error(f"max_megabytes must be 0 or more, got {max_megabytes}")
        limits.append(sizes.parameters_in(max_megabytes, bytes_per_number))
    if not limits:
        raise LoRA2Error("prune_to_budget needs max_parameters or max_megabytes")
    return min(limits)


def prune_to_budget(
    adapter: Adapter,
    max_parameters: int | None = None,
    max_megabytes: float | None = None,
    bytes_per_number: int = sizes.FP16_BYTES,
    weighting: Weighting = "per_parameter",
) -> tuple[Adapter, PruneReport]:
    """Spend a global parameter budget on the singular directions that carry the most energy.

    Every (component, direction) pair costs ``in·kh·kw + out`` parameters and contributes ``σ²`` to
    its ΔW's squared Frobenius norm. Directions are taken greedily in order of ``σ²/cost``
    (``weighting="per_parameter"``, the default: the fractional-knapsack order, most error removed per
    byte) or of plain ``σ²`` (``"energy"``), skipping any that no longer fits, so the budget is never
    exceeded. Within a component σ is descending and the cost constant, so the kept directions are
    always its leading ones. A component that gets no direction is dropped from the adapter (its layer
    keeps the base weight) rather than forced to rank 1, because forcing would break the budget; if
    nothing at all fits, this raises. ``max_megabytes`` counts ``bytes_per_number`` per parameter
    (the file adds a small header and one alpha per component on top).
    """
    if weighting not in ("per_parameter", "energy"):
        raise LoRA2Error(f"weighting must be 'per_parameter' or 'energy', got {weighting!r}")
    budget = _budget(max_parameters, max_megabytes, bytes_per_number)
    spectra = _spectra(adapter)
    candidates: list[tuple[float, int, int, str, int]] = []
    for order, (name, component) in enumerate(adapter.components.items()):
        cost = component.up.shape[0] + math.prod(component.down.shape[1:])
        for i, sigma in enumerate(spectra[name][1].tolist()):
            value = sigma * sigma / (cost if weighting == "per_parameter" else 1)
            candidates.append((-value, order, i, name, cost))
    candidates.sort()
    ranks = dict.fromkeys(adapter.components, 0)
    remaining = budget
    for _, _, i, name, cost in candidates:
        if ranks[name] == i and cost <= remaining:
            ranks[name] += 1
            remaining -= cost
    setting = {"max_parameters": max_parameters, "max_megabytes": max_megabytes, "weighting": weighting}
    return _apply_ranks(adapter, spectra, ranks, "budget", setting, bytes_per_number)


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class PrunePolicy:
    """One way to prune, as the node and the CLI offer it: a name, what its one number means, the call."""

    name: str
    value_means: str
    prune: Callable[[Adapter, float], tuple[Adapter, PruneReport]]


PRUNE_POLICIES: dict[str, PrunePolicy] = {
    policy.name: policy
    for policy in (
        PrunePolicy("importance mass", "share of each LoRA² component's importance to keep (0-1)", prune_by_mass),
        PrunePolicy(
            "budget (MB)",
            "file size in MB (fp16)",
            lambda adapter, value: prune_to_budget(adapter, max_megabytes=value),
        ),
        PrunePolicy(
            "budget (parameters)",
            "trainable numbers",
            lambda adapter, value: prune_to_budget(adapter, max_parameters=int(value)),
        ),
        PrunePolicy("singular-value energy", "share of Σσ² to keep per component (0-1)", prune_by_energy),
    )
}
"""Every pruning policy by its user-facing name; the Prune node's choices and tooltip are read from here."""


def prune(adapter: Adapter, policy: str, value: float) -> tuple[Adapter, PruneReport]:
    """Prune ``adapter`` with the policy named ``policy`` (a key of :data:`PRUNE_POLICIES`) at ``value``."""
    if policy not in PRUNE_POLICIES:
        raise LoRA2Error(f"unknown prune policy {policy!r}; choose one of {list(PRUNE_POLICIES)}")
    return PRUNE_POLICIES[policy].prune(adapter, value)
