"""Attach LoRA² components to any torch model and drive them: ``attach(model, config) -> LoRA2Handle``.

The model itself is never modified: each target layer gets a forward hook that adds its component's
``ΔW·x`` to the layer's output, and the components live in the handle. That keeps module names and
the model's ``state_dict`` intact (ComfyUI patches weights by name), lets the same code serve every
``nn.Linear``/``nn.Conv2d`` subclass (``comfy.ops`` layers included), and makes :meth:`LoRA2Handle.detach`
exact: removing the hooks restores the original model bit for bit.

A training step with the handle::

    handle = attach(model, LoRA2Config(targets="attn", init_rank=4, max_rank=64))
    optimizer = torch.optim.AdamW(handle.param_groups(lr=1e-4, nu_lr=1e-2), weight_decay=0.0)
    loss = data_loss(model(batch)) + handle.regularizer()
    loss.backward(); optimizer.step(); optimizer.zero_grad()
    handle.step(optimizer)        # widths follow ν; optimizer state follows the widths
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import rank as rank_math
from .config import LoRA2Config
from .errors import LoRA2Error
from .growth import fold_pending
from .layers import AdaptiveLoRA, WidthChange
from .optimizer_state import replace_parameter, zero_positions
from .rank_control import EvidenceControl
from .rank_decision import start_nu, target_widths
from .targets import select_targets

STEP_KEY = "__step__"
SKETCH = "evidence"
"""Infix of the evidence rule's state keys in :meth:`LoRA2Handle.state_dict`."""


def _component_generator(seed: int, name: str) -> torch.Generator:
    """A generator per component, seeded from (seed, name): adding a target never reshuffles the others."""
    generator = torch.Generator()
    generator.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return generator


class LoRA2Handle:
    """The adapters attached to one model, and everything a training loop needs from them."""

    def __init__(self, model: nn.Module, config: LoRA2Config) -> None:
        self.model = model
        self.config = config
        self.step_count = 0
        self.enabled = True
        self.ranks_frozen = False
        self._components: dict[str, AdaptiveLoRA] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._controls: dict[str, EvidenceControl] = {}
        self._attach()
        self._schedule_observations()

    # ----------------------------------------------------------------- construction
    def _initial_nu(self) -> float:
        return start_nu(self.config)

    def _attach(self) -> None:
        cfg = self.config
        nu = self._initial_nu()
        for name, layer in select_targets(self.model, cfg.targets, cfg.exclude, cfg.module_types):
            weight = layer.weight
            generator = _component_generator(cfg.seed, name)
            component = AdaptiveLoRA(
                layer,
                width=cfg.init_rank,
                nu=nu,
                alpha=cfg.alpha,
                adaptive=cfg.adaptive,
                compensate=cfg.compensate_importance,
                dtype=cfg.torch_dtype,
                device=weight.device if weight.device.type != "meta" else torch.device("cpu"),
                generator=generator,
            )
            if cfg.evidence_driven:
                component.nu.requires_grad_(False)  # ν follows the width (rank_control.py)
                self._controls[name] = EvidenceControl(component, layer, cfg, generator)
            self._components[name] = component
            self._hooks.append(layer.register_forward_hook(self._make_hook(component), with_kwargs=True))

    def _make_hook(self, component: AdaptiveLoRA):
        def add_update(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
            if not self.enabled:
                return output
            x = args[0] if args else kwargs["input"]
            return output + component(x).to(output.dtype)

        return add_update

    # ----------------------------------------------------------------- the training loop's view
    @property
    def components(self) -> dict[str, AdaptiveLoRA]:
        """``{dotted layer name: component}`` in model order."""
        self._check_attached()
        return dict(self._components)

    def factor_parameters(self) -> Iterator[nn.Parameter]:
        for component in self.components.values():
            yield component.down
            yield component.up

    def nu_parameters(self) -> Iterator[nn.Parameter]:
        for component in self.components.values():
            if component.nu.requires_grad:
                yield component.nu

    def parameters(self) -> Iterator[nn.Parameter]:
        """Every trainable tensor: the factors, then the ν's (none when not adaptive)."""
        yield from self.factor_parameters()
        yield from self.nu_parameters()

    def param_groups(self, lr: float, nu_lr: float | None = None) -> list[dict]:
        """Optimizer param groups: the factors at ``lr``, the ν's at ``nu_lr`` (default ``10·lr``)."""
        groups = [{"params": list(self.factor_parameters()), "lr": lr, "name": "lora2_factors"}]
        nus = list(self.nu_parameters())
        if nus:
            groups.append({"params": nus, "lr": 10.0 * lr if nu_lr is None else nu_lr, "name": "lora2_nu"})
        return groups

    def freeze_ranks(self) -> None:
        """Stop rank adaptation: ν stops learning and :meth:`step` no longer resizes anything.

        For a final phase that polishes the factors at the ranks found (AdaLoRA's ``tfinal`` idea):
        the priors that drove the ranks also shrink the factors a little, and without rank changes
        the caller may drop :meth:`regularizer` and let the factors fit the data exactly.
        """
        for component in self.components.values():
            component.nu.requires_grad_(False)
        self.ranks_frozen = True

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Remember the optimizer whose state :meth:`step` must keep consistent."""
        self._optimizer = optimizer

    def rates(self) -> torch.Tensor:
        """λ of every component, as one tensor (differentiable)."""
        return torch.stack([c.rate() for c in self.components.values()])

    def regularizer(self) -> torch.Tensor:
        """``prior_strength · [Σ_ℓ (λ_ℓ−μ_λ)²/(2σ_λ²) + Σ_θ θ²/(2σ_θ²)]`` over the active positions.

        Add it to the data loss. Plain LoRA (``adaptive=False``) gets the weight prior only, so both
        methods are regularised identically where they can be.
        """
        cfg = self.config
        components = list(self.components.values())
        factors = [t for c in components for t in (c.down[: c.width], c.up[:, : c.width])]
        total = rank_math.weight_prior(factors, cfg.weight_prior_std).to(components[0].nu.device)
        if cfg.adaptive and cfg.rank_control == "gradient" and not self.ranks_frozen:
            total = total + rank_math.rank_prior(self.rates(), cfg.prior_mean, cfg.prior_std)
        return cfg.prior_strength * total

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, WidthChange]:
        """The grow/shrink hook: call once after every ``optimizer.step()``.

        Every component's width follows its ν at once (within its storage); every
        ``resize_every``-th call also reallocates storage to the width. The optimizer's state
        (``optimizer`` or the one given to :meth:`bind`) is resized to match. Returns the changes.
        """
        optimizer = optimizer if optimizer is not None else self._optimizer
        cfg = self.config
        self.step_count += 1
        if not cfg.adaptive or self.ranks_frozen:
            return {}
        if cfg.evidence_driven:
            return self._evidence_step(optimizer)
        reallocate = self.step_count % cfg.resize_every == 0
        components = self.components
        widths = target_widths(self.rates().float().cpu().tolist(), cfg)  # one device sync for all components
        changes: dict[str, WidthChange] = {}
        for (name, component), target in zip(components.items(), widths, strict=True):
            if not reallocate:
                target = min(target, component.capacity)
            if target == component.width and not (reallocate and component.capacity != target):
                continue
            change = component.set_width(target, reallocate)
            follow_width_change(optimizer, component, change)
            changes[name] = change
        return changes

    def _evidence_step(self, optimizer: torch.optim.Optimizer | None) -> dict[str, WidthChange]:
        """Every ``decide_every`` steps, let each component's evidence grow or shrink it."""
        changes: dict[str, WidthChange] = {}
        fold_pending(c.sketch for c in self.components.values() if c.sketch is not None)  # batched, per shape
        if self.step_count % self.config.decide_every == 0:
            for name, control in self._controls.items():
                change = control.decide(self.step_count)
                if change is None:
                    continue
                follow_width_change(optimizer, control.component, change)
                changes[name] = change
        self._schedule_observations()
        return changes

    def _schedule_observations(self) -> None:
        """Let the next step's gradient feed every sketch a decision can read.

        A component at ``max_rank`` cannot grow, and the sketch is read only to grow (``_grow``), so it
        is not fed until a shrink makes room (its statistics restart then anyway): the sketch's work
        was 10-30 % of a step (bench/NOTES.md).
        """
        for control in self._controls.values():
            component = control.component
            observing = component.width < self.config.max_rank
            component.observe_token = self.step_count if observing else None
            if not observing and component.sketch is not None:
                component.sketch.release_spans()  # the size of the factors, unread until room returns

    def discard_non_finite_evidence(self) -> None:
        """Reset every gradient sketch that took in NaN/inf (called when a step blew up, before a checkpoint)."""
        for control in self._controls.values():
            sketch = control.sketch
            if sketch is None:
                continue
            sketch.flush()  # a pending observation is this step's, the one that blew up
            if not all(bool(torch.isfinite(t).all()) for t in (sketch.a, sketch.b, sketch.s_sum)):
                control.reset_sketch()

    # ----------------------------------------------------------------- inspection
    def ranks(self) -> dict[str, int]:
        """``{component: current width}``."""
        return {name: c.width for name, c in self.components.items()}

    def num_parameters(self) -> int:
        """Trainable numbers in the active positions (ν's excluded): the size of the saved adapter."""
        return sum(c.num_parameters() for c in self.components.values())

    def delta(self, name: str) -> torch.Tensor:
        """ΔW of one component, in its base weight's shape (float32)."""
        components = self.components
        if name not in components:
            raise LoRA2Error(f"no LoRA² component named {name!r}; known: {list(components)[:5]} ...")
        return components[name].delta_weight()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model without the adapters inside this block (for before/after comparisons)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def to(self, device: torch.device | str | None = None) -> LoRA2Handle:
        """Move every component (factors, ν) to ``device``; optimizer state must be created after."""
        for component in self.components.values():
            component.to(device)
        return self

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue exactly: factors (whole storage), ν, widths, step count."""
        state: dict[str, torch.Tensor] = {STEP_KEY: torch.tensor(self.step_count, dtype=torch.int64)}
        for name, component in self.components.items():
            state[f"{name}.down"] = component.down.detach().clone()
            state[f"{name}.up"] = component.up.detach().clone()
            state[f"{name}.nu"] = component.nu.detach().clone()
            state[f"{name}.width"] = torch.tensor(component.width, dtype=torch.int64)
        for name, control in self._controls.items():
            state.update({f"{name}.{SKETCH}.{k}": v for k, v in control.state_dict().items()})
        return state

    def metadata(self) -> dict[str, str]:
        """String metadata to store beside :meth:`state_dict` (safetensors headers hold strings only)."""
        return {"lora2_config": self.config.to_json(), "lora2_components": json.dumps(list(self.components))}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`state_dict` exactly, resizing storage to the saved shapes.

        Create the optimizer *after* loading (or load its state afterwards): shapes may change here.
        """
        components = self.components
        expected = {STEP_KEY} | {f"{n}.{k}" for n in components for k in ("down", "up", "nu", "width")}
        sketch_keys = {k for k in state if f".{SKETCH}." in k}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected - sketch_keys)
        if missing or unexpected:
            raise LoRA2Error(
                f"LoRA² state does not fit this model/config: missing {missing[:4]}, unexpected {unexpected[:4]}. "
                "Use the same targets and model it was trained with."
            )
        for name, component in components.items():
            down, up = state[f"{name}.down"], state[f"{name}.up"]
            if down.shape[1:] != component.down.shape[1:] or up.shape[0] != component.up.shape[0]:
                raise LoRA2Error(
                    f"LoRA² state for {name!r} has factors {tuple(down.shape)}/{tuple(up.shape)}, "
                    f"which do not fit the layer ({tuple(component.down.shape[1:])} inputs)"
                )
            component.load_factors(down, up)
            component.nu.data = state[f"{name}.nu"].to(component.nu.device, torch.float32).clone()
            component.width = int(state[f"{name}.width"])
        for name, control in self._controls.items():
            prefix = f"{name}.{SKETCH}."
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            control.load_state_dict(own)  # an older file without evidence state: the evidence restarts
        self.step_count = int(state[STEP_KEY])
        self._schedule_observations()  # the next step is observed as it was

    # ----------------------------------------------------------------- teardown
    def detach(self) -> None:
        """Remove every hook: the model computes exactly what it computed before :func:`attach`."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._components.clear()
        self._detached = True

    def _check_attached(self) -> None:
        if getattr(self, "_detached", False):
            raise LoRA2Error("this LoRA² handle was detached; attach again to train or inspect")


def follow_width_change(optimizer: torch.optim.Optimizer | None, component: AdaptiveLoRA, change: WidthChange) -> None:
    """Bring ``optimizer``'s state in line with what :class:`WidthChange` says happened to ``component``."""
    if change.silenced is not None:
        start, stop = change.silenced
        zero_positions(optimizer, component.up, start, stop, dim=1)
        zero_positions(optimizer, component.down, start, stop, dim=0)
    for old, new, dim in change.replaced:
        replace_parameter(optimizer, old, new, change.kept_index, dim)


def attach(model: nn.Module, config: LoRA2Config | None = None, **overrides) -> LoRA2Handle:
    """Attach LoRA² (or, with ``adaptive=False``, plain LoRA) components to ``model``'s target layers.

    ``overrides`` are :class:`LoRA2Config` fields, for ``attach(model, targets="all-linear")``.
    """
    if config is None:
        config = LoRA2Config(**overrides)
    elif overrides:
        config = LoRA2Config.from_dict({**config.to_dict(), **overrides})
    return LoRA2Handle(model, config)
