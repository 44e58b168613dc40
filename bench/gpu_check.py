"""One command for a CUDA machine: native TrainLoraNode vs LoRA² Train on full-size SD1.5 and SDXL.

``python -m comfyui_lora2.bench.gpu_check`` runs :mod:`bench.train_speed` on the real architectures,
built from their configs with random weights (nothing is downloaded): SD1.5 at 512² (latents 64²) and
SDXL at 1024² (latents 128²), weights stored in bfloat16, bfloat16 compute, gradient checkpointing by
block in every trainer, rank 32, batch 1. It prints the GPU's name, then per model the median step
time and ``torch.cuda.max_memory_allocated`` of the frozen model's floor, native (every weight) and
LoRA² (``attn`` and ``all`` at native's size, ``max_rank`` = rank, and ``attn`` with room to grow, as the
node's defaults train), then ``train_speed``'s JSON line. Sized to finish within 8 minutes on one
recent GPU (10 processes, 3 measured steps each).

``--device cpu --models tiny --latent-side 8`` runs the same path on the tiny model without a GPU (what
the test does), so the command is known to work before a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import time

from . import train_speed

KINDS = "floor,native,lora2-attn,lora2-all,room-attn"
"""``room-attn`` is the node's default shape (rank grows from ``init_rank``): the gradient sketch at work."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--ranks", default="32")
    parser.add_argument("--kinds", default=KINDS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--latent-side", type=int, default=None, help="default: 64 for SD1.5, 128 for SDXL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=240, help="seconds per process")
    return parser.parse_args(argv)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device is visible (use --device cpu --models tiny for a dry run)")
        return torch.cuda.get_device_name(torch.device(device))
    return "CPU"


def summary(result: dict) -> str:
    """Per model: step time and peak memory of each trainer, and LoRA²'s ratios to native."""
    raw = result["raw"]
    lines = ["| model | trainer | step (s) | max allocated (MB) | added by training (MB) |", "|---|---|---|---|---|"]
    for entry in raw.values():
        rank = f" r{entry['rank']}" if entry["rank"] else ""
        lines.append(
            f"| {entry['model']} | {entry['kind']}{rank} | {entry['step_s']:.3f} | {entry['peak_mb']:.0f} "
            f"| {entry['added_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    name = device_name(args.device)
    started = time.perf_counter()
    bench_args = [
        "--device",
        args.device,
        "--models",
        args.models,
        "--ranks",
        args.ranks,
        "--kinds",
        args.kinds,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--repeats",
        "1",
        "--compute",
        "bfloat16",
        "--weights",
        "bfloat16",
        "--checkpointing",
        "--seed",
        str(args.seed),
        "--timeout",
        str(args.timeout),
    ]
    if args.latent_side:
        bench_args += ["--latent-side", str(args.latent_side)]
    parsed = train_speed.parse_args(bench_args)
    runs = train_speed.plan(parsed)
    raw = train_speed.summarise(train_speed.measure(runs, 1, args.seed, args.timeout))
    models = list(dict.fromkeys(r.model for r in runs))
    ranks = sorted({r.rank for r in runs if r.kind != "floor"})
    result = {"ratios": train_speed.ratios(raw, models, ranks), "raw": raw, "device": name}
    print(f"device: {name}; {time.perf_counter() - started:.0f} s in all")
    print(summary(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
