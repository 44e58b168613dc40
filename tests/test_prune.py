"""lora2/prune.py: SVD re-factoring, rank choices (mass, energy, budget) and the prune report."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch import nn

from comfyui_lora2.lora2 import LoRA2Config, LoRA2Error, attach
from comfyui_lora2.lora2 import rank as rank_math
from comfyui_lora2.lora2.adapter import Adapter, Component, ResumeState
from comfyui_lora2.lora2.lora_file import load_adapter, save_adapter
from comfyui_lora2.lora2.prune import (
    energy_rank,
    mass_rank,
    prune_by_energy,
    prune_by_mass,
    prune_to_budget,
    singular_values,
    svd_refactor,
)


def random_component(out: int, inp: int, rank: int, kernel: int = 0, nu: float | None = None) -> Component:
    if kernel:
        return Component(torch.randn(out, rank, 1, 1), torch.randn(rank, inp, kernel, kernel), nu=nu)
    return Component(torch.randn(out, rank), torch.randn(rank, inp), nu=nu)


def planted_component(out: int, inp: int, sigmas: list[float]) -> Component:
    """ΔW = U diag(σ) Vᵀ with orthonormal U, V: its singular values are exactly ``sigmas``."""
    k = len(sigmas)
    u = torch.linalg.qr(torch.randn(out, k, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(inp, k, dtype=torch.float64))[0]
    s = torch.tensor(sigmas, dtype=torch.float64)
    return Component(up=(u * s).float(), down=v.T.float().contiguous())


def relative_error(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((before.double() - after.double()).norm() / before.double().norm())


def mixed_adapter(seed: int) -> Adapter:
    rng = random.Random(seed)
    components = {}
    for i in range(rng.randint(1, 6)):
        out, inp, rank = rng.randint(2, 24), rng.randint(2, 24), rng.randint(1, 8)
        kernel = rng.choice([0, 0, 1, 3])
        components[f"blocks.{i}.{'conv' if kernel else 'fc'}"] = random_component(out, inp, rank, kernel)
    return Adapter(components=components, base_model="Test")


def lora2_adapter() -> Adapter:
    """A LoRA²-made adapter (ν per component) with random factors."""
    model = nn.Sequential(nn.Linear(12, 10), nn.Conv2d(3, 8, 3, padding=1), nn.Linear(10, 16)).requires_grad_(False)
    handle = attach(model, LoRA2Config(targets="all", init_rank=5, max_rank=8))
    with torch.no_grad():
        for i, component in enumerate(handle.components.values()):
            component.up.normal_()
            component.down.normal_()
            component.nu.fill_(rank_math.nu_for_rate(0.3 + 0.4 * i))
    return Adapter.from_handle(handle, base_model="SD15", history={"loss": [1.0, 0.5], "ranks": [[5, 5, 5]] * 2})


# ----------------------------------------------------------------------------- SVD re-factoring
@pytest.mark.parametrize("kernel", [0, 1, 3])
def test_svd_refactor_keeps_an_exact_rank_r_update(kernel: int) -> None:
    component = random_component(9, 7, 4, kernel, nu=0.25)
    refactored = svd_refactor(component, 4)
    assert refactored.up.shape == component.up.shape and refactored.down.shape == component.down.shape
    assert refactored.nu == 0.25
    assert relative_error(component.delta(), refactored.delta()) < 1e-5
    # positions come out in decreasing singular value, √σ in each factor
    norms = refactored.up.flatten(1).norm(dim=0)
    assert torch.all(norms[:-1] >= norms[1:] - 1e-5)
    torch.testing.assert_close(norms, refactored.down.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-5)


def test_svd_refactor_is_the_best_low_rank_approximation_and_clamps() -> None:
    component = random_component(20, 15, 6)
    dense = component.up.double() @ component.down.double()
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    torch.testing.assert_close(singular_values(component)[:6], s[:6], rtol=1e-9, atol=1e-9)
    for k in (1, 3, 5):
        best = (u[:, :k] * s[:k]) @ vh[:k]
        torch.testing.assert_close(svd_refactor(component, k).delta().double(), best, rtol=1e-5, atol=1e-5)
    assert svd_refactor(component, 50).rank == 6  # never above what ΔW can have
    assert svd_refactor(random_component(3, 20, 8), 8).rank == 3  # nor above the weight's smaller side
    with pytest.raises(LoRA2Error, match="at least 1"):
        svd_refactor(component, 0)


# ----------------------------------------------------------------------------- rank choices
def test_energy_rank_on_synthetic_spectra() -> None:
    spectrum = [math.sqrt(e) for e in (50, 30, 15, 5)]  # energies out of 100
    assert [energy_rank(spectrum, f) for f in (0.4, 0.5, 0.8, 0.81, 0.95, 0.96, 1.0)] == [1, 1, 2, 3, 3, 4, 4]
    assert energy_rank([1.0] * 10, 0.9) == 9  # exact tie lands on the tie
    assert energy_rank([3.0, 0.0, 0.0], 1.0) == 1
    assert energy_rank([0.0, 0.0], 0.5) == 1
    assert energy_rank(torch.tensor([0.1, 2.0]), 0.9) == 1  # order does not matter
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(LoRA2Error, match="energy fraction"):
            energy_rank(spectrum, bad)


def test_mass_rank_follows_the_importance_weights() -> None:
    for lam, width in ((0.2, 12), (1.0, 6), (3.0, 4)):
        p = rank_math.importance(torch.tensor(lam, dtype=torch.float64), width)
        nu = rank_math.nu_for_rate(lam)
        for mass in (0.3, 0.6, 0.9, 0.99):
            expected = next(i + 1 for i, c in enumerate(p.cumsum(0).tolist()) if c >= mass - 1e-9)
            assert mass_rank(nu, width, mass) == min(expected, width)
        assert mass_rank(nu, width, 1.0) == width


# ----------------------------------------------------------------------------- policies
def test_mass_one_is_lossless_for_a_lora2_adapter() -> None:
    adapter = lora2_adapter()
    assert all(c.nu is not None for c in adapter.components.values())
    pruned, report = prune_by_mass(adapter, 1.0)
    assert pruned.ranks() == adapter.ranks()
    for name in adapter.components:
        torch.testing.assert_close(pruned.delta(name), adapter.delta(name), rtol=1e-6, atol=1e-6)
    assert report.max_error < 1e-6


def test_mass_below_one_uses_nu_and_falls_back_to_energy_without_it() -> None:
    adapter = lora2_adapter()
    adapter.components["plain"] = planted_component(10, 8, [10.0, 1.0, 0.1])
    pruned, report = prune_by_mass(adapter, 0.995)
    for entry in report.components:
        component = adapter.components[entry.name]
        if component.nu is None:
            assert entry.rank_after == 2  # energies 100, 1, 0.01: 0.990 of the total at one direction, 0.9999 at two
        else:
            assert entry.rank_after == mass_rank(component.nu, component.rank, 0.995)
        assert 1 <= entry.rank_after <= entry.rank_before
        assert pruned.components[entry.name].nu == component.nu


def test_energy_pruning_picks_the_planted_ranks_and_reports_true_errors() -> None:
    adapter = Adapter(
        components={
            "a": planted_component(16, 12, [5.0, 0.01, 0.01, 0.01]),
            "b": planted_component(16, 12, [3.0, 3.0, 3.0, 0.01]),
            "c": planted_component(16, 12, [1.0, 1.0, 1.0, 1.0]),
        }
    )
    pruned, report = prune_by_energy(adapter, 0.99)
    assert pruned.ranks() == {"a": 1, "b": 3, "c": 4}
    for entry in report.components:
        recomputed = relative_error(adapter.delta(entry.name), pruned.delta(entry.name))
        assert entry.relative_error == pytest.approx(recomputed, rel=1e-4, abs=1e-6)


def test_budget_is_never_exceeded_on_random_adapters() -> None:
    for seed in range(40):
        adapter = mixed_adapter(seed)
        total = adapter.num_parameters()
        rng = random.Random(seed)
        for budget in sorted({rng.randint(0, total) for _ in range(6)} | {total, 2 * total}):
            try:
                pruned, report = prune_to_budget(
                    adapter, max_parameters=budget, weighting=rng.choice(["per_parameter", "energy"])
                )
            except LoRA2Error as error:  # only when not even one direction fits
                cheapest = min(c.up.shape[0] + c.down[0].numel() for c in adapter.components.values())
                assert budget < cheapest, error
                continue
            assert pruned.num_parameters() <= budget
            assert report.parameters_after == pruned.num_parameters()
            assert all(rank >= 1 for rank in pruned.ranks().values())
            if budget >= total:  # everything fits: lossless
                assert not report.dropped and report.max_error < 1e-6
            assert set(pruned.components) == set(adapter.components) - set(report.dropped)
            for entry in report.components:
                if entry.rank_after:
                    recomputed = relative_error(adapter.delta(entry.name), pruned.delta(entry.name))
                    assert entry.relative_error == pytest.approx(recomputed, rel=1e-3, abs=1e-5)
                else:
                    assert entry.relative_error == 1.0


def test_budget_in_megabytes_and_the_greedy_order() -> None:
    adapter = Adapter(
        components={
            "small": planted_component(4, 4, [4.0, 2.0, 1.0]),  # 8 parameters per direction
            "large": planted_component(20, 20, [6.0, 5.0, 0.5]),  # 40 parameters per direction
        }
    )
    # σ²/cost: small 2.0, 0.5, 0.125; large 0.9, 0.625, 0.00625 -> small0, large0, large1, small1, ...
    pruned, _ = prune_to_budget(adapter, max_parameters=8 + 40 + 40)
    assert pruned.ranks() == {"small": 1, "large": 2}
    pruned, _ = prune_to_budget(adapter, max_parameters=8 + 40 + 40, weighting="energy")
    assert pruned.ranks() == {"small": 1, "large": 2}
    pruned, _ = prune_to_budget(adapter, max_parameters=40 + 8, weighting="energy")  # σ²: 36, 25 (no room), 16
    assert pruned.ranks() == {"small": 1, "large": 1}
    # 100 bytes at fp16 = 50 parameters: small0 (8) + large0 (40) fit, nothing else does
    pruned, report = prune_to_budget(adapter, max_megabytes=100e-6)
    assert pruned.ranks() == {"small": 1, "large": 1} and pruned.megabytes() <= 100e-6
    pruned, report = prune_to_budget(adapter, max_parameters=20)
    assert pruned.ranks() == {"small": 2} and report.dropped == ["large"]
    with pytest.raises(LoRA2Error, match="drop every component"):
        prune_to_budget(adapter, max_parameters=7)
    with pytest.raises(LoRA2Error, match="max_parameters or max_megabytes"):
        prune_to_budget(adapter)
    with pytest.raises(LoRA2Error, match="weighting"):
        prune_to_budget(adapter, max_parameters=100, weighting="size")  # type: ignore[arg-type]


def test_a_pruned_adapter_keeps_its_provenance_but_not_resume_and_the_input_is_untouched(tmp_path) -> None:
    adapter = lora2_adapter()
    adapter.resume = ResumeState({}, None, torch.Generator().get_state(), {})
    before = {name: (c.up.clone(), c.down.clone(), c.nu) for name, c in adapter.components.items()}
    pruned, _ = prune_by_energy(adapter, 0.5)
    assert pruned.source == "pruned" and pruned.resume is None
    assert pruned.base_model == "SD15" and pruned.history == adapter.history and pruned.config == adapter.config
    assert pruned.extra["pruned"][0]["policy"] == "energy"
    assert adapter.resume is not None and adapter.source == "lora2" and "pruned" not in adapter.extra
    for name, (up, down, nu) in before.items():
        component = adapter.components[name]
        assert torch.equal(component.up, up) and torch.equal(component.down, down) and component.nu == nu
    save_adapter(tmp_path / "pruned.safetensors", pruned)
    loaded = load_adapter(tmp_path / "pruned.safetensors")
    assert loaded.source == "pruned" and loaded.ranks() == pruned.ranks()


def test_report_table_and_dict() -> None:
    adapter = Adapter(
        components={"blocks.0.fc": planted_component(4, 4, [4.0, 2.0]), "blocks.1.fc": planted_component(20, 20, [1.0])}
    )
    _, report = prune_to_budget(adapter, max_parameters=16)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["policy"] == "budget" and data["setting"]["max_parameters"] == 16
    assert data["totals"]["parameters_before"] == 16 + 40 and data["totals"]["parameters_after"] == 16
    assert data["totals"]["megabytes_after"] == pytest.approx(32e-6)
    assert data["totals"]["components_after"] == 1
    entries = {c["name"]: c for c in data["components"]}
    assert entries["blocks.1.fc"]["rank_after"] == 0 and entries["blocks.1.fc"]["relative_error"] == 1.0
    assert entries["blocks.0.fc"]["rank_before"] == entries["blocks.0.fc"]["rank_after"] == 2
    table = report.to_table()
    lines = table.splitlines()
    assert lines[0].startswith("prune policy: budget") and "component" in lines[1]
    assert any(line.startswith("blocks.1.fc") and " drop " in line for line in lines)
    assert lines[-1].startswith("total: 56 -> 16 parameters") and "1 dropped" in lines[-1]
