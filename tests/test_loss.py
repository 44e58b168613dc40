"""What one training step optimises, in closed form: the loss of every noise rule equals the model's native
ε-, v- or flow-MSE (so a wrong loss weight fails here), and gradient clipping bounds the step."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from comfyui_lora2.devtools.adapters import attach_nonzero
from comfyui_lora2.lora2 import attach
from comfyui_lora2.lora2.noise import DDPMRule, DenoisedRule, FlowRule
from comfyui_lora2.lora2.train import TrainConfig, Trainer

SHAPE = (3, 4, 2, 2)
SEED = 7


@dataclass
class Batch:
    latents: torch.Tensor
    conditioning: dict[str, torch.Tensor]


def trainer_for(denoiser, rule) -> Trainer:
    handle = attach(nn.Sequential(nn.Linear(4, 4)), targets=r"^0$", init_rank=2)
    return Trainer(denoiser, rule, iter(()), handle, TrainConfig(steps=1, dtype="float32"))


def draws(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and the uniform draws the trainer takes from a generator seeded with SEED, in its order."""
    generator = torch.Generator().manual_seed(SEED)
    noise = torch.randn(SHAPE, generator=generator)
    return noise, torch.rand(batch_size, generator=generator)


def per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def native_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction - target).pow(2).flatten(1).mean(1).mean()


# How ComfyUI turns each parameterisation's raw output F into x0 (its model_sampling.calculate_denoised),
# with x = x0 + σ ε for eps/v and x = (1 − σ) x0 + σ ε for flow.
def denoised(kind: str, x: torch.Tensor, sigma: torch.Tensor, raw: torch.Tensor, sigma_data: float) -> torch.Tensor:
    s = per_sample(sigma)
    if kind in ("eps", "flow"):
        return x - raw * s
    if kind == "v":
        return x * sigma_data**2 / (s**2 + sigma_data**2) - raw * s * sigma_data / (s**2 + sigma_data**2).sqrt()
    return raw


@pytest.mark.parametrize(("kind", "sigma_data"), [("eps", 1.0), ("v", 1.0), ("v", 0.5), ("flow", 1.0), ("x0", 1.0)])
def test_the_denoised_rule_loss_is_the_models_native_mse(kind: str, sigma_data: float) -> None:
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    raw = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))  # the network's own prediction
    low, high = (0.05, 0.95) if kind == "flow" else (0.1, 3.0)
    rule = DenoisedRule(
        sample_sigma=lambda u: low + (high - low) * u,
        noise_scaling=(
            (lambda s, n, x: per_sample(s) * n + (1 - per_sample(s)) * x)
            if kind == "flow"
            else (lambda s, n, x: x + per_sample(s) * n)
        ),
        kind=kind,
        sigma_data=sigma_data,
    )
    trainer = trainer_for(lambda x, sigma, _: denoised(kind, x, sigma, raw, sigma_data), rule)
    loss = trainer._loss(Batch(x0, {}), torch.Generator().manual_seed(SEED))

    noise, u = draws(SHAPE[0])
    sigma = per_sample(low + (high - low) * u)
    if kind == "eps":
        target = noise
    elif kind == "flow":
        target = noise - x0  # rectified flow's velocity
    elif kind == "v" and sigma_data == 1.0:  # diffusers' v on the variance-preserving input x / √(1 + σ²)
        alpha, sig = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()
        target = alpha * noise - sig * x0
    elif kind == "v":  # EDM's definition: the output that makes the denoised value x0 exactly
        x = x0 + sigma * noise
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        target = (x * c_skip - x0) / c_out
    else:
        target = x0
    torch.testing.assert_close(loss, native_mse(raw, target), rtol=1e-5, atol=1e-6)


def loss_seen_by_a_fixed_prediction(rule) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    """``(x0, prediction, what the model was given, the trainer's loss)`` for a model that always predicts ``raw``."""
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    raw = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    seen: dict = {}

    def denoiser(x, t, _):
        seen.update(x=x, t=t)
        return raw

    return x0, raw, seen, trainer_for(denoiser, rule)._loss(Batch(x0, {}), torch.Generator().manual_seed(SEED))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_ddpm_rule_matches_diffusers_forward_process_and_targets(prediction: str) -> None:
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x0, raw, seen, loss = loss_seen_by_a_fixed_prediction(DDPMRule(scheduler.alphas_cumprod, prediction))
    generator = torch.Generator().manual_seed(SEED)
    noise = torch.randn(SHAPE, generator=generator)
    t = torch.randint(0, 1000, (SHAPE[0],), generator=generator)
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["x"], scheduler.add_noise(x0, noise, t))
    target = noise if prediction == "epsilon" else scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(loss, native_mse(raw, target), rtol=1e-5, atol=1e-6)


def test_the_flow_rule_is_rectified_flow_with_sd3_timestep_shift() -> None:
    shift = 3.0
    x0, raw, seen, loss = loss_seen_by_a_fixed_prediction(FlowRule(shift=shift))
    noise, u = draws(SHAPE[0])
    t = shift * u / (1 + (shift - 1) * u)
    torch.testing.assert_close(seen["t"], t * 1000)
    torch.testing.assert_close(seen["x"], (1 - per_sample(t)) * x0 + per_sample(t) * noise)
    torch.testing.assert_close(loss, native_mse(raw, noise - x0), rtol=1e-5, atol=1e-6)


def test_a_tiny_sigma_cannot_blow_up_one_step() -> None:
    rule = DenoisedRule(lambda u: torch.full_like(u, 1e-3), lambda s, n, x: x + per_sample(s) * n, "eps")
    prepared = rule.prepare(torch.zeros(SHAPE), torch.randn(SHAPE), torch.Generator().manual_seed(0))
    assert torch.equal(prepared.weight, torch.full((SHAPE[0],), rule.max_weight))


class Steep(nn.Module):
    """A denoiser whose loss has a huge gradient with respect to its adapted layer."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return 1e3 * self.proj(x.flatten(1)).view_as(x)


@pytest.mark.parametrize("max_grad_norm", [1e-3, 0.0])
def test_gradient_clipping_bounds_the_first_sgd_step(max_grad_norm: float) -> None:
    torch.manual_seed(0)
    model = Steep().requires_grad_(False)
    handle = attach_nonzero(model, targets=r"^proj$", init_rank=3)
    rule = DenoisedRule(lambda u: 0.5 + u, lambda s, n, x: x + per_sample(s) * n, "x0")
    x0 = torch.randn(SHAPE)

    def batches():
        while True:
            yield Batch(x0, {})

    lr = 0.1
    config = TrainConfig(steps=1, lr=lr, optimizer="sgd", dtype="float32", max_grad_norm=max_grad_norm)
    before = [p.detach().clone() for p in handle.factor_parameters()]
    Trainer(model, rule, batches(), handle, config).run()
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(handle.factor_parameters(), before, strict=True)])
    if max_grad_norm > 0:  # SGD's first step is lr · g, and the clipped g has norm ≤ max_grad_norm
        assert float(moved.norm()) <= lr * max_grad_norm * (1 + 1e-4)
    else:  # the same step unclipped is far larger: the bound above is not met by accident
        assert float(moved.norm()) > 100 * lr * 1e-3
