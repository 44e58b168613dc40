"""A ComfyUI MODEL as the plain callables ``lora2`` trains: denoiser, noise rule, latents, a training target.

Why through ComfyUI's own ``extra_conds``/``apply_model`` and ``model_sampling``: one code path then serves
every family ComfyUI runs (SD1.5, SDXL, Flux, SD3, ...), with each family's conditioning and schedule as
ComfyUI builds them for sampling.
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.model_management
import comfy.model_sampling
import torch

from ...lora2.errors import LoRA2Error
from ...lora2.noise import DenoisedRule


def base_model(model) -> torch.nn.Module:
    """The ``BaseModel`` inside a MODEL (a ModelPatcher)."""
    if not hasattr(model, "model") or not hasattr(model.model, "diffusion_model"):
        raise LoRA2Error("the 'model' input is not a ComfyUI diffusion MODEL (expected a ModelPatcher)")
    return model.model


def model_family(model) -> str:
    """ComfyUI's name for the model family, e.g. ``SD15``, ``SDXL``, ``Flux``, ``SD3``."""
    return type(base_model(model).model_config).__name__


def parameterisation(model_sampling) -> tuple[str, float]:
    """``(kind, sigma_data)`` of a ``model_sampling`` object, for :func:`lora2.noise.native_weight`."""
    ms = comfy.model_sampling
    if isinstance(model_sampling, ms.CONST):
        return "flow", 1.0
    if isinstance(model_sampling, ms.X0):
        return "x0", 1.0
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v", float(getattr(model_sampling, "sigma_data", 1.0))
    if isinstance(model_sampling, ms.EPS):
        return "eps", 1.0
    raise LoRA2Error(f"LoRA² cannot train models with {type(model_sampling).__name__} sampling yet")


def noise_rule(model) -> DenoisedRule:
    """Noise levels, forward process and loss weighting from the model's own ``model_sampling``."""
    sampling = base_model(model).model_sampling
    kind, sigma_data = parameterisation(sampling)

    def sample_sigma(u: torch.Tensor) -> torch.Tensor:
        # percent 0 is the start of sampling (σ_max); the discrete schedules return a huge sentinel there
        u = u.clamp(1e-3, 1.0 - 1e-3)
        return torch.tensor([float(sampling.percent_to_sigma(float(p))) for p in u], dtype=torch.float32)

    def noise_scaling(sigma: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return sampling.noise_scaling(sigma, noise, x0)

    return DenoisedRule(sample_sigma, noise_scaling, kind, sigma_data)


def make_denoiser(model) -> Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    """``(x, σ, conditioning) -> x0`` through ComfyUI's own ``extra_conds`` and ``apply_model``.

    Going through ``extra_conds`` is what makes one code path serve every family: SDXL's size-and-pool
    vector, Flux's guidance and pooled text, SD3's pooled output are all built by the model class.
    """
    base = base_model(model)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = dict(conditioning)
        if torch.is_tensor(kwargs.get("guidance")):  # Flux reads one guidance value for the batch
            kwargs["guidance"] = float(kwargs["guidance"].flatten()[0])
        height, width = x.shape[-2] * 8, x.shape[-1] * 8
        conds = base.extra_conds(noise=x, device=x.device, width=width, height=height, **kwargs)
        processed = {key: cond.process_cond(batch_size=x.shape[0], area=None).cond for key, cond in conds.items()}
        return base.apply_model(x, sigma, **processed)

    return denoise


def process_latents(model, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents to the model's latent space (ComfyUI's samplers do the same before sampling)."""
    return base_model(model).process_latent_in(latents)


def torch_device() -> torch.device:
    """The device ComfyUI computes on."""
    return comfy.model_management.get_torch_device()


def free_memory() -> None:
    """Give cached GPU memory back (ComfyUI's own call), e.g. after a measurement with extra models."""
    comfy.model_management.soft_empty_cache()
