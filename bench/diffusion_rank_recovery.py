"""Diffusion rank recovery: does LoRA² find the planted rank of every attention projection?

The known-answer benchmark on real diffusion architectures (``bench/tiny_diffusion.py``: SD1.5-, SDXL-
and Flux-shaped diffusers models, seeded). A *teacher* is the base model plus a planted low-rank update
``ΔW`` on each projection LoRA² adapts with its default ``targets="attn"`` preset; the ranks differ by
block and by projection. A *student* is the same base with LoRA² attached, trained through the
ordinary :class:`lora2.train.Trainer` to reproduce the teacher; fixed-rank LoRA (r=64, and ``--fixed``
ranks) is trained the same way as the baseline.

Base weights (``--base``): ``random`` is the seeded initialisation; ``pretrained`` is that model after a
short full fine-tune on images (``bench/image_data.py``: the shared DreamBooth photos when present,
else synthetic ones; cached on disk), whose attention has learned some structure.

Planted ranks are drawn from {0, 1, 2, 4, 8, 16, 32}, at most half the smaller side of the weight (so
every update really is low-rank), seeded by ``--seed``, redrawn until several components get ≥ 8 and
several ≤ 1; or given with ``--planted name=rank,...`` (unlisted: 0). Each update is ``U diag(s) Vᵀ``
with singular values ``s ~ U(0.5, 1)·strength·‖W‖₂`` (``--strength``, default 0.3): sized by the layer's
own spectral norm so that every planted direction changes its layer's output by a similar fraction
whatever the layer's width or init scale (an absolute scale would be invisible behind a large-norm layer
and dominate a small one).

Where the directions lie (``--plant``): ``visible`` (default) draws ``V`` inside the leading input
directions of the layer (eigenvectors of ``E[hhᵀ]`` on noised data) and ``U`` inside the leading output
directions the rest of the network responds to (eigenvectors of ``E[JᵀJ]``, probed by one backward pass
from a random output direction); ``random`` draws them anywhere. Why: a direction the data never
excites, or whose output the network ignores, cannot be recovered by any student from any data, so the
planted rank would stop being the answer. Measured (sd15, seed 0, 600 steps): with ``random`` fixed
r=64 closes 35-54 % of the teacher-base gap; with ``visible`` 62-66 %.

Identifiability, measured, and what the defaults do about it:

* End to end (``--supervision output``) fixed r=64 reaches its output fit *without* reproducing any
  layer's planted ΔW (per-component ``fit r64`` 0.8-1.0): q/k and v/out of one attention, and later
  layers, absorb each other's updates. So the default supervision is per layer (``layers``, see
  ``DEFAULT_SUPERVISION``): every adapted layer is matched to the teacher's on the teacher's own inputs.
* Input spectra are steep: a self-attention ``to_out`` sees 2-3 directions above 5 % of its strongest
  input eigenvalue out of 32-64. A plant wider than the layer's visible input rank (``VISIBLE_FLOOR``,
  ``--visible-floor``) is cut to it before the teacher is built, logged, and reported as ``planted_cut``
  (``{name: asked}``) beside the cut ``planted`` ranks the scores use.

Training data (``--data``):

* ``targets`` (default): distillation on the teacher's own outputs. x0 comes from the image pool,
  ``x_t`` from the model's own rule (DDPM ε on the scaled-linear schedule for the UNets, rectified flow
  for Flux). The Trainer gets a denoiser returning ``student(x_t, t, c) − teacher(x_t, t, c)`` (the
  teacher under ``no_grad``) and a rule whose target is zero, so its ordinary MSE *is*
  ``‖student − teacher‖²`` and nothing in the training loop is special-cased.
* ``samples``: x0 are images the teacher generates from seeded noise (a deterministic 10-step DDIM /
  Euler sampler, conditioned on the pool's captions), then the ordinary ε / flow loss on them: what a
  user's training images would be if the "subject" were exactly the planted update.

Every method uses the dataclass defaults of ``LoRA2Config()`` and ``TrainConfig()``; the benchmark sets
only ``steps``, ``seed``, ``targets`` and the dtypes (float32). ``--set lora2.FIELD=V`` changes a field
of LoRA²'s config (the fixed-rank baselines keep the defaults, so the reference does not move under an
ablation); ``--set train.FIELD=V`` changes the training of every method.

Scores (the last line is one JSON object): Spearman between planted and learned widths over every
component; ``growth_ratio_min``, the smallest learned/planted over components planted ≥ 8 (they start
at ``init_rank``, so < 1 means growth fell short); ``zero_rank_max``, the widest component planted ≤ 1;
``fit_vs_r64``, LoRA²'s output error ``Σ‖student − teacher‖² / Σ‖teacher − base‖²`` on a fixed held-out
batch of noised inputs divided by fixed r=64's after the same steps; ``params_vs_r64``, LoRA²'s adapter
size over r=64's. The per-component ``fit`` (LoRA²'s, and r=64's beside it) is
``‖(ΔW_s − ΔW_t) h‖² / ‖ΔW_t h‖²`` on the inputs ``h`` the layer sees in the teacher on that batch
(``/ ‖W h‖²`` where nothing was planted).

Run: ``python -m comfyui_lora2.bench.diffusion_rank_recovery --model sd15`` (default 600 steps; about
3 minutes on one CPU thread for sd15 with LoRA² and r=64, plus ~1 minute the first time a pretrained
base is built).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..lora2 import LoRA2Handle
from ..lora2.errors import LoRA2Error
from ..lora2.noise import DDPMRule, Prepared
from ..lora2.targets import select_targets
from .image_data import ImageSet, base_model, caption_embeddings, load_images, make_batch
from .methods import Method, Trained
from .methods import train_method as train_adapter
from .rank_recovery import spearman
from .settings import (
    Overrides,
    add_set_argument,
    lora2_config,
    method_progress,
    parse_settings,
    parse_training_bench_args,
)
from .tiny_diffusion import MODELS, Family, family

DEFAULT_STEPS = 600
PLANT_RANKS = (0, 1, 2, 4, 8, 16, 32)
MIN_EACH_END = 3
"""A seeded draw is redrawn until at least this many components are planted ≥ 8 and ≤ 1."""
EVAL_SIZE = 16
SAMPLE_COUNT = 32
SAMPLE_STEPS = 10
BASELINE_RANK = 64
DEFAULT_STRENGTH = 0.3
PLANTS = ("visible", "whitened", "random")
SUPERVISIONS = ("layers", "output")
DEFAULT_SUPERVISION = "layers"
"""Per-layer distillation by default. Why, measured (sd15, 600 steps): end to end (``output``) even fixed
r=64 reaches its output fit without reproducing any layer's planted ΔW (per-component fit 0.8-1.0): q/k
and v/out of one attention absorb each other's updates, so the planted rank is not the answer there and
Spearman stays near 0 for every method. Supervising each adapted layer on the teacher's own inputs makes
each component's answer its own (the same reasoning as ``rank_recovery``'s per-block default)."""
PROBE_SIZE = 16
"""Noised images in the probe that finds each layer's visible directions."""


# ----------------------------------------------------------------- the planted teacher
def target_layers(model: nn.Module, targets: str = "attn") -> dict[str, nn.Module]:
    """``{name: layer}`` of the components LoRA² would attach to with ``targets``."""
    return dict(select_targets(model, targets))


def rank_cap(layer: nn.Module) -> int:
    """The largest rank planted in ``layer``: half its smaller side, so the update stays low-rank."""
    out_features, in_features = layer.weight.shape[0], layer.weight[0].numel()
    return min(out_features, in_features) // 2


def draw_planted(layers: dict[str, nn.Module], seed: int) -> dict[str, int]:
    """A seeded rank per component from ``PLANT_RANKS`` (capped per layer) with both ends represented."""
    generator = torch.Generator().manual_seed(seed + 101)
    need = min(MIN_EACH_END, max(1, len(layers) // 4))
    for _ in range(1000):
        planted = {}
        for name, layer in layers.items():
            allowed = [r for r in PLANT_RANKS if r <= rank_cap(layer)]
            planted[name] = allowed[int(torch.randint(len(allowed), (1,), generator=generator))]
        high = sum(r >= 8 for r in planted.values())
        low = sum(r <= 1 for r in planted.values())
        if high >= need and low >= need:
            return planted
    raise LoRA2Error(f"could not draw planted ranks with {need} components ≥ 8 and ≤ 1; use --planted")


def parse_planted(text: str, layers: dict[str, nn.Module]) -> dict[str, int]:
    """``"name=rank,name=rank"`` → ranks for every component (unlisted: 0); errors name ``--planted``."""
    planted = dict.fromkeys(layers, 0)
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.rpartition("=")
        if not sep or name not in layers:
            known = ", ".join(list(layers)[:4])
            raise LoRA2Error(f"--planted {item!r}: expected NAME=RANK with a target component name (e.g. {known})")
        try:
            rank = int(value)
        except ValueError:
            raise LoRA2Error(f"--planted {item!r}: the rank must be an integer") from None
        limit = min(layers[name].weight.shape[0], layers[name].weight[0].numel())
        if not 0 <= rank <= limit:
            raise LoRA2Error(f"--planted {item!r}: the rank must be between 0 and {limit} for this layer")
        planted[name] = rank
    return planted


VISIBLE_FLOOR = 0.05
"""An input direction is *visible* when ``E[hhᵀ]`` along it is at least this fraction of the strongest.

Why: planted singular values are equal in weight space, so a planted direction's share of its layer's loss
is proportional to the input variance along it; below this floor it moves the layer's output by under 5 %
of what the strongest direction does, and within the benchmark's budget neither LoRA² nor fixed r=64 fits
it (measured, sd15 seed 0 at floor 1e-2: a ``mid attn2.to_out`` planted 16 over 16 directions ≥ 1 % learned
9, fit 0.53, r=64's fit 0.81). The spectra are steep: self-attention ``to_out`` layers see 2-3 directions
above 5 % (3-7 above 1 %) out of 32-64, cross-attention ``to_out`` 11-14, q/k/v 17-29 of 64. The whitened
plant (:func:`whitened_delta`) uses the same floor as its ridge. ``--visible-floor`` changes it."""


@dataclass
class Visible:
    """The directions of one layer the data can see: eigenvectors of its input and output-sensitivity covariances.

    ``inputs [in, in]``: eigenvectors of ``E[h hᵀ]`` over the layer's input rows, strongest first;
    ``outputs [out, out]``: eigenvectors of ``E[δ δᵀ]`` for ``δ = Jᵀξ``, the gradient reaching the layer's
    output from a random probe ``ξ`` on the model's output, i.e. of ``E[JᵀJ]``: the output directions that
    change what the model predicts. ``input_scale`` and ``output_scale`` are the matching eigenvalues
    (per row), strongest first.
    """

    inputs: torch.Tensor
    outputs: torch.Tensor
    input_scale: torch.Tensor | None = None
    output_scale: torch.Tensor | None = None
    floor: float = VISIBLE_FLOOR
    """Eigenvalues below ``floor`` × the strongest count as unseen (``--visible-floor``)."""

    def input_rank(self, floor: float | None = None) -> int:
        """How many input directions the data excites: eigenvalues of ``E[hhᵀ]`` ≥ ``floor`` × the strongest.

        Without measured eigenvalues every direction counts (the caller gave directions, not a spectrum)."""
        if self.input_scale is None:
            return self.inputs.shape[1]
        floor = self.floor if floor is None else floor
        return int((self.input_scale >= floor * float(self.input_scale[0])).sum())


def cap_to_visible(planted: dict[str, int], visible: dict[str, Visible]) -> tuple[dict[str, int], dict[str, int]]:
    """``planted`` with each rank cut to its layer's visible input rank, and ``{name: asked}`` for those cut.

    Why: a rank-r update needs r independent input directions that the data excites; with fewer, part of it
    is unidentifiable from any training data and the planted rank overstates the answer (measured: a
    ``mid attn2.to_out`` planted 32 with 24 visible directions learned 16, r=64 fitted it no better)."""
    capped, cut = {}, {}
    for name, rank in planted.items():
        limit = visible[name].input_rank() if name in visible else rank
        capped[name] = min(rank, limit)
        if capped[name] < rank:
            cut[name] = rank
    return capped, cut


def visible_directions(
    fam: Family,
    base: nn.Module,
    data: ImageSet,
    names: list[str],
    seed: int,
    count: int = PROBE_SIZE,
    floor: float = VISIBLE_FLOOR,
) -> dict[str, Visible]:
    """:class:`Visible` per named layer, from one probed forward/backward of the base on noised data.

    Why: a planted direction that the layer's inputs never excite (``Vᵀh ≈ 0``), or whose output the rest
    of the network ignores (``J u ≈ 0``), changes nothing any training data can show; no student can
    recover it and the planted rank stops being the answer. Planting inside these subspaces keeps the
    known answer identifiable.
    """
    generator = torch.Generator().manual_seed(seed + 505)
    batch, inputs, timesteps = noised_batch(fam, data, count, generator, seed)
    inputs.requires_grad_(True)
    modules = dict(base.named_modules())
    rows: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            rows[name] = args[0].detach().flatten(0, -2).float()
            output.register_hook(lambda grad: grads.__setitem__(name, grad.detach().flatten(0, -2).float()))

        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        with torch.enable_grad():
            # text-side layers (cross-attention k, v) see only the conditioning: it needs a gradient too
            conditioning = {
                k: v.clone().requires_grad_(True) if v.is_floating_point() else v for k, v in batch.conditioning.items()
            }
            output = fam.denoiser(base)(inputs, timesteps, conditioning)
            probe = torch.randn(output.shape, generator=generator)
            (output * probe).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    seen = {}
    for name in names:
        input_scale, inputs = _eigen(rows[name])
        output_scale, outputs = _eigen(grads[name])
        seen[name] = Visible(inputs, outputs, input_scale, output_scale, floor)
    return seen


def _eigen(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (per row, ≥ 0) and eigenvectors (columns) of ``rowsᵀ rows``, strongest first."""
    values, vectors = torch.linalg.eigh(rows.T @ rows / rows.shape[0])
    return values.flip(-1).clamp_min(0.0), vectors.flip(-1)


def planted_delta(
    weight: torch.Tensor,
    rank: int,
    generator: torch.Generator,
    strength: float = DEFAULT_STRENGTH,
    visible: Visible | None = None,
    whiten: bool = False,
) -> torch.Tensor:
    """``U diag(s) Vᵀ`` of exactly ``rank``, ``s ~ U(0.5, 1)·strength·‖W‖₂`` (why: see the module docstring).

    With ``visible``, ``U`` and ``V`` are random orthonormal bases of the leading ``2·rank`` (at most the
    whole side) visible output and input directions, so every planted direction can be seen in the data.
    With ``whiten`` as well, the update is planted in the loss's own metric (:func:`whitened_delta`).
    """
    out_features, in_features = weight.shape[0], weight[0].numel()
    if rank == 0:
        return torch.zeros(out_features, in_features)
    matrix = weight.detach().float().reshape(out_features, in_features)
    if whiten and visible is not None:
        return whitened_delta(matrix, rank, generator, strength, visible)
    norm = torch.linalg.matrix_norm(matrix, ord=2)
    u = _basis_within(visible.outputs if visible else None, out_features, rank, generator)
    v = _basis_within(
        visible.inputs if visible else None, in_features, rank, generator, _input_width(visible, in_features, rank)
    )
    s = (0.5 + 0.5 * torch.rand(rank, generator=generator)) * norm * strength
    return (u * s) @ v.T


def whitened_delta(
    matrix: torch.Tensor, rank: int, generator: torch.Generator, strength: float, visible: Visible
) -> torch.Tensor:
    """A rank-``rank`` ΔW whose every direction moves the loss by a similar amount, to first order.

    Why: the loss sees a layer's update through the Gauss-Newton metric ``‖J ΔW h‖² ≈ tr(ΔWᵀ C_out ΔW C_in)``
    (``C_in = E[hhᵀ]``, ``C_out = E[JᵀJ]``). An update planted with equal singular values in weight space is
    far from equal there: its directions along weak eigenvectors barely change the output, so a student fits
    the output with a few of them and the planted rank overstates what the data asks for (measured: LoRA²
    closed 89 % of the gap with widths 2-9 on components planted up to 32). Here the singular values are equal
    in the metric: ``M = C_out^½ ΔW C_in^½ = U diag(s) Vᵀ`` with ``U``, ``V`` random orthonormal inside the
    leading ``2·rank`` eigenvectors and ``s ~ U(0.5, 1)·strength·‖C_out^½ W C_in^½‖₂`` (the layer's own
    effect), so dropping any one planted direction costs the loss about ``1/rank`` of the component's share.
    """
    assert visible.input_scale is not None and visible.output_scale is not None
    out_features, in_features = matrix.shape
    width_out, width_in = min(out_features, 2 * rank), _input_width(visible, in_features, rank)
    p_out, l_out = visible.outputs[:, :width_out], visible.output_scale[:width_out]
    p_in, l_in = visible.inputs[:, :width_in], visible.input_scale[:width_in]
    root_out = l_out.clamp_min(visible.floor * float(l_out[0])).sqrt()
    root_in = l_in.clamp_min(visible.floor * float(l_in[0])).sqrt()
    # the layer's own effect in the metric: ‖C_out^½ W C_in^½‖₂
    effect = (visible.outputs * visible.output_scale.sqrt()).T @ matrix @ (visible.inputs * visible.input_scale.sqrt())
    scale = torch.linalg.matrix_norm(effect, ord=2)
    q_out, _ = torch.linalg.qr(torch.randn(width_out, rank, generator=generator))
    q_in, _ = torch.linalg.qr(torch.randn(width_in, rank, generator=generator))
    s = (0.5 + 0.5 * torch.rand(rank, generator=generator)) * scale * strength
    left = p_out @ (q_out / root_out[:, None])
    right = p_in @ (q_in / root_in[:, None])
    return (left * s) @ right.T


def _input_width(visible: Visible | None, side: int, rank: int) -> int:
    """How many leading input directions a rank-``rank`` plant draws from: ``2·rank``, within the visible ones.

    Never below ``rank`` (a plant wider than the visible rank is cut before, by :func:`cap_to_visible`)."""
    if visible is None:
        return min(side, 2 * rank)
    return min(side, max(rank, min(2 * rank, visible.input_rank())))


def _basis_within(
    directions: torch.Tensor | None, side: int, rank: int, generator: torch.Generator, width: int | None = None
) -> torch.Tensor:
    """``rank`` random orthonormal columns inside the span of the leading ``width`` (default ``2·rank``)
    ``directions``, or anywhere without them."""
    if directions is None:
        q, _ = torch.linalg.qr(torch.randn(side, rank, generator=generator))
        return q
    span = directions[:, : min(side, width if width is not None else 2 * rank)]
    q, _ = torch.linalg.qr(span @ torch.randn(span.shape[1], rank, generator=generator))
    return q


def make_teacher(
    base: nn.Module,
    planted: dict[str, int],
    seed: int,
    strength: float = DEFAULT_STRENGTH,
    visible: dict[str, Visible] | None = None,
    whiten: bool = False,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``base`` with ``planted[name]``-rank updates added to those layers' weights."""
    teacher = copy.deepcopy(base)
    layers = dict(teacher.named_modules())
    generator = torch.Generator().manual_seed(seed + 202)
    deltas = {}
    with torch.no_grad():
        for name, rank in planted.items():
            weight = layers[name].weight
            seen = visible.get(name) if visible else None
            deltas[name] = planted_delta(weight, rank, generator, strength, seen, whiten)
            weight.add_(deltas[name].view_as(weight).to(weight.dtype))
    return teacher, deltas


# ----------------------------------------------------------------- training through the ordinary Trainer
class ZeroTarget:
    """Wraps a noise rule: same noisy inputs and timesteps, target zero (the denoiser returns a residual).

    ``flat``: the residual is ``[batch, features]`` rather than shaped like the image, so the target is a
    ``[batch, 1]`` zero that broadcasts against it."""

    def __init__(self, rule: Any, flat: bool = False) -> None:
        self.rule = rule
        self.flat = flat

    def prepare(self, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator) -> Prepared:
        prepared = self.rule.prepare(x0, noise, generator)
        if self.flat:
            prepared.target = prepared.target.new_zeros(prepared.target.shape[0], 1)
        else:
            prepared.target = torch.zeros_like(prepared.target)
        return prepared


def residual_denoiser(student: Callable, teacher: Callable) -> Callable:
    """``student(x, t, c) − teacher(x, t, c)``, the teacher without gradients: its square is the loss."""

    def residual(x: torch.Tensor, t: torch.Tensor, c: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(x, t, c)
        return student(x, t, c) - target

    return residual


def layer_residuals(student: nn.Module, teacher: nn.Module, teacher_denoiser: Callable, names: list[str]) -> Callable:
    """Per adapted layer, the student's layer on the teacher's own input minus the teacher's layer output.

    The teacher runs under ``no_grad`` with hooks that keep each named layer's input ``h`` and output ``y``;
    the student's layer (its adapter attached, its hooks firing as in training) is applied to the same ``h``.
    Each residual is divided by the RMS of ``y`` and weighted by ``√(total / (layers · size))``, so the
    Trainer's plain mean over the returned ``[batch, features]`` is the mean over layers of each layer's
    relative squared error: a wide or many-token layer does not outweigh a narrow one.
    """
    student_layers, teacher_layers = dict(student.named_modules()), dict(teacher.named_modules())

    def residual(x: torch.Tensor, t: torch.Tensor, c: dict[str, torch.Tensor]) -> torch.Tensor:
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(name: str) -> Callable:
            return lambda module, args, output: seen.__setitem__(name, (args[0], output))

        hooks = [teacher_layers[name].register_forward_hook(keep(name)) for name in names]
        try:
            with torch.no_grad():
                teacher_denoiser(x, t, c)
        finally:
            for hook in hooks:
                hook.remove()
        parts = []
        for name in names:
            h, y = seen[name]
            scale = y.float().pow(2).mean().sqrt().clamp_min(1e-12)
            parts.append(((student_layers[name](h) - y).float() / scale).reshape(x.shape[0], -1))
        total = sum(part.shape[1] for part in parts)
        return torch.cat([part * math.sqrt(total / (len(parts) * part.shape[1])) for part in parts], dim=1)

    return residual


@torch.no_grad()
def sample_teacher(teacher: nn.Module, fam: Family, pool: ImageSet, seed: int) -> ImageSet:
    """``SAMPLE_COUNT`` deterministic teacher samples from seeded noise, captions cycling over the pool's.

    DDIM (η = 0) on the UNets' ε schedule, Euler on Flux's flow: x0 for ``--data samples``.
    """
    generator = torch.Generator().manual_seed(seed + 303)
    subjects = pool.subjects[torch.arange(SAMPLE_COUNT) % len(pool.subjects)]
    text, pooled = caption_embeddings(pool.names, seed)
    conditioning = fam.conditioning(text[subjects], pooled[subjects])
    x = torch.randn(SAMPLE_COUNT, *fam.latent_shape(), generator=generator)
    denoise = fam.denoiser(teacher)
    rule = fam.rule()
    if isinstance(rule, DDPMRule):
        abar = rule.alphas_cumprod.float()
        steps = torch.linspace(len(abar) - 1, 0, SAMPLE_STEPS).round().long().tolist()
        for i, t in enumerate(steps):
            eps = denoise(x, torch.full((SAMPLE_COUNT,), t), conditioning)
            x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
            prev = abar[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0)
            x = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
    else:
        times = torch.linspace(1.0, 0.0, SAMPLE_STEPS + 1)
        for t, t_next in itertools.pairwise(times):
            velocity = denoise(x, torch.full((SAMPLE_COUNT,), float(t)), conditioning)
            x = x + (t_next - t) * velocity
    return ImageSet(x, subjects, pool.names, "teacher_samples")


def train_method(
    method: Method,
    base: nn.Module,
    teacher: nn.Module,
    fam: Family,
    data: ImageSet,
    mode: str,
    train_settings: dict[str, Any],
    progress: Callable[[str], None] | None = None,
    supervision: str = "output",
    names: list[str] | None = None,
) -> Trained:
    """Attach ``method`` to a copy of ``base`` and train it with the Trainer; returns it trained.

    ``targets`` mode: the loss is the student's residual against the teacher on the same noisy input, at the
    model's output (``supervision="output"``) or at every layer in ``names`` (``"layers"``,
    :func:`layer_residuals`)."""

    def against_teacher(model: nn.Module, denoiser: Callable, rule: Any) -> tuple[Callable, ZeroTarget]:
        if supervision == "layers":
            return layer_residuals(model, teacher, fam.denoiser(teacher), names or []), ZeroTarget(rule, flat=True)
        return residual_denoiser(denoiser, fam.denoiser(teacher)), ZeroTarget(rule)

    objective = against_teacher if mode == "targets" else None
    return train_adapter(method, base, fam, data, train_settings, progress, objective)


# ----------------------------------------------------------------- evaluation
@dataclass
class EvalSet:
    """A fixed held-out batch of noised inputs, and the teacher's and base's outputs on it."""

    inputs: torch.Tensor
    timesteps: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    teacher_out: torch.Tensor
    base_out: torch.Tensor
    layer_inputs: dict[str, torch.Tensor]
    """Each planted layer's input rows inside the teacher on this batch."""


def eval_timesteps(rule: Any, count: int) -> torch.Tensor:
    """Noise levels spread evenly over the schedule (not random: every run sees the same ones)."""
    if isinstance(rule, DDPMRule):
        return torch.linspace(0, len(rule.alphas_cumprod) - 1, count).round().long()
    return torch.linspace(0.02, 0.98, count)


@torch.no_grad()
def build_eval_set(fam: Family, teacher: nn.Module, base: nn.Module, data: ImageSet, seed: int) -> EvalSet:
    """Noise ``EVAL_SIZE`` pool images with fixed noise at evenly spread levels; record the references."""
    batch, inputs, timesteps = noised_batch(fam, data, EVAL_SIZE, torch.Generator().manual_seed(seed + 404), seed)
    captured = capture_inputs(teacher, list(target_layers(teacher)))
    teacher_out = fam.denoiser(teacher)(inputs, timesteps, batch.conditioning)
    for hook in captured.pop("__hooks__"):
        hook.remove()
    base_out = fam.denoiser(base)(inputs, timesteps, batch.conditioning)
    return EvalSet(inputs, timesteps, batch.conditioning, teacher_out, base_out, captured)


def noised_batch(
    fam: Family, data: ImageSet, count: int, generator: torch.Generator, seed: int
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """``count`` seeded pool images noised with seeded noise at evenly spread levels: (batch, x_t, t)."""
    index = torch.randint(len(data.subjects), (count,), generator=generator)
    batch = make_batch(data, index, fam, seed)
    noise = torch.randn(batch.latents.shape, generator=generator)
    rule = fam.rule()
    timesteps = eval_timesteps(rule, count)
    return batch, noised(rule, batch.latents, noise, timesteps), timesteps


def noised(rule: Any, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The rule's forward process at given timesteps (its ``prepare`` draws them at random)."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    if isinstance(rule, DDPMRule):
        abar = rule.alphas_cumprod[timesteps].float().view(shape)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    t = timesteps.float().view(shape)
    return (1 - t) * x0 + t * noise


def capture_inputs(model: nn.Module, names: list[str]) -> dict[str, Any]:
    """Hooks that record each named layer's input as rows ``[N, in]`` (``"__hooks__"``: the handles)."""
    captured: dict[str, Any] = {}
    modules = dict(model.named_modules())

    def hook(name: str):
        return lambda module, args, output: captured.__setitem__(name, args[0].detach().flatten(0, -2))

    captured["__hooks__"] = [modules[name].register_forward_hook(hook(name)) for name in names]
    return captured


@torch.no_grad()
def output_error(trained: Trained, fam: Family, evaluation: EvalSet) -> float:
    """``Σ‖student − teacher‖² / Σ‖teacher − base‖²`` on the held-out batch (0 = perfect, 1 = no better than base)."""
    student_out = fam.denoiser(trained.model)(evaluation.inputs, evaluation.timesteps, evaluation.conditioning)
    missing = (evaluation.teacher_out - evaluation.base_out).pow(2).sum()
    return float((student_out - evaluation.teacher_out).pow(2).sum() / missing.clamp_min(1e-12))


@torch.no_grad()
def component_fits(
    handle: LoRA2Handle, teacher: nn.Module, deltas: dict[str, torch.Tensor], evaluation: EvalSet
) -> dict[str, float]:
    """Per planted component ``‖(ΔW_s − ΔW_t) h‖² / ‖ΔW_t h‖²`` (``/ ‖W h‖²`` where nothing was planted)."""
    layers = dict(teacher.named_modules())
    components = handle.components
    fits = {}
    for name, delta in deltas.items():
        h = evaluation.layer_inputs[name]
        learned = handle.delta(name).flatten(1) if name in components else torch.zeros_like(delta)
        error = (h @ (learned - delta).T).pow(2).sum()
        if delta.any():
            scale = (h @ delta.T).pow(2).sum()
        else:
            scale = (h @ layers[name].weight.flatten(1).T).pow(2).sum()
        fits[name] = float(error / scale.clamp_min(1e-12))
    return fits


# ----------------------------------------------------------------- scores
def growth_ratio_min(planted: dict[str, int], ranks: dict[str, int], threshold: int = 8) -> float | None:
    """Smallest learned/planted over components planted ≥ ``threshold``; None when there are none."""
    ratios = [ranks.get(name, 0) / rank for name, rank in planted.items() if rank >= threshold]
    return min(ratios) if ratios else None


def zero_rank_max(planted: dict[str, int], ranks: dict[str, int], threshold: int = 1) -> int | None:
    """Largest learned width over components planted ≤ ``threshold``; None when there are none."""
    widths = [ranks.get(name, 0) for name, rank in planted.items() if rank <= threshold]
    return max(widths) if widths else None


def rank_spearman(planted: dict[str, int], ranks: dict[str, int]) -> float:
    """Spearman's correlation of planted vs learned widths over every planted component."""
    names = list(planted)
    return spearman([float(planted[n]) for n in names], [float(ranks.get(n, 0)) for n in names])


def scores(planted: dict[str, int], ranks: dict[str, int], fit: float, fit_r64: float, params: int, params_r64: int):
    """The JSON line's headline numbers (see the module docstring)."""
    return {
        "spearman": round(rank_spearman(planted, ranks), 4),
        "growth_ratio_min": growth_ratio_min(planted, ranks),
        "zero_rank_max": zero_rank_max(planted, ranks),
        "fit_vs_r64": fit / fit_r64 if fit_r64 > 0 else math.inf,
        "params_vs_r64": params / params_r64,
        "ranks": dict(ranks),
        "planted": dict(planted),
    }


# ----------------------------------------------------------------- the run
def methods_for(targets: str, seed: int, overrides: Overrides, fixed: tuple[int, ...]) -> list[Method]:
    """LoRA² at its config defaults (plus ``--set lora2.*``), then fixed-rank LoRA at r=64 and ``fixed``."""
    methods = [Method("lora2", lora2_config(overrides.lora2, targets=targets, seed=seed, dtype="float32"))]
    for rank in (BASELINE_RANK, *(r for r in fixed if r != BASELINE_RANK)):
        config = lora2_config(
            targets=targets, seed=seed, dtype="float32", adaptive=False, init_rank=rank, max_rank=rank
        )
        methods.append(Method(f"lora_r{rank}", config))
    return methods


def run(
    model: str = "sd15",
    base: str = "random",
    data: str = "targets",
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    planted: str | dict[str, int] | None = None,
    settings: list[str] | Overrides | None = None,
    fixed: tuple[int, ...] = (),
    progress: Callable[[str], None] | None = None,
    log: Callable[[str], None] = print,
    strength: float = DEFAULT_STRENGTH,
    plant: str = "visible",
    targets: str = "attn",
    supervision: str = DEFAULT_SUPERVISION,
    visible_floor: float = VISIBLE_FLOOR,
) -> dict:
    """Build base and teacher, train LoRA² and the fixed-rank baselines, score them; returns the results."""
    if model not in MODELS:
        raise LoRA2Error(f"--model must be one of {MODELS}, got {model!r}")
    if base not in ("random", "pretrained"):
        raise LoRA2Error(f"--base must be random or pretrained, got {base!r}")
    if data not in ("targets", "samples"):
        raise LoRA2Error(f"--data must be targets or samples, got {data!r}")
    overrides = settings if isinstance(settings, Overrides) else parse_settings(settings)
    train_settings = {"dtype": "float32", "seed": seed, **overrides.train, "steps": steps}
    fam = family(model)
    pool = load_images(fam, seed)
    base_net = base_model(model, fam, seed, base, pool, log=log)
    layers = target_layers(base_net, targets)
    if isinstance(planted, dict):
        plan = parse_planted(",".join(f"{k}={v}" for k, v in planted.items()), layers)
    else:
        plan = parse_planted(planted, layers) if planted else draw_planted(layers, seed)
    if supervision not in SUPERVISIONS:
        raise LoRA2Error(f"--supervision must be one of {SUPERVISIONS}, got {supervision!r}")
    if data == "samples":
        supervision = "output"  # the teacher's samples are trained on with the ordinary denoising loss
    if plant not in PLANTS:
        raise LoRA2Error(f"--plant must be one of {PLANTS}, got {plant!r}")
    if not 0.0 < visible_floor < 1.0:
        raise LoRA2Error(f"--visible-floor must be between 0 and 1 (a fraction of the strongest), got {visible_floor}")
    visible = (
        visible_directions(fam, base_net, pool, list(plan), seed, floor=visible_floor) if plant != "random" else None
    )
    cut: dict[str, int] = {}
    if visible is not None:
        plan, cut = cap_to_visible(plan, visible)
        for name, asked in cut.items():
            log(f"planted {name}: {asked} -> {plan[name]} (only {plan[name]} visible input directions)")
    teacher, deltas = make_teacher(base_net, plan, seed, strength, visible, whiten=plant == "whitened")
    train_data = sample_teacher(teacher, fam, pool, seed) if data == "samples" else pool
    evaluation = build_eval_set(fam, teacher, base_net, train_data, seed)
    results: dict[str, Any] = {"model": model, "base": base, "data": data, "steps": steps, "seed": seed}
    results["supervision"], results["plant"], results["targets"] = supervision, plant, targets
    results["visible_floor"] = visible_floor
    results["images"] = pool.source
    results["settings"] = overrides.to_dict()
    results["planted"] = plan
    results["planted_cut"] = cut
    results["methods"] = {}
    for method in methods_for(targets, seed, overrides, fixed):
        trained = train_method(
            method, base_net, teacher, fam, train_data, data, train_settings, progress, supervision, list(layers)
        )
        entry = {
            "fit": output_error(trained, fam, evaluation),
            "params": trained.handle.num_parameters(),
            "seconds": trained.seconds,
            "ranks": trained.handle.ranks(),
            "component_fit": component_fits(trained.handle, teacher, deltas, evaluation),
        }
        results["methods"][method.name] = entry
    lora2, r64 = results["methods"]["lora2"], results["methods"][f"lora_r{BASELINE_RANK}"]
    results["summary"] = scores(plan, lora2["ranks"], lora2["fit"], r64["fit"], lora2["params"], r64["params"])
    return results


# ----------------------------------------------------------------- report
def format_table(results: dict) -> str:
    """Per component (planted, learned, fit) and per method (fit, params, seconds)."""
    lora2 = results["methods"]["lora2"]
    width = max(len(name) for name in results["planted"]) + 2
    reference = results["methods"][f"lora_r{BASELINE_RANK}"]
    lines = [f"{'component':<{width}}{'planted':>8}{'learned':>8}{'fit':>10}{'fit r64':>10}", "-" * (width + 36)]
    for name, rank in results["planted"].items():
        learned = lora2["ranks"].get(name, 0)
        fits = f"{lora2['component_fit'][name]:>10.4f}{reference['component_fit'][name]:>10.4f}"
        lines.append(f"{name:<{width}}{rank:>8}{learned:>8}{fits}")
    summary = results["summary"]
    lines += [
        f"spearman(planted, learned) = {summary['spearman']:.3f}   growth_ratio_min = {summary['growth_ratio_min']}"
        f"   zero_rank_max = {summary['zero_rank_max']}",
        "",
    ]
    header = f"{'method':<12}{'fit':>10}{'params':>10}{'params/r64':>12}{'seconds':>9}"
    lines += [header, "-" * len(header)]
    for name, m in results["methods"].items():
        ratio = m["params"] / reference["params"]
        lines.append(f"{name:<12}{m['fit']:>10.4f}{m['params']:>10}{ratio:>12.3f}{m['seconds']:>9.1f}")
    return "\n".join(lines)


def json_line(results: dict) -> str:
    """The last line: the summary scores, then the run's settings and every method's numbers."""
    methods = {
        k: {"fit": v["fit"], "params": v["params"], "seconds": round(v["seconds"], 1)}
        for k, v in results["methods"].items()
    }
    extra = {
        k: results[k]
        for k in (
            "model",
            "base",
            "data",
            "steps",
            "seed",
            "images",
            "settings",
            "supervision",
            "plant",
            "targets",
            "visible_floor",
            "planted_cut",
        )
    }
    return json.dumps({**results["summary"], "methods": methods, **extra})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", choices=MODELS, default="sd15")
    parser.add_argument("--base", choices=("random", "pretrained"), default="random")
    parser.add_argument("--data", choices=("targets", "samples"), default="targets")
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps per method ({DEFAULT_STEPS})"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--planted", default=None, help="NAME=RANK,... (unlisted components: 0); default: seeded draw")
    parser.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, help="planted singular values, × ‖W‖₂")
    parser.add_argument(
        "--plant",
        choices=PLANTS,
        default="visible",
        help="planted directions inside what the data excites and the output sees, or anywhere",
    )
    parser.add_argument(
        "--targets", default="attn", help="components planted and adapted: a targets preset or regex (attn)"
    )
    parser.add_argument(
        "--supervision",
        choices=SUPERVISIONS,
        default=DEFAULT_SUPERVISION,
        help="match the teacher at every adapted layer or only at the model's output (--data targets)",
    )
    parser.add_argument(
        "--visible-floor",
        type=float,
        default=VISIBLE_FLOOR,
        help=f"input eigenvalues below this fraction of the strongest count as unseen ({VISIBLE_FLOOR})",
    )
    parser.add_argument("--fixed", default="", help="extra fixed-rank baselines besides r=64, e.g. 4,16")
    add_set_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args, fixed, overrides = parse_training_bench_args(build_parser(), argv)
    bar, update = method_progress(args.steps * (2 + len([r for r in fixed if r != BASELINE_RANK])))
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    results = run(
        args.model,
        args.base,
        args.data,
        args.steps,
        args.seed,
        args.planted,
        overrides,
        fixed,
        update,
        log,
        args.strength,
        args.plant,
        args.targets,
        args.supervision,
        args.visible_floor,
    )
    bar.close()
    print(format_table(results))
    print(json_line(results))
    return results


if __name__ == "__main__":
    main()
