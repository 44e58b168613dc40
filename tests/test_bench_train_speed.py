"""The speed benchmark runs end to end and reports what the README and issue 13 read from it.

No timing is asserted (the CI machines are shared and noisy): the test checks that every configuration
ran in its own process and produced a step time and a memory figure, and that the last line has the
ratios the targets are stated in. ``--quick`` keeps it to the tiny model, rank 8, two steps.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfyui_lora2.bench import gpu_check
from comfyui_lora2.devtools.layout import MISSING_HOST_REASON, host_available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON)]

RATIOS = {
    "step_vs_native_all",
    "step_vs_native_attn",
    "step_vs_floor_attn",
    "step_vs_floor_all",
    "peak_mem_vs_native_all",
    "adaptive_vs_fixed_max",
    "room_vs_fixed_max",
    "apply_mem_over_stock_mb",
    "rss_vs_native_all",
    "apply_rss_over_stock_mb",
}
KINDS = {"floor", "native", "lora2-attn", "lora2-all", "fixed-attn", "fixed-all", "apply_stock", "apply_lora2"}
KINDS |= {"room-attn", "room-all"}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """The workers' temporary folder (``TMPDIR``): what they leave there is checked below."""
    return tmp_path_factory.mktemp("speed_tmp")


@pytest.fixture(scope="module")
def quick_run(scratch: Path) -> tuple[str, dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(scratch))
    proc = subprocess.run(
        [sys.executable, "-m", "comfyui_lora2.bench.train_speed", "--quick", "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    return proc.stdout, json.loads(lines[-1])


def test_last_line_has_every_ratio_as_a_finite_number(quick_run) -> None:
    _, result = quick_run
    assert set(result["ratios"]) == RATIOS
    for name, value in result["ratios"].items():
        assert isinstance(value, float) and math.isfinite(value), (name, value)
    assert result["settings"]["seed"] == 3 and result["settings"]["quick"] is True


def test_every_configuration_measured_once_with_time_and_memory(quick_run) -> None:
    _, result = quick_run
    raw = result["raw"]
    assert {entry["kind"] for entry in raw.values()} == KINDS
    for label, entry in raw.items():
        assert entry["model"] == "tiny", label
        assert entry["step_s"] > 0 and entry["wall_s"] > 0, label
        assert entry["peak_mb"] > 0, label
        expected = 1 if entry["kind"].startswith("apply") else 2
        assert entry["steps_measured"] == expected, label
    assert raw["tiny apply_lora2 r32"]["file_mb"] > 0


def test_ratios_are_read_from_the_raw_numbers(quick_run) -> None:
    _, result = quick_run
    raw, ratios = result["raw"], result["ratios"]
    native = raw["tiny native r8"]
    assert ratios["step_vs_native_all"] == pytest.approx(raw["tiny lora2-all r8"]["step_s"] / native["step_s"], 1e-3)
    assert ratios["step_vs_floor_attn"] == pytest.approx(
        raw["tiny lora2-attn r8"]["step_s"] / raw["tiny floor"]["step_s"], 1e-3
    )
    assert ratios["peak_mem_vs_native_all"] == pytest.approx(
        raw["tiny lora2-all r8"]["allocated_mb"] / native["allocated_mb"], 1e-3
    )
    assert ratios["rss_vs_native_all"] == pytest.approx(raw["tiny lora2-all r8"]["added_mb"] / native["added_mb"], 1e-3)
    fixed = [raw[f"tiny lora2-{t} r8"]["step_s"] / raw[f"tiny fixed-{t} r8"]["step_s"] for t in ("attn", "all")]
    assert ratios["adaptive_vs_fixed_max"] == pytest.approx(max(fixed), 1e-3)
    room = [raw[f"tiny room-{t} r8"]["step_s"] / raw[f"tiny fixed-{t} r8"]["step_s"] for t in ("attn", "all")]
    assert ratios["room_vs_fixed_max"] == pytest.approx(max(room), 1e-3)
    stock, ours = raw["tiny apply_stock r32"], raw["tiny apply_lora2 r32"]
    assert ratios["apply_mem_over_stock_mb"] == pytest.approx(ours["allocated_mb"] - stock["allocated_mb"], abs=0.01)
    assert ratios["apply_rss_over_stock_mb"] == pytest.approx(ours["added_mb"] - stock["added_mb"], abs=0.01)


def test_allocated_memory_is_measured_and_below_the_resident_growth(quick_run) -> None:
    """glibc's in-use count of the tracked step: positive, and (the RSS also holds the allocator's
    slack and what the first steps touched) never above the resident set's growth by more than noise."""
    _, result = quick_run
    for label, entry in result["raw"].items():
        assert entry["allocated_mb"] is not None and entry["allocated_mb"] > 0, label
    for kind in ("floor", "native r8", "lora2-all r8"):
        entry = result["raw"][f"tiny {kind}"]
        assert entry["allocated_mb"] < entry["added_mb"] + 2.0, (kind, entry)


def test_workers_leave_no_temporary_folders(quick_run, scratch: Path) -> None:
    left = sorted(p.name for p in scratch.iterdir() if p.name.startswith("lora2_"))
    assert left == []


def test_table_precedes_the_json_line(quick_run) -> None:
    stdout, result = quick_run
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("| configuration |")
    for label in result["raw"]:
        assert any(line.startswith(f"| {label} |") for line in lines[:-1]), label


def test_gpu_check_runs_its_bf16_checkpointed_path_on_cpu() -> None:
    """The GPU script's own path (bf16 weights and compute, checkpointing, its table) on the tiny model."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "comfyui_lora2.bench.gpu_check",
            "--device",
            "cpu",
            "--models",
            "tiny",
            "--ranks",
            "4",
            "--latent-side",
            "8",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--kinds",
            f"{gpu_check.KINDS},room-all",  # room-all: a block ending in an adapted layer, checkpointed
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("device: CPU")
    result = json.loads(lines[-1])
    kinds = {"floor", "native", "lora2-attn", "lora2-all", "room-attn", "room-all"}  # room: the sketch at work
    assert {entry["kind"] for entry in result["raw"].values()} == kinds
    assert all(entry["step_s"] > 0 and entry["peak_mb"] > 0 for entry in result["raw"].values())
    assert math.isfinite(result["ratios"]["step_vs_native_all"])
    for kind in ("native r4", "lora2-all r4", "floor"):
        assert any(line.startswith(f"| tiny | {kind} |") for line in lines), kind


def test_lora2_trains_on_an_fp8_stored_base_without_widening_it() -> None:
    """Flux users load fp8 checkpoints: LoRA² Train must run on them with ComfyUI casting per layer,
    leaving the stored weights in fp8 (a float32 copy of the base would cost 4× its memory)."""
    run = ["--models", "tiny", "--ranks", "4", "--steps", "1", "--warmup", "1", "--repeats", "1"]
    setup = ["--kinds", "lora2-all", "--latent-side", "8", "--weights", "float8_e4m3fn", "--compute", "bfloat16"]
    proc = subprocess.run(
        [sys.executable, "-m", "comfyui_lora2.bench.train_speed", *run, *setup],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads(proc.stdout.strip().splitlines()[-1])["raw"]["tiny lora2-all r4"]
    assert entry["step_s"] > 0
    assert entry["stored_dtypes"] == ["float8_e4m3fn"]
