"""Rank recovery over many seeds: how reliably does LoRA² find the planted ranks?

Runs the LoRA² student of :mod:`bench.rank_recovery` (no fixed-rank baselines: their fit does not
depend on the planted ranks' order) for ``--runs`` seeds. Even seeds use the ladder 1, 2, 4, 8, 16, 32;
odd seeds draw six ranks uniformly from 1..32, so near-ties (e.g. 29, 30, 31) are part of the test.
Prints one row per run and a summary, then one JSON line.

Run: ``python -m comfyui_lora2.bench.rank_recovery_sweep --runs 12`` (about 30 s per run on one core).
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from .rank_recovery import run


def planted_for(seed: int) -> list[int]:
    if seed % 2 == 0:
        return [1, 2, 4, 8, 16, 32]
    rng = random.Random(seed)
    return [rng.randint(1, 32) for _ in range(6)]


def within_bounds(planted: list[int], learned: list[int]) -> bool:
    """Every learned rank in ``[planted / 1.5, 1.5 · planted + 2]`` (the issue's acceptance band)."""
    return all(p / 1.5 <= r <= 1.5 * p + 2 for p, r in zip(planted, learned, strict=True))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="LoRA² rank recovery over many seeds.")
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"{'seed':>4}  {'planted':<28}{'learned':<28}{'spearman':>9}{'rel_mse':>10}  bounds")
    for seed in range(args.runs):
        planted = planted_for(seed)
        results = run(planted, dim=args.dim, seed=seed, steps=args.steps, fixed_ranks=())
        learned, error = results["learned"], results["methods"]["lora2"]["rel_mse"]
        ok = within_bounds(planted, learned)
        rows.append(
            {
                "seed": seed,
                "planted": planted,
                "learned": learned,
                "spearman": results["spearman"],
                "rel_mse": error,
                "within_bounds": ok,
            }
        )
        verdict = "ok" if ok else "OUT"
        row = f"{seed:>4}  {planted!s:<28}{learned!s:<28}{results['spearman']:>9.3f}{error:>10.2e}  {verdict}"
        print(row, flush=True)
    summary = {
        "runs": len(rows),
        "min_spearman": min(r["spearman"] for r in rows),
        "all_within_bounds": all(r["within_bounds"] for r in rows),
        "max_rel_mse": max(r["rel_mse"] for r in rows),
        "rows": rows,
    }
    print(
        f"min spearman {summary['min_spearman']:.3f}, all within bounds: {summary['all_within_bounds']}, "
        f"max fit error {summary['max_rel_mse']:.2e}"
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
