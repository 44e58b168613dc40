"""Rank recovery: does LoRA² find the rank each layer needs?

A teacher–student test of the mechanism. A small frozen stack (``bench/teacher.py``: residual MLP
blocks and one attention block) gets *planted* low-rank updates of known, different ranks, one per
adapted layer. Students start from the unmodified stack and learn to reproduce the teacher's outputs
on fresh random inputs every step: LoRA² starting narrow (``init_rank=2``, ``max_rank=64``), and plain
LoRA at fixed ranks 4, 16 and 64 through the same code (``adaptive=False``) and the same schedule.

Supervision (``--supervision``): by default every student block is fed the teacher's input to that
block and matched to the teacher's output of it (``blocks``). End to end (``output``), a later layer can
absorb part of an earlier layer's update through the residual stream, so the rank a single layer
"should" have is no longer defined and per-layer scores measure credit assignment, not the rank
mechanism. Both are available; the README reports ``blocks``.

Schedule, identical for every method: Adam with cosine decay to 5 %; for the first 70 % of the steps
the loss carries ``handle.regularizer()`` and LoRA² ranks adapt; then ranks freeze and the factors are
polished without the priors (the priors that grow a rank also shrink its factors a little).

Per layer it prints the planted and learned rank; per method the fit error (the relative MSE of the
layer's update on the inputs it sees in the teacher, ``‖ΔW_s h − ΔW_t h‖² / ‖ΔW_t h‖²``, averaged
over layers) and the trainable parameters; the last line is one JSON object.

Run: ``python -m comfyui_lora2.bench.rank_recovery --true-ranks 1,2,4,8,16,32 --dim 256 --seed 0``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from scipy.stats import spearmanr

from ..lora2 import LoRA2Config, LoRA2Handle, attach
from ..lora2.rank_control import RANK_CONTROLS
from .teacher import Stack, adapted_layer_names, build_stack, make_teacher

POLISH_FROM = 0.7
"""Fraction of the steps after which ranks freeze and the priors are dropped."""


@dataclass
class Method:
    """One student: its adapter config and learning rates."""

    name: str
    config: LoRA2Config
    lr: float
    nu_lr: float = 0.0
    reset_moments: bool = False
    """Ablation: drop a resized factor's optimizer state (AWN's choice) instead of keeping its positions'."""


def _exact_names(names: list[str]) -> str:
    return "^(" + "|".join(name.replace(".", r"\.") for name in names) + ")$"


DEFAULT_LR = 3e-3
"""Learning rate of the factors for every method (``--lr``); LoRA² must also recover the ranks at 3e-4."""


def lora2_method(names: list[str], max_rank: int, seed: int, lr: float = DEFAULT_LR, **overrides) -> Method:
    """LoRA² as the benchmark runs it: narrow start, room to grow, every rank setting at its default."""
    config = LoRA2Config(targets=_exact_names(names), init_rank=2, max_rank=max_rank, seed=seed, **overrides)
    return Method("lora2", config, lr=lr, nu_lr=0.1)  # ν's rate matters only to rank_control="gradient"


def fixed_method(names: list[str], rank: int, seed: int, lr: float = DEFAULT_LR) -> Method:
    """Plain LoRA at ``rank`` with the usual ``alpha = rank`` (scale 1)."""
    config = LoRA2Config(
        targets=_exact_names(names), init_rank=rank, max_rank=rank, adaptive=False, alpha=float(rank), seed=seed
    )
    return Method(f"lora_r{rank}", config, lr=lr)


def _cosine(steps: int) -> Callable[[int], float]:
    return lambda step: 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(step / steps, 1.0)))


def _loss(student: Stack, teacher: Stack, x: torch.Tensor, supervision: str) -> torch.Tensor:
    if supervision == "output":
        with torch.no_grad():
            target = teacher(x)
        return (student(x) - target).pow(2).mean()
    with torch.no_grad():
        inputs, outputs = teacher.block_io(x)
    return sum(
        (block(inp) - out).pow(2).mean() for block, inp, out in zip(student.blocks, inputs, outputs, strict=True)
    )


def train_student(
    base: Stack,
    teacher: Stack,
    method: Method,
    steps: int,
    batch: int,
    tokens: int,
    seed: int,
    supervision: str = "blocks",
    progress: Callable[[int, LoRA2Handle, float], None] | None = None,
) -> tuple[LoRA2Handle, list[float]]:
    """Fit ``method``'s adapters on a copy of ``base`` to ``teacher``; returns the handle and losses."""
    student = copy.deepcopy(base)
    handle = attach(student, method.config)
    optimizer = torch.optim.Adam(handle.param_groups(method.lr, method.nu_lr))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(steps))
    generator = torch.Generator().manual_seed(seed + 2)
    polish_from = int(steps * POLISH_FROM)
    losses = []
    for step in range(steps):
        if step == polish_from:
            handle.freeze_ranks()
        x = torch.randn(batch, tokens, base.dim, generator=generator)
        loss = _loss(student, teacher, x, supervision)
        objective = loss + handle.regularizer() if step < polish_from else loss
        objective.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        changes = handle.step(optimizer)
        if method.reset_moments:
            for change in changes.values():
                for _, new, _ in change.replaced:
                    optimizer.state.pop(new, None)
        losses.append(loss.item())
        if progress is not None:
            progress(step, handle, losses[-1])
    return handle, losses


@torch.no_grad()
def layer_inputs(model: Stack, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input every named layer receives when ``model`` runs on ``x``, as rows."""
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [
        modules[name].register_forward_hook(lambda m, a, o, n=name: captured.__setitem__(n, a[0].flatten(0, -2)))
        for name in names
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    return captured


@torch.no_grad()
def fit_errors(handle: LoRA2Handle, planted: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> list[float]:
    """Per layer ``‖ΔW_s h − ΔW_t h‖² / ‖ΔW_t h‖²`` on the teacher's own inputs to that layer."""
    errors = []
    for name, target in planted.items():
        h = inputs[name]
        want = h @ target.T
        errors.append(float((h @ handle.delta(name).T - want).pow(2).sum() / want.pow(2).sum()))
    return errors


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties averaged); 1.0 when both lists are constant."""
    if len(set(a)) <= 1 or len(set(b)) <= 1:
        return 1.0 if len(set(a)) == len(set(b)) else 0.0
    return float(spearmanr(a, b).statistic)


def run(
    true_ranks: list[int],
    dim: int = 256,
    seed: int = 0,
    steps: int = 3000,
    batch: int = 8,
    tokens: int = 16,
    heads: int = 4,
    max_rank: int = 64,
    fixed_ranks: tuple[int, ...] = (4, 16, 64),
    reset_moments_ablation: bool = False,
    supervision: str = "blocks",
    progress: Callable[[str, int], None] | None = None,
    lr: float = DEFAULT_LR,
    lora2_overrides: dict | None = None,
) -> dict:
    """Train every method against one planted teacher; returns everything the report prints."""
    lora2_overrides = lora2_overrides or {}
    names = adapted_layer_names(len(true_ranks))
    base = build_stack(dim, len(true_ranks), heads, seed)
    teacher, planted = make_teacher(base, true_ranks, seed)
    eval_x = torch.randn(64, tokens, dim, generator=torch.Generator().manual_seed(seed + 3))
    eval_inputs = layer_inputs(teacher, names, eval_x)
    methods = [lora2_method(names, max_rank, seed, lr, **lora2_overrides)]
    methods += [fixed_method(names, r, seed, lr) for r in fixed_ranks]
    if reset_moments_ablation:
        ablation = lora2_method(names, max_rank, seed, lr, **lora2_overrides)
        ablation.name, ablation.reset_moments = "lora2_reset_moments", True
        methods.append(ablation)
    results: dict = {"planted": list(true_ranks), "layers": names, "methods": {}}
    for method in methods:
        started = time.perf_counter()
        report = (lambda step, handle, loss, m=method.name: progress(m, step)) if progress else None
        handle, _ = train_student(base, teacher, method, steps, batch, tokens, seed, supervision, report)
        errors = fit_errors(handle, planted, eval_inputs)
        results["methods"][method.name] = {
            "rel_mse": sum(errors) / len(errors),
            "rel_mse_per_layer": errors,
            "params": handle.num_parameters(),
            "seconds": time.perf_counter() - started,
        }
        if method.config.adaptive:
            ranks = handle.ranks()
            results["methods"][method.name]["learned"] = [ranks[name] for name in names]
            if method.name == "lora2":
                results["learned"] = results["methods"][method.name]["learned"]
    results["spearman"] = spearman(results["planted"], results["learned"])
    return results


def format_table(results: dict) -> str:
    """The per-layer and per-method tables, as printed."""
    lora2_errors = results["methods"]["lora2"]["rel_mse_per_layer"]
    lines = [f"{'layer':<20}{'planted':>8}{'learned':>8}{'rel_mse':>10}", "-" * 46]
    for name, planted, learned, error in zip(
        results["layers"], results["planted"], results["learned"], lora2_errors, strict=True
    ):
        lines.append(f"{name:<20}{planted:>8}{learned:>8}{error:>10.5f}")
    lines += [f"spearman(planted, learned) = {results['spearman']:.3f}", ""]
    width = max(10, *(len(name) + 2 for name in results["methods"]))
    header = f"{'method':<{width}}{'rel_mse':>10}{'params':>10}{'params/r64':>12}{'seconds':>9}"
    lines += [header, "-" * len(header)]
    reference = results["methods"].get("lora_r64", {}).get("params")
    for name, m in results["methods"].items():
        ratio = f"{m['params'] / reference:.3f}" if reference else "-"
        lines.append(f"{name:<{width}}{m['rel_mse']:>10.5f}{m['params']:>10}{ratio:>12}{m['seconds']:>9.1f}")
    for name, m in results["methods"].items():
        if name != "lora2" and "learned" in m:
            lines.append(f"{name} learned ranks: {m['learned']}")
    return "\n".join(lines)


def summary(results: dict) -> dict:
    """The JSON line: planted/learned ranks, Spearman, and per method fit error and parameters."""
    return {
        "planted": results["planted"],
        "learned": results["learned"],
        "spearman": round(results["spearman"], 4),
        "methods": {k: {"rel_mse": v["rel_mse"], "params": v["params"]} for k, v in results["methods"].items()},
    }


def _progress_bar(total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="step", mininterval=1.0)

    def update(method: str, step: int) -> None:
        if bar.desc != method:
            bar.set_description(method)
        bar.update(1)

    return bar, update


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="LoRA² rank-recovery benchmark (teacher–student).")
    parser.add_argument("--true-ranks", default="1,2,4,8,16,32", help="planted rank of each adapted layer (1..32)")
    parser.add_argument("--dim", type=int, default=256, help="width of the stack")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps per method")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per sequence")
    parser.add_argument("--max-rank", type=int, default=64, help="LoRA² max_rank")
    parser.add_argument("--supervision", choices=("blocks", "output"), default="blocks")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="factor learning rate of every method")
    parser.add_argument(
        "--rank-control",
        choices=RANK_CONTROLS,
        default=LoRA2Config().rank_control,
        help="LoRA²'s rank mechanism (the previous one, 'gradient', as an ablation)",
    )
    parser.add_argument(
        "--ablation-reset-moments",
        action="store_true",
        help="also run LoRA² resetting a resized factor's Adam state (AWN) instead of keeping its positions'",
    )
    args = parser.parse_args(argv)
    true_ranks = [int(r) for r in args.true_ranks.split(",") if r.strip()]
    if not true_ranks or min(true_ranks) < 1 or max(true_ranks) > min(args.dim, args.max_rank):
        parser.error(f"--true-ranks must be between 1 and min(dim, max_rank) = {min(args.dim, args.max_rank)}")
    torch.set_num_threads(1)
    fixed = (4, 16, 64)
    bar, update = _progress_bar(args.steps * (1 + len(fixed) + args.ablation_reset_moments))
    results = run(
        true_ranks,
        args.dim,
        args.seed,
        args.steps,
        args.batch,
        args.tokens,
        max_rank=args.max_rank,
        fixed_ranks=fixed,
        supervision=args.supervision,
        reset_moments_ablation=args.ablation_reset_moments,
        progress=update,
        lr=args.lr,
        lora2_overrides={"rank_control": args.rank_control},
    )
    bar.close()
    print(format_table(results))
    print(json.dumps(summary(results)))
    return results


if __name__ == "__main__":
    main()
