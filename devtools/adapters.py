"""Random LoRA² adapters on a model's attention projections, for tests that need a file worth inspecting."""

from __future__ import annotations

import torch

from ..lora2 import LoRA2Handle, attach, select_targets
from ..lora2.adapter import Adapter, Component


def random_adapter(diffusion_model: torch.nn.Module, family: str, seed: int = 0) -> Adapter:
    """An adapter on every attention projection with ranks 1..5 and factors large enough to matter.

    Ranks cycle through 1..5 so per-layer widths differ (heatmaps, pruning and key mapping see a spread),
    and factors are ~0.2 so the change to a sampler's output is far above float noise.
    """
    generator = torch.Generator().manual_seed(seed)
    components = {}
    for index, (name, layer) in enumerate(select_targets(diffusion_model, "attn")):
        rank = 1 + index % 5
        out_features, in_features = layer.weight.shape
        up = torch.randn(out_features, rank, generator=generator) * 0.2
        down = torch.randn(rank, in_features, generator=generator) * 0.2
        components[name] = Component(up=up, down=down)
    return Adapter(components=components, base_model=family, steps=1)


def attach_nonzero(model: torch.nn.Module, **config) -> LoRA2Handle:
    """``attach(model, **config)`` with every ``up`` factor drawn from N(0, 1) (global RNG): ``attach``
    starts ``up`` at zero, so ΔW and the gradient reaching ``down`` are zero until this."""
    handle = attach(model, **config)
    with torch.no_grad():
        for component in handle.components.values():
            component.up.normal_()
    return handle
