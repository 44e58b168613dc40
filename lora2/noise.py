"""Noise rules: how clean latents, noise and a sampled noise level become a model input and a target.

The training loop is parameterisation-agnostic: a rule draws noise levels, builds the model's input
and timestep, and says what the model's output is compared with, and how each sample is weighted.

* :class:`DDPMRule` — discrete-time diffusion as diffusers models see it: ``x_t = √ᾱ x0 + √(1−ᾱ) ε``,
  target ε (``epsilon``) or ``v = √ᾱ ε − √(1−ᾱ) x0`` (``v_prediction``).
* :class:`FlowRule` — rectified flow (SD3, Flux): ``x_t = (1−t) x0 + t ε``, target ``ε − x0``.
* :class:`DenoisedRule` — k-diffusion style, as ComfyUI runs every model: the denoiser takes
  ``(x, σ)`` and returns its estimate of x0 whatever it predicts internally. The loss is taken on x0
  with a per-sample weight that makes it equal to the model's *native* loss (ε-, v- or flow-MSE), so
  that training through ComfyUI optimises the same objective the model was trained with. The
  weights are in :func:`native_weight`.

A rule never imports ComfyUI; the node passes ComfyUI's ``model_sampling`` functions in as callables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import LoRA2Error


@dataclass
class Prepared:
    """One batch ready for the denoiser: ``loss = mean(weight · (denoiser(model_input, timestep) − target)²)``."""

    model_input: torch.Tensor
    timestep: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    """Per-sample weight, shape ``[B]``."""


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(values.shape[:1] + (1,) * (like.ndim - 1))


class DDPMRule:
    """Discrete DDPM noise with uniformly drawn timesteps (diffusers' training recipe)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str = "epsilon") -> None:
        if prediction not in ("epsilon", "v_prediction"):
            raise LoRA2Error(f"prediction must be 'epsilon' or 'v_prediction', got {prediction!r}")
        self.alphas_cumprod = alphas_cumprod.double()
        self.prediction = prediction

    def prepare(self, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator) -> Prepared:
        steps = len(self.alphas_cumprod)
        t = torch.randint(0, steps, (x0.shape[0],), generator=generator)
        abar = self.alphas_cumprod[t].to(x0.device, torch.float32)
        a, s = _per_sample(abar.sqrt(), x0), _per_sample((1 - abar).sqrt(), x0)
        noisy = a * x0 + s * noise
        target = noise if self.prediction == "epsilon" else a * noise - s * x0
        return Prepared(noisy, t.to(x0.device), target, torch.ones(x0.shape[0], device=x0.device))


class FlowRule:
    """Rectified flow with ``t = shift·u / (1 + (shift−1)·u)``, u uniform (SD3's timestep shift)."""

    def __init__(self, shift: float = 1.0, timestep_scale: float = 1000.0) -> None:
        self.shift = shift
        self.timestep_scale = timestep_scale

    def prepare(self, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator) -> Prepared:
        u = torch.rand(x0.shape[0], generator=generator).to(x0.device)
        t = self.shift * u / (1 + (self.shift - 1) * u)
        tt = _per_sample(t, x0)
        noisy = (1 - tt) * x0 + tt * noise
        return Prepared(noisy, t * self.timestep_scale, noise - x0, torch.ones_like(t))


def native_weight(kind: str, sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """Weight that turns an x0-space squared error into the model's native loss, per sample.

    * ``eps`` (ε-prediction, ``x = x0 + σ ε``) and ``flow`` (``x = (1−σ) x0 + σ ε``, target ``ε − x0``):
      the native error is ``(x0 − x̂0)/σ``, so the weight is ``1/σ²``.
    * ``v`` (ComfyUI's V_PREDICTION): ``(σ² + σ_d²) / (σ² σ_d²)``.
    * ``x0``: 1.
    """
    sigma = sigma.float()
    if kind in ("eps", "flow"):
        return 1.0 / sigma.pow(2)
    if kind == "v":
        return (sigma.pow(2) + sigma_data**2) / (sigma.pow(2) * sigma_data**2)
    if kind == "x0":
        return torch.ones_like(sigma)
    raise LoRA2Error(f"unknown parameterisation {kind!r}; expected eps, v, flow or x0")


class DenoisedRule:
    """k-diffusion style: the denoiser returns x0; noise levels and scaling come from the host.

    Args:
        sample_sigma: maps uniform draws ``u ∈ [0, 1)`` (shape ``[B]``) to noise levels σ.
        noise_scaling: ``(σ, noise, x0) -> x`` (the host's forward process).
        kind: the model's native parameterisation, for :func:`native_weight`.
        sigma_data: σ_d of v-prediction models.
        max_weight: caps ``weight`` so that σ → 0 cannot blow up one step (ε-MSE at σ=0.03 is x1000).
    """

    def __init__(
        self,
        sample_sigma: Callable[[torch.Tensor], torch.Tensor],
        noise_scaling: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        kind: str,
        sigma_data: float = 1.0,
        max_weight: float = 1e3,
    ) -> None:
        native_weight(kind, torch.ones(1))  # validates kind early
        self.sample_sigma = sample_sigma
        self.noise_scaling = noise_scaling
        self.kind = kind
        self.sigma_data = sigma_data
        self.max_weight = max_weight

    def prepare(self, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator) -> Prepared:
        u = torch.rand(x0.shape[0], generator=generator)
        sigma = self.sample_sigma(u).to(x0.device, torch.float32)
        noisy = self.noise_scaling(sigma, noise, x0)
        weight = native_weight(self.kind, sigma, self.sigma_data).clamp(max=self.max_weight)
        return Prepared(noisy, sigma, x0, weight)
