"""lora2/rank_control.py + growth.py: widths follow gradient evidence (grow) and singular values (shrink).

Pinned with numbers, in seconds: growth from below the need, no growth without need, an output that
does not move across a growth or a lossless re-factoring, the sketch finding the top direction outside
the span, and its evidence staying quiet under pure noise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comfyui_lora2.lora2 import LoRA2Config, LoRA2Error, attach
from comfyui_lora2.lora2.growth import GradientSketch
from comfyui_lora2.lora2.rank_control import growth_count, kept_directions, rising_count, spectral_norm
from comfyui_lora2.lora2.spectrum import factor_svd

DIM = 32


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(DIM, DIM, bias=False)
        self.to_v = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_q(x), self.to_v(x)


def planted(rank: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(DIM, rank, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(DIM, rank, generator=generator))
    return u @ torch.diag(0.5 + 0.5 * torch.rand(rank, generator=generator)) @ v.T


def fit(rank_q: int, rank_v: int, steps: int, lr: float = 3e-3, max_rank: int = 24, **config) -> tuple:
    """Train LoRA² on two layers against planted updates of the given ranks (0: no update)."""
    torch.manual_seed(0)
    model = TwoLayers().requires_grad_(False)
    targets = {"to_q": planted(rank_q, 1) if rank_q else torch.zeros(DIM, DIM), "to_v": planted(rank_v, 2)}
    handle = attach(model, LoRA2Config(targets="attn", init_rank=4, max_rank=max_rank, **config))
    optimizer = torch.optim.Adam(handle.param_groups(lr))
    generator = torch.Generator().manual_seed(5)
    history = []
    for _ in range(steps):
        x = torch.randn(64, DIM, generator=generator)
        q, v = model(x)
        with handle.disabled(), torch.no_grad():
            base_q, base_v = model(x)
        loss = F.mse_loss(q, base_q + x @ targets["to_q"].T) + F.mse_loss(v, base_v + x @ targets["to_v"].T)
        (loss + handle.regularizer()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        handle.step(optimizer)
        history.append(handle.ranks())
    return handle, targets, history


def relative_error(handle, name: str, target: torch.Tensor) -> float:
    return float((handle.delta(name) - target).norm() / target.norm().clamp(min=1e-12))


def test_a_component_grows_from_below_its_need_and_fits() -> None:
    handle, targets, history = fit(rank_q=0, rank_v=12, steps=700)
    ranks = handle.ranks()
    assert 12 <= ranks["to_v"] <= 14, history[::50]
    assert max(h["to_v"] for h in history) <= 16
    assert relative_error(handle, "to_v", targets["to_v"]) < 0.02


def test_a_component_without_need_stays_small() -> None:
    handle, _, history = fit(rank_q=0, rank_v=12, steps=700)
    assert handle.ranks()["to_q"] <= 2, history[::50]
    assert max(h["to_q"] for h in history) <= 4  # never grew past its start
    assert handle.delta("to_q").norm() < 0.05


def test_growth_does_not_need_a_fast_learning_rate() -> None:
    handle, _, history = fit(rank_q=0, rank_v=12, steps=400, lr=3e-4)
    assert handle.ranks()["to_v"] >= 10, history[::50]


def test_growth_keeps_the_output_and_the_optimizer_follows() -> None:
    torch.manual_seed(0)
    model = TwoLayers().requires_grad_(False)
    handle = attach(model, LoRA2Config(targets="attn", init_rank=4, max_rank=24, decide_every=1))
    optimizer = torch.optim.Adam(handle.param_groups(1e-2))
    x = torch.randn(16, DIM)
    for _ in range(3):  # give up some values so that the rescaling of survivors is visible
        sum(o.pow(2).sum() for o in model(x)).neg().backward()
        optimizer.step()
        optimizer.zero_grad()
    component = handle.components["to_v"]
    before = torch.cat(model(x)).detach()
    moments = optimizer.state[component.up]["exp_avg"].clone()
    directions = torch.linalg.qr(torch.randn(DIM, 3))[0].T
    old_up = component.up
    change = component.grow(directions, nu=0.1)
    handle_optimizer_follow(optimizer, component, change)
    assert component.width == 7 and component.capacity == 7
    torch.testing.assert_close(torch.cat(model(x)).detach(), before, atol=1e-6, rtol=1e-5)
    new_rows = component.down[4:7].detach()
    norms = component.row_norms(7)[4:7]
    torch.testing.assert_close(new_rows, directions * norms[:, None])
    assert optimizer.state[component.up]["exp_avg"].shape == (DIM, 7)
    torch.testing.assert_close(optimizer.state[component.up]["exp_avg"][:, :4], moments)
    assert old_up not in optimizer.state


def handle_optimizer_follow(optimizer, component, change) -> None:
    from comfyui_lora2.lora2.attach import follow_width_change

    follow_width_change(optimizer, component, change)


def test_compensated_rows_make_every_position_move_alike() -> None:
    model = TwoLayers().requires_grad_(False)
    handle = attach(model, LoRA2Config(targets="attn", init_rank=8, max_rank=24))
    component = handle.components["to_q"]
    norms = component.row_norms(8)
    p = component.importance().detach()
    torch.testing.assert_close(norms * p, torch.full((8,), float(p[0]) / 3**0.5))
    plain = attach(TwoLayers(), LoRA2Config(targets="attn", init_rank=8, compensate_importance=False))
    assert torch.allclose(plain.components["to_q"].row_norms(8), torch.full((8,), 3**-0.5))


def test_refactor_keeps_the_update_and_orders_positions_by_singular_value() -> None:
    handle, _, _ = fit(rank_q=0, rank_v=6, steps=60, shrink_ratio=0.0, shrink_floor=0.0)
    component = handle.components["to_v"]
    before = component.delta_weight()
    width = component.width
    component.refactor(width, nu=float(component.nu))
    torch.testing.assert_close(component.delta_weight(), before, atol=1e-5, rtol=1e-4)
    contributions = (component.up.detach().norm(dim=0) * component.importance().detach()).tolist()
    contributions = [c * float(n) for c, n in zip(contributions, component.down.detach().norm(dim=1), strict=True)]
    assert contributions == sorted(contributions, reverse=True)
    singular = factor_svd(before.flatten(1), torch.eye(DIM, dtype=torch.float64))[1]
    component.refactor(2, nu=float(component.nu))
    error = float((component.delta_weight().double() - before.double()).norm())
    assert error == pytest.approx(float(singular[2:].pow(2).sum().sqrt()), rel=1e-3)


def test_sketch_finds_the_top_direction_outside_the_span() -> None:
    generator = torch.Generator().manual_seed(0)
    sketch = GradientSketch(DIM, DIM, directions=2, beta=0.5, generator=generator)
    span_in = torch.linalg.qr(torch.randn(DIM, 3, generator=generator))[0]  # rows of `down`
    sketch.set_spans(span_in.T, torch.zeros(DIM, 3))
    gradient = planted(4, 7)
    x = torch.randn(256, DIM, generator=generator)
    delta = x @ torch.linalg.pinv(x.T @ x) @ gradient.T  # then δᵀx = G exactly
    for _ in range(300):
        sketch.observe(x, delta)
    projected = gradient - gradient @ span_in @ span_in.T
    _, s, vh = torch.linalg.svd(projected)
    direction = sketch.new_directions(1)[0]
    assert abs(float(direction @ vh[0])) > 0.999
    assert float(sketch.strength()[0]) == pytest.approx(float(s[0]), rel=1e-3)
    assert float((direction @ span_in).abs().max()) < 1e-5


def test_tracked_directions_stay_outside_the_spans_without_reprojection() -> None:
    """``observe`` measures along ``u``, ``v`` as they are (no projection per step, for speed): that is
    right only while every update keeps them outside the spans, across a span change too."""
    generator = torch.Generator().manual_seed(2)
    sketch = GradientSketch(DIM, DIM, directions=4, beta=0.9, generator=generator)
    for _ in range(2):
        down = torch.randn(3, DIM, generator=generator)
        up = torch.randn(DIM, 3, generator=generator)
        sketch.set_spans(down, up)
        for _ in range(200):
            x = torch.randn(16, DIM, generator=generator)
            sketch.observe(x, x @ planted(4, 7).T + 0.3 * torch.randn(16, DIM, generator=generator))
        sketch.flush()
        basis_in, basis_out = torch.linalg.qr(down.T)[0], torch.linalg.qr(up)[0]
        assert float((basis_in.T @ sketch.v).abs().max()) < 1e-5
        assert float((basis_out.T @ sketch.u).abs().max()) < 1e-5
        torch.testing.assert_close(sketch.u.T @ sketch.u, torch.eye(4), atol=1e-5, rtol=0)


def test_sketch_evidence_is_quiet_under_pure_noise() -> None:
    generator = torch.Generator().manual_seed(1)
    sketch = GradientSketch(DIM, DIM, directions=4, beta=0.9, generator=generator)
    z_max = []
    for step in range(400):
        x = torch.randn(8, DIM, generator=generator)
        delta = torch.randn(8, DIM, generator=generator)  # zero-mean gradient: nothing to learn
        sketch.observe(x, delta)
        if step > 40:
            z_max.append(float(sketch.z_scores().max()))
    assert sum(z > 4.0 for z in z_max) <= 2, max(z_max)


def test_rules_are_the_documented_thresholds() -> None:
    rule = LoRA2Config(growth_z=4.0, growth_fade=0.1, growth_directions=3, shrink_ratio=0.05, shrink_floor=1e-3)
    z = torch.tensor([9.0, 5.0, 3.0, 9.0])
    strength = torch.tensor([1.0, 0.5, 0.5, 0.5])
    assert growth_count(z, strength, peak=2.0, rule=rule) == 2  # third fails z, so the fourth does not count
    assert growth_count(z, strength, peak=6.0, rule=rule) == 1  # 0.5 < 0.1·6: faded
    assert growth_count(torch.full((4,), 9.0), torch.ones(4), peak=1.0, rule=rule) == 3  # capped
    singular = torch.tensor([2.0, 1.0, 0.12, 0.05])
    assert kept_directions(singular, weight_norm=10.0, rule=rule) == 3
    assert kept_directions(singular, weight_norm=200.0, rule=rule) == 2  # floor 0.2 over ratio 0.1
    assert kept_directions(torch.zeros(4), weight_norm=1.0, rule=rule) == 1


def test_only_directions_that_stopped_growing_may_be_shed() -> None:
    now = torch.tensor([3.0, 1.0, 0.2, 0.01])
    anywhere = {"threshold": 0.0, "horizon": 0.0}  # no size to reach: every rise counts
    assert rising_count(now, None, **anywhere) == 4  # nothing known yet: nothing has stopped
    assert rising_count(now, torch.tensor([3.5, 0.9, 0.3, 0.02]), **anywhere) == 2  # the second still rises
    assert rising_count(now, torch.tensor([2.0, 1.5, 0.3, 0.005]), **anywhere) == 4  # the last still rises
    assert rising_count(now, now.clone(), **anywhere) == 0
    assert rising_count(now, torch.tensor([3.5, 0.5]), **anywhere) == 2  # a shorter history compares what it has


def test_a_rise_counts_only_when_it_is_on_course_to_reach_the_kept_size() -> None:
    """sd15 seed 3 of the diffusion bench: a fifth direction at 0.05 % of the top crept up by round-off
    and held its position for 400 steps. Rising at its rate for ``horizon`` checks it must reach the
    threshold, so that one is shed while a young direction climbing from zero is kept."""
    threshold, horizon = 0.05 * 0.23, 5.0
    creeping = torch.tensor([0.23, 0.05, 1.3e-4])
    assert rising_count(creeping, torch.tensor([0.23, 0.05, 1.28e-4]), threshold, horizon) == 0
    young = torch.tensor([0.23, 0.05, 4e-3])  # +1.6e-3 a check: reaches 1.2e-2 in 5 checks
    assert rising_count(young, torch.tensor([0.23, 0.05, 2.4e-3]), threshold, horizon) == 3
    assert rising_count(young, torch.tensor([0.23, 0.05, 3e-3]), threshold, horizon) == 0  # too slow
    assert rising_count(young, torch.tensor([0.23, 0.05, 2.4e-3]), threshold, horizon=4.0) == 0  # horizon is read


def _set_singular_values(component, values: list[float]) -> None:
    """Factors whose ΔW (importance and alpha included) has exactly these singular values."""
    width = len(values)
    basis = torch.linalg.qr(torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(3)))[0]
    scale = (component.alpha * component.importance().float())[:width]
    with torch.no_grad():
        component.down[:width] = basis[:width]
        component.up[:, :width] = basis[:, DIM - width :] * (torch.tensor(values) / scale)


@pytest.mark.parametrize(
    ("third_before", "third_after", "horizon", "width_after"),
    [
        (1e-4, 1.02e-4, 200, 2),  # creeps by round-off: shed
        (1e-4, 1e-2, 200, 3),  # climbs from nothing: young
        (0.02, 0.022, 200, 3),  # 20 checks at +0.002 pass the 5 % keep size...
        (0.02, 0.022, 50, 2),  # ...5 checks do not: the horizon comes from the config
    ],
)
def test_the_shrink_check_sheds_a_creeping_direction_and_spares_a_climbing_one(
    third_before: float, third_after: float, horizon: int, width_after: int
) -> None:
    """Wiring of :func:`rising_count` into the shrink check: a third direction below the 5 % keep size is
    kept only if its rise since the previous check carries it there within ``shrink_horizon`` steps."""
    config = LoRA2Config(targets="attn", init_rank=3, max_rank=8, shrink_horizon=horizon)
    handle = attach(TwoLayers().requires_grad_(False), config)
    control = handle._controls["to_v"]
    _set_singular_values(control.component, [1.0, 0.5, third_before])
    assert control._shrink() is None  # first check: nothing known to have stopped yet
    _set_singular_values(control.component, [1.0, 0.5, third_after])
    control._shrink()
    assert control.component.width == width_after


def test_a_young_component_below_its_need_is_not_shrunk_while_it_learns() -> None:
    """At a slow learning rate the initial positions are still small at the first shrink check; a rule
    judging size alone cut them (measured in diffusion: every component fell from 4 to 2-3 at step 50)."""
    _, _, history = fit(rank_q=0, rank_v=12, steps=150, lr=3e-5)
    assert min(h["to_v"] for h in history) >= 4, history[::10]


def test_spectral_norm_by_power_iteration() -> None:
    weight = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    assert spectral_norm(weight, iterations=100) == pytest.approx(float(torch.linalg.matrix_norm(weight, 2)), rel=1e-4)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rank_control": "magic"}, "rank_control"),
        ({"decide_every": 0}, "decide_every"),
        ({"evidence_beta": 1.0}, "evidence_beta"),
        ({"growth_z": -1.0}, "growth_z"),
        ({"shrink_horizon": -1}, "shrink_horizon"),
    ],
)
def test_rank_control_settings_are_validated(fields: dict, message: str) -> None:
    with pytest.raises(LoRA2Error, match=message):
        LoRA2Config(**fields)


def test_evidence_state_round_trips_so_resume_decides_alike() -> None:
    handle, _, _ = fit(rank_q=0, rank_v=6, steps=165)
    assert any(control.last_singular is not None for control in handle._controls.values())
    state = handle.state_dict()
    assert any(".evidence." in key for key in state)
    twin = attach(TwoLayers().requires_grad_(False), LoRA2Config(targets="attn", init_rank=4, max_rank=24))
    twin.load_state_dict(state)
    for name, control in handle._controls.items():
        restored = twin._controls[name]
        assert restored.last_growth == control.last_growth
        assert restored.sketch.count == control.sketch.count
        assert (restored.last_singular is None) == (control.last_singular is None)
        if control.last_singular is not None:
            torch.testing.assert_close(restored.last_singular, control.last_singular, atol=0, rtol=0)
        torch.testing.assert_close(restored.sketch.z_scores(), control.sketch.z_scores(), atol=0, rtol=0)


def test_non_finite_evidence_is_discarded_not_checkpointed() -> None:
    handle, _, _ = fit(rank_q=0, rank_v=6, steps=15)
    poisoned = handle._controls["to_v"].sketch
    poisoned.observe(torch.full((4, DIM), float("nan")), torch.ones(4, DIM))
    clean = handle._controls["to_q"].sketch
    handle.discard_non_finite_evidence()
    fresh = handle._controls["to_v"].sketch
    assert fresh is not poisoned and fresh.count == 0
    assert all(bool(torch.isfinite(value).all()) for value in fresh.state_dict().values())
    assert handle._controls["to_q"].sketch is clean  # a finite sketch keeps its evidence


def test_a_sketch_at_max_rank_holds_no_spans_and_nothing_changes(monkeypatch) -> None:
    """The span bases (the factors' size) are dropped while a component cannot grow; the run is the same
    to the last bit as one that keeps them, including the steps after a component reached ``max_rank``."""
    handle, _, history = fit(rank_q=0, rank_v=10, steps=120, max_rank=8)
    assert any(ranks["to_v"] == 8 for ranks in history[:100]), history  # reached max_rank, then trained on
    at_max = [c for c in handle.components.values() if c.width == 8]
    assert at_max and all(c.sketch.basis_in is None and c.sketch.basis_out is None for c in at_max)
    below = [c for c in handle.components.values() if c.width < 8]
    assert all(c.sketch.basis_in is not None for c in below)

    monkeypatch.setattr(GradientSketch, "release_spans", lambda self: None)
    kept, _, kept_history = fit(rank_q=0, rank_v=10, steps=120, max_rank=8)
    assert kept_history == history
    for name, component in handle.components.items():
        twin = kept.components[name]
        torch.testing.assert_close(component.down, twin.down, atol=0, rtol=0)
        torch.testing.assert_close(component.up, twin.up, atol=0, rtol=0)
        torch.testing.assert_close(component.sketch.z_scores(), twin.sketch.z_scores(), atol=0, rtol=0)
