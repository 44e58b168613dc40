"""Personalisation proxy: LoRA² against fixed-rank LoRA on a subject the base has never seen.

What a user of LoRA² Train does, shrunk to CPU size: take a pre-trained model, fine-tune an adapter on
a handful of photos of one subject, and hope it learned the subject rather than the photos. Here:

* **Base.** The tiny diffusers model of ``--model`` (``bench/tiny_diffusion.py``), pre-trained for
  ``--base-steps`` full fine-tune steps on the shared DreamBooth photos of every subject *except* the
  held-out one (``bench/image_data.py``; the held-out subject is part of the cache key, so a base that
  saw it is never reused). Images reach the model through image_data's fixed seeded encoder (no VAE);
  its normalisation constants are taken over all photos, held-out subject included: a fixed encoder,
  like a VAE's scale factor, not something trained on the subject.
* **Split.** The held-out subject's photos are shuffled with ``seed + SPLIT_SEED_OFFSET`` and the first
  ``--test-images`` (default 2) become the test images, the rest the training images (3-4 for the
  DreamBooth subjects). The JSON line names both lists (file names when the photos are present).
* **Methods.** LoRA² at the defaults of ``LoRA2Config()`` and ``TrainConfig()`` (the benchmark sets
  only ``steps``, ``seed`` and float32), and fixed-rank LoRA at ``--fixed`` ranks (default 4, 16, 64;
  16 is always run, it is the reference) through the same code (``adaptive=False, init_rank=r,
  max_rank=r``), each trained through the ordinary :class:`lora2.train.Trainer` on the training images
  with the subject's caption. ``--set lora2.F=V`` changes LoRA² only, ``--set train.F=V`` every method.
* **Held-out loss.** The ordinary ε (UNets) / flow (Flux) MSE on the test images, each noised at
  ``EVAL_LEVELS`` evenly spread noise levels with fixed seeded noise: deterministic and the same
  inputs for every method, so differences are the adapters'. The base's loss on the same inputs is
  the "no adapter" reference; the same measure on the training images shows how much each method
  memorised.

Scores (the last line is one JSON object): ``heldout`` (per method, and ``base``), ``params`` and
``megabytes`` (fp16 export, ``lora2.train.adapter_megabytes``), ``rank_mean`` and ``rank_std`` (LoRA²'s
final widths across components; population standard deviation), ``lora2_vs_r16_loss`` and
``lora2_vs_r16_params`` (LoRA² over fixed r=16), and ``bars``: issue 8's "ranks differ across
components (std > 0.5)" and "held-out loss no worse than r=16's at no more than its size".

When the shared photos are absent, image_data's seeded synthetic images stand in (8 "subjects" of
4 independent images each; the last one is held out in place of ``--subject``); the output says so.

Run: ``python -m comfyui_lora2.bench.personalisation --model sd15 --subject dog --seed 0``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..lora2.errors import LoRA2Error
from ..lora2.noise import DDPMRule
from ..lora2.train import adapter_megabytes
from .diffusion_rank_recovery import eval_timesteps, noised
from .image_data import (
    PRETRAIN_STEPS,
    ImageSet,
    base_model,
    load_images,
    make_batch,
    photo_dir,
    photo_files,
)
from .methods import Method, train_method
from .settings import (
    Overrides,
    add_set_argument,
    lora2_config,
    parse_settings,
    run_training_bench,
)
from .tiny_diffusion import MODELS, Family, family

DEFAULT_STEPS = 500
DEFAULT_FIXED = (4, 16, 64)
REFERENCE_RANK = 16
"""Issue 8's bar compares LoRA² with fixed rank 16."""
TEST_IMAGES = 2
EVAL_LEVELS = 8
"""Noise levels per test image (evenly spread over the schedule)."""
SPLIT_SEED_OFFSET = 505
HELDOUT_SEED_OFFSET = 606
RANK_STD_BAR = 0.5


# ----------------------------------------------------------------- the held-out subject
@dataclass
class Split:
    """The held-out subject's images, split into training and test images."""

    subject: str
    train: ImageSet
    test: ImageSet
    train_names: list[str]
    test_names: list[str]
    """Image names (file names for the photos, ``#k`` positions for synthetic images)."""


def resolve_subject(images: ImageSet, subject: str) -> tuple[str, str | None]:
    """The subject to hold out, and a note when the synthetic fallback replaced the requested one."""
    if subject in images.names:
        return subject, None
    if images.source == "synthetic":
        stand_in = images.names[-1]
        return stand_in, f"shared photos absent: synthetic images, holding out {stand_in!r} in place of {subject!r}"
    raise LoRA2Error(f"--subject {subject!r} is not among the {images.source} subjects: {', '.join(images.names)}")


def image_names(images: ImageSet, subject: str) -> list[str]:
    """Names of the subject's images in ``load_images`` order."""
    count = int((images.subjects == images.names.index(subject)).sum())
    root = photo_dir() if images.source == "dreambooth" else None
    if root is not None:
        files = photo_files(root).get(subject, [])
        if len(files) == count:
            return [path.name for path in files]
    return [f"#{k}" for k in range(count)]


def split_subject(images: ImageSet, subject: str, seed: int, test_images: int = TEST_IMAGES) -> Split:
    """Seeded split of ``subject``'s images: ``test_images`` test images, the rest for training."""
    positions = (images.subjects == images.names.index(subject)).nonzero().flatten()
    if not 1 <= test_images < len(positions):
        raise LoRA2Error(
            f"--test-images {test_images}: subject {subject!r} has {len(positions)} images; "
            f"keep at least one for training and one for testing"
        )
    order = torch.randperm(len(positions), generator=torch.Generator().manual_seed(seed + SPLIT_SEED_OFFSET))
    test, train = order[:test_images].sort().values, order[test_images:].sort().values
    names = image_names(images, subject)
    return Split(
        subject,
        images.select(positions[train]),
        images.select(positions[test]),
        [names[i] for i in train.tolist()],
        [names[i] for i in test.tolist()],
    )


# ----------------------------------------------------------------- the held-out loss
@dataclass
class LossSet:
    """Fixed noised inputs, their timesteps, conditioning and the rule's targets."""

    inputs: torch.Tensor
    timesteps: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    target: torch.Tensor


def rule_target(rule: Any, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the rule's ``prepare`` would ask the model for at these timesteps (ε, v or ε − x0)."""
    if isinstance(rule, DDPMRule):
        if rule.prediction == "epsilon":
            return noise
        abar = rule.alphas_cumprod[timesteps].float().view((-1,) + (1,) * (x0.ndim - 1))
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0
    return noise - x0


def build_loss_set(fam: Family, images: ImageSet, seed: int, levels: int = EVAL_LEVELS) -> LossSet:
    """Every image of ``images`` at ``levels`` evenly spread noise levels, with noise from ``seed``."""
    count = len(images.subjects)
    index = torch.arange(count).repeat_interleave(levels)
    batch = make_batch(images, index, fam, seed)
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(seed + HELDOUT_SEED_OFFSET))
    rule = fam.rule()
    timesteps = eval_timesteps(rule, levels).repeat(count)
    inputs = noised(rule, batch.latents, noise, timesteps)
    model_timesteps = timesteps if isinstance(rule, DDPMRule) else timesteps * rule.timestep_scale
    return LossSet(inputs, model_timesteps, batch.conditioning, rule_target(rule, batch.latents, noise, timesteps))


@torch.no_grad()
def loss_on(model: nn.Module, fam: Family, losses: LossSet) -> float:
    """Mean squared error of ``model`` on the fixed set (the training loss, without its randomness)."""
    output = fam.denoiser(model)(losses.inputs, losses.timesteps, losses.conditioning)
    return float((output.float() - losses.target).pow(2).mean())


# ----------------------------------------------------------------- the methods
def methods_for(seed: int, overrides: Overrides, fixed: tuple[int, ...]) -> list[Method]:
    """LoRA² at its config defaults (plus ``--set lora2.*``), then fixed-rank LoRA at ``fixed`` (and r=16)."""
    methods = [Method("lora2", lora2_config(overrides.lora2, seed=seed, dtype="float32"))]
    for rank in sorted({*fixed, REFERENCE_RANK}):
        config = lora2_config(seed=seed, dtype="float32", adaptive=False, init_rank=rank, max_rank=rank)
        methods.append(Method(f"lora_r{rank}", config))
    return methods


def rank_spread(ranks: dict[str, int]) -> tuple[float, float]:
    """Mean and population standard deviation of the widths across components."""
    widths = list(ranks.values())
    return statistics.fmean(widths), statistics.pstdev(widths)


# ----------------------------------------------------------------- the run
def run(
    model: str = "sd15",
    subject: str = "dog",
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    base_steps: int = PRETRAIN_STEPS,
    fixed: tuple[int, ...] = DEFAULT_FIXED,
    test_images: int = TEST_IMAGES,
    settings: list[str] | Overrides | None = None,
    progress: Callable[[str], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Pre-train the base without ``subject``, train every method on its training images, score them."""
    if model not in MODELS:
        raise LoRA2Error(f"--model must be one of {MODELS}, got {model!r}")
    if base_steps < 1:
        raise LoRA2Error(f"--base-steps must be at least 1, got {base_steps}")
    overrides = settings if isinstance(settings, Overrides) else parse_settings(settings)
    train_settings = {"dtype": "float32", "seed": seed, **overrides.train, "steps": steps}
    fam = family(model)
    pool = load_images(fam, seed)
    held_out, note = resolve_subject(pool, subject)
    if note:
        log(note)
    split = split_subject(pool, held_out, seed, test_images)
    base_net = base_model(model, fam, seed, "pretrained", pool, log=log, exclude=(held_out,), steps=base_steps)
    test_set = build_loss_set(fam, split.test, seed)
    train_set = build_loss_set(fam, split.train, seed)
    results: dict[str, Any] = {
        "model": model,
        "subject": held_out,
        "requested_subject": subject,
        "seed": seed,
        "steps": steps,
        "base_steps": base_steps,
        "images": pool.source,
        "note": note,
        "split": {"train": split.train_names, "test": split.test_names},
        "settings": overrides.to_dict(),
        "base": {"heldout": loss_on(base_net, fam, test_set), "train": loss_on(base_net, fam, train_set)},
        "methods": {},
    }
    for method in methods_for(seed, overrides, fixed):
        trained = train_method(method, base_net, fam, split.train, train_settings, progress)
        ranks = trained.handle.ranks()
        mean, std = rank_spread(ranks)
        results["methods"][method.name] = {
            "heldout": loss_on(trained.model, fam, test_set),
            "train": loss_on(trained.model, fam, train_set),
            "params": trained.handle.num_parameters(),
            "megabytes": adapter_megabytes(trained.handle),
            "rank_mean": mean,
            "rank_std": std,
            "ranks": ranks,
            "seconds": trained.seconds,
        }
    results["summary"] = summary(results)
    return results


def summary(results: dict) -> dict[str, Any]:
    """The JSON line's headline numbers: LoRA² against fixed r=16, and issue 8's two bars."""
    lora2 = results["methods"]["lora2"]
    reference = results["methods"][f"lora_r{REFERENCE_RANK}"]
    loss_ratio = lora2["heldout"] / reference["heldout"]
    params_ratio = lora2["params"] / reference["params"]
    return {
        "rank_mean": lora2["rank_mean"],
        "rank_std": lora2["rank_std"],
        "lora2_vs_r16_loss": loss_ratio,
        "lora2_vs_r16_params": params_ratio,
        "bars": {
            "rank_std_above_0.5": lora2["rank_std"] > RANK_STD_BAR,
            "heldout_no_worse_than_r16_at_no_more_size": loss_ratio <= 1.0 and params_ratio <= 1.0,
        },
    }


# ----------------------------------------------------------------- report
def format_table(results: dict) -> str:
    """One row per method: held-out loss, vs base, training-image loss, size, ranks, seconds."""
    base = results["base"]
    header = (
        f"{'method':<10}{'heldout':>10}{'vs base':>9}{'train img':>11}{'params':>9}{'MB':>8}"
        f"{'rank mean':>11}{'rank std':>10}{'seconds':>9}"
    )
    lines = [
        f"{results['model']}, held-out subject {results['subject']!r} ({results['images']} images), seed "
        f"{results['seed']}, {results['steps']} steps; train {results['split']['train']}, "
        f"test {results['split']['test']}",
        header,
        "-" * len(header),
        f"{'base':<10}{base['heldout']:>10.4f}{1.0:>9.3f}{base['train']:>11.4f}{0:>9}{0.0:>8.3f}"
        f"{'-':>11}{'-':>10}{'-':>9}",
    ]
    for name, m in results["methods"].items():
        lines.append(
            f"{name:<10}{m['heldout']:>10.4f}{m['heldout'] / base['heldout']:>9.3f}{m['train']:>11.4f}"
            f"{m['params']:>9}{m['megabytes']:>8.3f}{m['rank_mean']:>11.2f}{m['rank_std']:>10.2f}"
            f"{m['seconds']:>9.1f}"
        )
    s = results["summary"]
    lines.append(
        f"LoRA² vs r16: held-out loss ×{s['lora2_vs_r16_loss']:.3f} at ×{s['lora2_vs_r16_params']:.3f} the "
        f"parameters; rank std {s['rank_std']:.2f}; bars: {s['bars']}"
    )
    if results["note"]:
        lines.append(f"NOTE: {results['note']}")
    return "\n".join(lines)


def json_line(results: dict) -> str:
    """The last line: headline scores, per-method numbers, and the run's inputs."""
    methods = results["methods"]
    record = {
        "heldout": {"base": results["base"]["heldout"], **{k: v["heldout"] for k, v in methods.items()}},
        "train_images": {"base": results["base"]["train"], **{k: v["train"] for k, v in methods.items()}},
        "params": {k: v["params"] for k, v in methods.items()},
        "megabytes": {k: round(v["megabytes"], 4) for k, v in methods.items()},
        **results["summary"],
        "ranks": methods["lora2"]["ranks"],
        "seconds": {k: round(v["seconds"], 1) for k, v in methods.items()},
    }
    extra = ("subject", "requested_subject", "seed", "model", "steps", "base_steps", "images", "note", "split")
    return json.dumps({**record, **{k: results[k] for k in (*extra, "settings")}})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", choices=MODELS, default="sd15")
    parser.add_argument("--subject", default="dog", help="DreamBooth subject held out of pre-training (dog)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"steps per method ({DEFAULT_STEPS})")
    parser.add_argument(
        "--base-steps", type=int, default=PRETRAIN_STEPS, help=f"pre-training steps of the base ({PRETRAIN_STEPS})"
    )
    parser.add_argument("--fixed", default=",".join(map(str, DEFAULT_FIXED)), help="fixed-rank baselines (4,16,64)")
    parser.add_argument("--test-images", type=int, default=TEST_IMAGES, help=f"held-out test images ({TEST_IMAGES})")
    add_set_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> dict:
    def total_steps(args: argparse.Namespace, fixed: tuple[int, ...], overrides: Overrides) -> int:
        return args.steps * len(methods_for(args.seed, overrides, fixed))

    def run_from(args: argparse.Namespace, fixed: tuple[int, ...], overrides: Overrides, update, log) -> dict:
        pick = (args.model, args.subject, args.steps, args.seed, args.base_steps, fixed, args.test_images)
        return run(*pick, overrides, update, log)

    return run_training_bench(build_parser(), argv, total_steps, run_from, format_table, json_line)


if __name__ == "__main__":
    main()
