"""Issue 10: a soak run, train -> inspect -> prune -> save many times in one process, nothing piles up.

Bound: after a warm-up (first allocations, ComfyUI's caches, torch's allocator pools), the resident
memory may grow by at most 64 MB and the open file descriptors by at most 2 over the remaining cycles;
a leak of one adapter, dataset or open safetensors file per cycle would exceed both.
"""

from __future__ import annotations

import gc
import os
import resource
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from comfyui_lora2.devtools.comfy_host import ComfyHost, run_prompt
from comfyui_lora2.devtools.layout import MISSING_HOST_REASON, host_available
from comfyui_lora2.devtools.prompts import lora2_dataset, lora2_save, lora2_train

pytest_plugins = ["support.fixtures"]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON)]

CYCLES = int(os.environ.get("LORA2_SOAK_CYCLES", "50"))
WARMUP = 5
MEMORY_BOUND_MB = 64.0
FILES_BOUND = 2


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 1e6


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def _prompt(cycle: int) -> dict:
    return {
        "model": {"class_type": "TestTinyModel", "inputs": {"family": "sd15", "seed": 0}},
        "vae": {"class_type": "TestTinyVAE", "inputs": {"family": "sd15", "seed": 0}},
        "cond": {"class_type": "TestRandomConditioning", "inputs": {"family": "sd15", "seed": 1, "batch": 1}},
        "dataset": lora2_dataset(["vae", 0], ["cond", 0], folder="soak"),
        "train": lora2_train(["model", 0], ["dataset", 0], steps=2, seed=cycle),
        "heatmap": {
            "class_type": "LoRA2Heatmap",
            "inputs": {"adapter": ["train", 1], "lora_name": "none", "width": 512, "title": ""},
        },
        "prune": {
            "class_type": "LoRA2Prune",
            "inputs": {"adapter": ["train", 1], "lora_name": "none", "policy": "importance mass", "value": 0.9},
        },
        "save": lora2_save(["prune", 0], "soak/adapter", precision="float16", overwrite=True),
    }


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux) to measure memory")
def test_soak_train_inspect_prune_save(comfy_host: ComfyHost) -> None:
    folder = comfy_host.base_dir / "input" / "soak"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(2):
        pixels = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(index)) * 255).to(torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")
    started = time.perf_counter()
    for cycle in range(CYCLES):
        run_prompt(_prompt(cycle)).raise_for_failure()
        gc.collect()  # ComfyUI's prompt worker collects between prompts too; what survives it is a leak
        if os.environ.get("LORA2_SOAK_TRACE"):
            print(f"cycle {cycle}: RSS {_rss_mb():.1f} MB, open files {_open_files()}")
        if cycle == WARMUP - 1:
            memory, files = _rss_mb(), _open_files()
    grown_mb, grown_files = _rss_mb() - memory, _open_files() - files
    seconds = time.perf_counter() - started
    print(f"soak: {CYCLES} cycles in {seconds:.1f} s, RSS +{grown_mb:.1f} MB, open files +{grown_files}")
    assert grown_mb <= MEMORY_BOUND_MB, f"resident memory grew {grown_mb:.1f} MB over {CYCLES - WARMUP} cycles"
    assert grown_files <= FILES_BOUND, f"{grown_files} more open files after {CYCLES - WARMUP} cycles"
    saved = list((comfy_host.base_dir / "models" / "loras" / "soak").iterdir())
    assert [p.name for p in saved] == ["adapter.safetensors"]  # overwrite on: one file, no temporaries left
