"""lora2/rank.py: the distribution math against closed forms and brute-force sums."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_lora2.lora2 import LoRA2Error
from comfyui_lora2.lora2 import rank as R

RATES = [1e-4, 1e-3, 0.05, 0.3, 1.0, 3.0, 30.0]


@pytest.mark.parametrize("lam", RATES)
def test_pmf_sums_to_one_and_matches_cdf(lam: float) -> None:
    lam_t = torch.tensor(lam, dtype=torch.float64)
    n = int(min(2e6, 60.0 / lam)) + 10  # far enough that the tail mass is < e^-60
    i = torch.arange(n, dtype=torch.float64)
    pmf = R.pmf(i, lam_t)
    assert float(pmf.sum()) == pytest.approx(1.0, abs=1e-9)
    for x in (1, 2, 7, 40):  # Φ(x) = 1 − e^{−λx}
        assert 1 - math.exp(-lam * x) == pytest.approx(float(pmf[:x].sum()), rel=1e-9, abs=1e-12)
    assert 1 / math.expm1(lam) == pytest.approx(float((i * pmf).sum()), rel=1e-7)  # E[i] = 1 / (e^λ − 1)


def test_pmf_is_decreasing_and_safe_at_extremes() -> None:
    i = torch.arange(50.0)
    for lam in (1e-4, 0.5, 80.0):
        pmf = R.pmf(i, torch.tensor(lam))
        assert torch.isfinite(pmf).all()
        assert (pmf[1:] <= pmf[:-1]).all()
    assert float(R.pmf(torch.tensor(0.0), torch.tensor(80.0))) == pytest.approx(1.0)


@pytest.mark.parametrize("mass", [0.5, 0.8, 0.85, 0.9, 0.99])
@pytest.mark.parametrize("lam", [0.003, 0.02, 0.1, 0.5, 2.0, 9.0])
def test_width_is_the_brute_force_quantile_plus_margin(mass: float, lam: float) -> None:
    lam_t = torch.tensor(lam, dtype=torch.float64)
    pmf = R.pmf(torch.arange(5000, dtype=torch.float64), lam_t)
    cumulative = torch.cumsum(pmf, 0)
    smallest = int(torch.nonzero(cumulative >= mass - 1e-12)[0]) + 1  # positions needed to reach the mass
    for margin in (0, 1, 2):
        assert R.width_for_rate(lam, mass, margin, max_rank=10_000) == smallest + margin


def test_width_edge_cases() -> None:
    assert R.width_for_rate(1e-9, 0.9, 1, max_rank=64) == 64  # tiny rate: capped by max_rank
    assert R.width_for_rate(float("inf"), 0.9, 0, max_rank=64) == 1  # huge rate: one position
    assert R.width_for_rate(1e6, 0.9, 2, max_rank=64) == 3
    assert R.width_for_rate(1e6, 0.9, 5, max_rank=4) == 4  # margin never passes max_rank
    with pytest.raises(LoRA2Error, match="importance mass"):
        R.width_for_rate(1.0, 1.0, 1, 8)
    with pytest.raises(LoRA2Error, match="importance mass"):
        R.mass_quantile(0.0)


@pytest.mark.parametrize("width", [2, 3, 4, 8, 17, 64, 300])
@pytest.mark.parametrize("mass", [0.8, 0.85, 0.9])
def test_rate_for_width_round_trips_through_nu(width: int, mass: float) -> None:
    lam = R.rate_for_width(width, mass, margin=1)
    assert R.width_for_rate(lam, mass, 1, max_rank=1000) == width
    nu = R.nu_for_rate(lam)
    assert float(R.rate(torch.tensor(nu, dtype=torch.float64))) == pytest.approx(lam, rel=1e-9)


def test_rate_for_width_refuses_widths_below_the_margin() -> None:
    with pytest.raises(LoRA2Error, match="init_rank=1"):
        R.rate_for_width(1, 0.85, margin=1)


def test_rate_has_a_floor_and_is_softplus() -> None:
    assert float(R.rate(torch.tensor(-200.0))) == pytest.approx(R.LAMBDA_FLOOR)
    assert float(R.rate(torch.tensor(0.0))) == pytest.approx(math.log(2.0) + R.LAMBDA_FLOOR)
    assert float(R.rate(torch.tensor(50.0))) == pytest.approx(50.0 + R.LAMBDA_FLOOR)
    assert R.nu_for_rate(100.0) == pytest.approx(100.0 - R.LAMBDA_FLOOR)


@pytest.mark.parametrize("lam", [1e-4, 0.05, 0.7, 5.0, 60.0])
def test_importance_is_the_renormalised_pmf(lam: float) -> None:
    lam_t = torch.tensor(lam, dtype=torch.float64)
    width = 12
    pmf = R.pmf(torch.arange(width, dtype=torch.float64), lam_t)
    p = R.importance(lam_t, width)
    torch.testing.assert_close(p, pmf / pmf.sum())
    assert float(p.sum()) == pytest.approx(1.0)
    assert (p[1:] <= p[:-1]).all()


def test_importance_gradient_is_that_of_the_untruncated_pmf() -> None:
    """∂p(i)/∂λ = p(i)·(E_∞ − i): the normaliser is held constant (see the docstring for why)."""
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    width = 9
    p = R.importance(lam, width)
    expected_mean = 1 / math.expm1(0.3)  # the untruncated mean position
    for i in range(width):
        (grad,) = torch.autograd.grad(p[i], lam, retain_graph=True)
        assert float(grad) == pytest.approx(float(p[i].detach()) * (expected_mean - i), rel=1e-9)


def test_uniform_importance_is_the_small_rate_limit() -> None:
    torch.testing.assert_close(
        R.importance(torch.tensor(1e-6, dtype=torch.float64), 5).float(), R.uniform_importance(5), atol=1e-5, rtol=0
    )


def test_priors() -> None:
    lams = torch.tensor([1.0, 2.0, 4.0])
    assert float(R.rank_prior(lams, mean=2.0, std=2.0)) == pytest.approx((1 + 0 + 4) / 8)
    tensors = [torch.ones(2, 3), torch.full((4,), 2.0)]
    assert float(R.weight_prior(tensors, std=0.5)) == pytest.approx((6 + 16) / 0.5)
    assert float(R.weight_prior([], std=1.0)) == 0.0
