"""A trained adapter, detached from any model: what flows between nodes as ``LORA2_ADAPTER``.

Every component is held in the standard LoRA form ``ΔW = up @ down`` (scale 1), with LoRA²'s
importance and alpha already folded in: ``up = B·diag(√(αp))``, ``down = diag(√(αp))·A``. Splitting the
scale evenly keeps both factors in the same range, which matters once they are stored in fp16. The
same object holds adapters trained here, pruned ones (SVD factors) and LoRAs read from other tools, so
every consumer (apply, heatmap, prune, save) handles one shape of data. What only a LoRA² run has,
ν per component, the config, the rank history and the state needed to resume, rides along optionally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import rank as rank_math
from . import sizes
from .attach import LoRA2Handle
from .config import LoRA2Config
from .errors import LoRA2Error
from .sizes import FP16_BYTES


def check_factor_shapes(up: torch.Tensor, down: torch.Tensor, where: str) -> None:
    """Refuse factors that are not a LoRA pair, with a message naming ``where`` (a file and key).

    What a pair is: ``up`` ``[out, r]`` or ``[out, r, 1, 1]``, ``down`` ``[r, in]`` or ``[r, in, kh, kw]``,
    floating point, every side at least 1. Checked here, once, because every consumer (apply, heatmap,
    prune, save) indexes these dimensions and would otherwise fail with an IndexError or a division by
    zero far from the file that caused it.
    """
    for role, tensor in (("up", up), ("down", down)):
        if not isinstance(tensor, torch.Tensor):
            raise LoRA2Error(f"{where}: the {role} factor is {type(tensor).__name__}, not a tensor")
        if tensor.dim() not in (2, 4):
            raise LoRA2Error(
                f"{where}: the {role} factor has shape {tuple(tensor.shape)}; LoRA factors are 2-D (linear) "
                "or 4-D (conv): the file is damaged or not a LoRA"
            )
        if not tensor.is_floating_point():
            raise LoRA2Error(f"{where}: the {role} factor is {tensor.dtype}; LoRA factors are floating point")
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoRA2Error(f"{where}: the up factor {tuple(up.shape)} of a conv LoRA must be [out, rank, 1, 1]")
    if up.shape[1] != down.shape[0]:
        raise LoRA2Error(f"{where}: LoRA factors do not chain: up {tuple(up.shape)}, down {tuple(down.shape)}")
    if down.shape[0] == 0:
        raise LoRA2Error(f"{where}: the factors have rank 0 (up {tuple(up.shape)}); remove this component")
    if 0 in up.shape or 0 in down.shape:
        raise LoRA2Error(f"{where}: the factors up {tuple(up.shape)}, down {tuple(down.shape)} are empty")


@dataclass
class Component:
    """One adapted weight: ``ΔW = up @ down`` reshaped to the weight's shape."""

    up: torch.Tensor
    """``[out, r]`` (linear) or ``[out, r, 1, 1]`` (conv)."""
    down: torch.Tensor
    """``[r, in]`` (linear) or ``[r, in, kh, kw]`` (conv)."""
    nu: float | None = None
    """LoRA²'s rank parameter, when the component came from LoRA² training."""

    def __post_init__(self) -> None:
        check_factor_shapes(self.up, self.down, "this component")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], *self.down.shape[1:])

    @property
    def num_parameters(self) -> int:
        return self.up.numel() + self.down.numel()

    def delta(self) -> torch.Tensor:
        """ΔW in float32, in the adapted weight's shape."""
        return (self.up.float().flatten(1) @ self.down.float().flatten(1)).view(self.weight_shape)


@dataclass
class ResumeState:
    """Everything besides the weights that continuing a run exactly needs."""

    handle_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    generator_state: torch.Tensor
    train_config: dict[str, Any]


@dataclass
class Adapter:
    """A set of adapted components plus what is known about how they were made."""

    components: dict[str, Component]
    base_model: str = "unknown"
    """Model family the adapter was trained on (ComfyUI's name, e.g. ``SD15``, ``SDXL``, ``Flux``)."""
    steps: int = 0
    config: LoRA2Config | None = None
    history: dict[str, Any] | None = None
    resume: ResumeState | None = None
    source: str = "lora2"
    """``lora2`` (trained here), ``pruned``, or the format a file was read from."""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_handle(
        cls,
        handle: LoRA2Handle,
        base_model: str = "unknown",
        history: dict[str, Any] | None = None,
        resume: ResumeState | None = None,
    ) -> Adapter:
        """Fold every component's importance and alpha into standard LoRA factors (copies, float32)."""
        components = {}
        for name, c in handle.components.items():
            with torch.no_grad():
                p = c.importance().detach().float() * c.alpha
                root = p.sqrt()
                down = c.down[: c.width].detach().float() * root.view(-1, *([1] * (c.down.dim() - 1)))
                up = c.up[:, : c.width].detach().float() * root.view(1, -1, *([1] * (c.up.dim() - 2)))
            nu = float(c.nu.detach()) if c.adaptive else None
            components[name] = Component(up=up.clone(), down=down.clone(), nu=nu)
        return cls(
            components=components,
            base_model=base_model,
            steps=handle.step_count,
            config=handle.config,
            history=history,
            resume=resume,
        )

    def ranks(self) -> dict[str, int]:
        return {name: c.rank for name, c in self.components.items()}

    def num_parameters(self) -> int:
        return sum(c.num_parameters for c in self.components.values())

    def megabytes(self, bytes_per_number: int = FP16_BYTES) -> float:
        return sizes.megabytes(self.num_parameters(), bytes_per_number)

    def delta(self, name: str) -> torch.Tensor:
        if name not in self.components:
            raise LoRA2Error(f"adapter has no component {name!r}")
        return self.components[name].delta()

    def rates(self) -> dict[str, float]:
        """λ per component, for LoRA²-trained components."""
        return {
            name: float(rank_math.rate(torch.tensor(c.nu))) for name, c in self.components.items() if c.nu is not None
        }
