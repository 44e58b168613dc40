"""Training speed and memory, side by side: ComfyUI's TrainLoraNode, LoRA² (adaptive and fixed rank), the floor.

``python -m comfyui_lora2.bench.train_speed`` measures, on ComfyUI's own UNet classes with random
weights (``speed_models``), per model and rank:

* ``floor``: the frozen model's own forward and backward, the least any adapter's step can cost;
* ``native``: ComfyUI 0.3.75's ``TrainLoraNode`` (it adapts every weight, biases and norms included);
* ``lora2-attn`` / ``lora2-all``: LoRA² Train, the node a user runs, on attention / every layer;
* ``fixed-attn`` / ``fixed-all``: the same node in fixed-rank mode;
* ``room-attn`` / ``room-all``: LoRA² Train with room to grow (``max_rank`` = 2 × rank), so the gradient
  sketch that looks for growth works every step (``lora2-*`` start at their ``max_rank``, where it rests);
* ``apply_stock`` / ``apply_lora2``: a LoRA file merged into the model by the stock loader or by
  LoRA² Load + Apply (peak memory).

Each configuration runs in a process of its own (``speed_worker``: no allocator or cache state shared),
repetitions are interleaved in a seeded random order (a busy machine slows every configuration alike),
and each reports the median of its step times (CPU time of the one-thread process on CPU, since on a
shared machine the wall clock measures the neighbours; wall clock after a synchronise on CUDA) and the
peak memory the call added: peak allocated bytes (``torch.cuda.max_memory_allocated`` on CUDA, glibc's
count of bytes in use on CPU, ``bench/allocated.py``), which the ratios read, and the resident set's
growth (``rss_*``), which also holds the allocator's slack.
``--baseline DIR`` runs another version of the pack (``DIR/comfyui_lora2``) interleaved with this one,
to A/B a change (``bench/NOTES.md``). Nodes run with their default ``steps`` and are
stopped after the measured steps, so evaluation and freeze schedules are those of a default run.

Prints a table, then as the last line ``{"ratios": {...}, "raw": {...}}``: the ratios are read on the
reference model (the largest one run), the worst over ranks; ``adaptive_vs_fixed_max`` (and
``room_vs_fixed_max``, for ``room-*``) is the worst over every model, rank and target. ``--quick`` is
the CI-sized run (tiny model, rank 8, two steps).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

from .speed_models import MODELS, WEIGHT_DTYPES

LORA2_KINDS = {"lora2-attn": ("attn", True), "lora2-all": ("all", True), "fixed-attn": ("attn", False)}
LORA2_KINDS["fixed-all"] = ("all", False)
LORA2_KINDS.update({"room-attn": ("attn", True), "room-all": ("all", True)})
ROOM = {"room-attn": 2, "room-all": 2}
"""``max_rank`` ÷ ``rank`` of a kind (1 where absent). ``lora2-*`` start at their ``max_rank``, where
nothing can grow and the gradient sketch is not fed; ``room-*`` may grow to twice the rank, so their
sketches are fed every step. The first decision comes at step ``decide_every``, after the measured steps,
so all of them train the same widths."""
TRAIN_KINDS = ("floor", "native", *LORA2_KINDS)
APPLY_KINDS = ("apply_stock", "apply_lora2")


@dataclass(frozen=True)
class Run:
    """One configuration (what the worker gets as JSON)."""

    kind: str
    model: str
    rank: int
    targets: str
    adaptive: bool
    seed: int
    device: str
    weights: str
    compute: str
    checkpointing: bool
    warmup: int
    steps: int
    node_steps: int
    latent_side: int | None
    threads: int
    variant: str = ""
    """"" for this checkout; "base" for the ``--baseline`` tree (LoRA² configurations only)."""
    max_rank: int = 0
    """LoRA² Train's ``max_rank`` (0: ``rank``)."""

    @property
    def label(self) -> str:
        prefix = f"{self.variant}:" if self.variant else ""
        if self.kind == "floor":
            return f"{self.model} floor"
        return f"{self.model} {prefix}{self.kind} r{self.rank}"

    def worker_kind(self) -> str:
        return "lora2" if self.kind in LORA2_KINDS else self.kind


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="CI-sized: tiny model, rank 8, 16² latents, 2 steps, 1 repetition"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="tiny,sd1-width", help=f"comma list of {sorted(MODELS)}")
    parser.add_argument("--ranks", default="8,32,128")
    parser.add_argument("--kinds", default=",".join(TRAIN_KINDS + APPLY_KINDS), help="subset of configurations")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped first (allocation, caches)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per configuration, interleaved")
    parser.add_argument("--node-steps", type=int, default=None, help="the nodes' steps widget (default: theirs)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--compute", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--weights", default="float32", choices=list(WEIGHT_DTYPES), help="how base weights are stored")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every trainer")
    parser.add_argument("--latent-side", type=int, default=None, help="latent height/width (default per model)")
    parser.add_argument("--apply-rank", type=int, default=32, help="rank of the LoRA file the Apply test merges")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per process")
    parser.add_argument(
        "--baseline",
        default=None,
        help="a folder holding another version of the pack as `comfyui_lora2/` (e.g. `git archive HEAD`): its "
        "LoRA² configurations run interleaved with this checkout's, labelled base:, to A/B a change",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.ranks, args.steps, args.warmup, args.repeats = "tiny", "8", 2, 1, 1
        args.latent_side = args.latent_side or 16
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step's time has no start mark)")
    return args


def plan(args: argparse.Namespace) -> list[Run]:
    """Every configuration once, in a fixed order."""
    from comfyui_lora2.lora2.train import TrainConfig

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(TRAIN_KINDS) - set(APPLY_KINDS))
    if unknown:
        raise SystemExit(f"--kinds: unknown {unknown}; known: {[*TRAIN_KINDS, *APPLY_KINDS]}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = sorted(set(models) - set(MODELS))
    if bad:
        raise SystemExit(f"--models: unknown {bad}; known: {sorted(MODELS)}")
    ranks = [int(r) for r in args.ranks.split(",")]
    common = {
        "seed": args.seed,
        "device": args.device,
        "weights": args.weights,
        "compute": args.compute,
        "checkpointing": args.checkpointing,
        "warmup": args.warmup,
        "steps": args.steps,
        "node_steps": args.node_steps or TrainConfig().steps,
        "latent_side": args.latent_side,
        "threads": args.threads,
    }
    runs: list[Run] = []
    for model in models:
        if "floor" in kinds:
            runs.append(Run("floor", model, 0, "", False, **common))
        for rank in ranks:
            if "native" in kinds:
                runs.append(Run("native", model, rank, "all", False, **common))
            for kind, (targets, adaptive) in LORA2_KINDS.items():
                if kind in kinds:
                    sized = {**common, "max_rank": rank * ROOM.get(kind, 1)}
                    runs.append(Run(kind, model, rank, targets, adaptive, **sized))
                    if args.baseline:
                        runs.append(Run(kind, model, rank, targets, adaptive, **sized, variant="base"))
        for kind in APPLY_KINDS:
            if kind in kinds:
                runs.append(Run(kind, model, args.apply_rank, "all", False, **{**common, "steps": 1}))
                if args.baseline and kind == "apply_lora2":
                    runs.append(
                        Run(kind, model, args.apply_rank, "all", False, **{**common, "steps": 1}, variant="base")
                    )
    return runs


def run_one(run: Run, timeout: int, baseline: str | None = None) -> dict[str, Any]:
    """Run the worker for one configuration; its last stdout line is its JSON result."""
    from .speed_worker import COMFY_DIR, TORCHVISION_STUB

    payload = {**asdict(run), "kind": run.worker_kind(), "comfy_dir": str(COMFY_DIR), "stub_dir": str(TORCHVISION_STUB)}
    env = dict(os.environ, OMP_NUM_THREADS=str(run.threads))
    if run.variant == "base" and baseline:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(baseline), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "comfyui_lora2.bench.speed_worker", json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"{run.label} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def measure(
    runs: list[Run], repeats: int, seed: int, timeout: int, baseline: str | None = None
) -> dict[str, dict[str, Any]]:
    """Every run ``repeats`` times, each round in a fresh seeded order; per run all steps and memories."""
    from tqdm import tqdm

    samples: dict[str, dict[str, Any]] = {
        r.label: {"run": r, "step_s": [], "wall_s": [], "added_mb": [], "peak_mb": [], "allocated_mb": []} for r in runs
    }
    order = random.Random(seed)
    with tqdm(total=len(runs) * repeats, desc="train_speed", file=sys.stderr) as bar:
        for _ in range(repeats):
            for run in order.sample(runs, len(runs)):
                result = run_one(run, timeout, baseline)
                entry = samples[run.label]
                entry["step_s"] += result["step_s"]
                entry["wall_s"] += result["wall_s"]
                entry["added_mb"].append(result["added_mb"])
                entry["peak_mb"].append(result["peak_mb"])
                if result.get("allocated_mb") is not None:
                    entry["allocated_mb"].append(result["allocated_mb"])
                for passed_on in ("file_mb", "stored_dtypes"):  # per configuration, the same every run
                    if passed_on in result:
                        entry[passed_on] = result[passed_on]
                bar.update()
    return samples


def summarise(samples: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configuration: median step time, median added and peak memory (MB)."""
    out = {}
    for label, entry in samples.items():
        run: Run = entry["run"]
        out[label] = {
            "kind": f"{run.variant}:{run.kind}" if run.variant else run.kind,
            "model": run.model,
            "rank": run.rank,
            "step_s": statistics.median(entry["step_s"]),
            "wall_s": statistics.median(entry["wall_s"]),
            "steps_measured": len(entry["step_s"]),
            "added_mb": statistics.median(entry["added_mb"]),
            "peak_mb": statistics.median(entry["peak_mb"]),
            "allocated_mb": statistics.median(entry["allocated_mb"]) if entry["allocated_mb"] else None,
            **{key: entry[key] for key in ("file_mb", "stored_dtypes") if key in entry},
        }
    return out


MEMORY = "allocated_mb"
"""The memory the ratios read: peak allocated bytes (``torch.cuda.max_memory_allocated`` on a GPU, glibc's
count on CPU); ``added_mb``, the resident set's growth, is kept beside it (``rss_*`` ratios)."""


def _get(raw: dict, model: str, kind: str, rank: int | None = None) -> dict | None:
    for entry in raw.values():
        if entry["model"] == model and entry["kind"] == kind and (rank is None or entry["rank"] == rank):
            return entry
    return None


def _worst(values: list[float]) -> float | None:
    return round(max(values), 4) if values else None


def ratios(raw: dict[str, dict[str, Any]], models: list[str], ranks: list[int]) -> dict[str, float | None]:
    """The headline ratios (see the module docstring for which model and which rank each is read at)."""
    reference = max(models, key=lambda m: list(MODELS).index(m))

    def over_ranks(numerator: str, denominator: str, field: str = "step_s", model: str = reference) -> list[float]:
        values = []
        for rank in ranks:
            top = _get(raw, model, numerator, rank)
            bottom = _get(raw, model, denominator, None if denominator == "floor" else rank)
            if top and bottom and top[field] is not None and bottom[field]:
                values.append(top[field] / bottom[field])
        return values

    adaptive_vs_fixed = [
        value
        for model in models
        for targets in ("attn", "all")
        for value in over_ranks(f"lora2-{targets}", f"fixed-{targets}", model=model)
    ]
    room_vs_fixed = [
        value
        for model in models
        for targets in ("attn", "all")
        for value in over_ranks(f"room-{targets}", f"fixed-{targets}", model=model)
    ]
    stock, ours = _get(raw, reference, "apply_stock"), _get(raw, reference, "apply_lora2")
    return {
        "step_vs_native_all": _worst(over_ranks("lora2-all", "native")),
        "step_vs_native_attn": _worst(over_ranks("lora2-attn", "native")),
        "step_vs_floor_attn": _worst(over_ranks("lora2-attn", "floor")),
        "step_vs_floor_all": _worst(over_ranks("lora2-all", "floor")),
        "peak_mem_vs_native_all": _worst(over_ranks("lora2-all", "native", MEMORY)),
        "rss_vs_native_all": _worst(over_ranks("lora2-all", "native", "added_mb")),
        "adaptive_vs_fixed_max": _worst(adaptive_vs_fixed),
        "room_vs_fixed_max": _worst(room_vs_fixed),
        "apply_mem_over_stock_mb": _difference(ours, stock, MEMORY),
        "apply_rss_over_stock_mb": _difference(ours, stock, "added_mb"),
    }


def _difference(ours: dict | None, stock: dict | None, field: str) -> float | None:
    if not ours or not stock or ours[field] is None or stock[field] is None:
        return None
    return round(ours[field] - stock[field], 2)


def _mb(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def table(raw: dict[str, dict[str, Any]]) -> str:
    """One row per configuration, with its ratio to native and to the floor of its model."""
    rows = [
        "| configuration | step (s, CPU time on CPU) | ÷ native | ÷ floor | allocated (MB) | ÷ native "
        "| RSS added (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, entry in raw.items():
        native = _get(raw, entry["model"], "native", entry["rank"])
        floor = _get(raw, entry["model"], "floor")
        memory, rss = _mb(entry[MEMORY]), _mb(entry["added_mb"])
        if entry["kind"].startswith("apply"):
            rows.append(f"| {label} | {entry['step_s']:.3f} | | | {memory} | | {rss} (file {entry['file_mb']:.1f}) |")
            continue
        step_native = f"{entry['step_s'] / native['step_s']:.2f}" if native else ""
        step_floor = f"{entry['step_s'] / floor['step_s']:.2f}" if floor else ""
        mem_native = ""
        if native and native[MEMORY] and entry[MEMORY] is not None:
            mem_native = f"{entry[MEMORY] / native[MEMORY]:.2f}"
        step = f"{entry['step_s']:.3f}"
        rows.append(f"| {label} | {step} | {step_native} | {step_floor} | {memory} | {mem_native} | {rss} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    runs = plan(args)
    raw = summarise(measure(runs, args.repeats, args.seed, args.timeout, args.baseline))
    models = list(dict.fromkeys(r.model for r in runs))
    ranks = sorted({r.rank for r in runs if r.kind in ("native", *LORA2_KINDS)})
    result = {
        "ratios": ratios(raw, models, ranks),
        "raw": raw,
        "settings": {k: v for k, v in vars(args).items() if k != "timeout"},
    }
    print(table(raw))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
