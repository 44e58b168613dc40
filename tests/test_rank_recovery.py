"""bench/rank_recovery.py: a short teacher–student run whose learned ranks must order the planted ones."""

from __future__ import annotations

import json

import pytest
import torch

from comfyui_lora2.bench import rank_recovery
from comfyui_lora2.bench.teacher import adapted_layer_names, build_stack, make_teacher


@pytest.mark.parametrize("seed", [0, 1])
def test_learned_ranks_follow_planted_ranks(seed: int) -> None:
    planted = [1, 3, 6, 12]
    results = rank_recovery.run(
        planted, dim=64, seed=seed, steps=800, heads=2, max_rank=32, fixed_ranks=(12,), supervision="blocks"
    )
    learned = results["learned"]
    assert learned == sorted(learned) and len(set(learned)) == len(learned), learned
    assert results["spearman"] == pytest.approx(1.0)
    for p, r in zip(planted, learned, strict=True):
        assert p / 1.5 <= r <= 1.5 * p + 2, (planted, learned)
    lora2, fixed = results["methods"]["lora2"], results["methods"]["lora_r12"]
    assert lora2["rel_mse"] <= fixed["rel_mse"] + 0.005
    assert lora2["params"] < fixed["params"]


def test_teacher_plants_the_requested_ranks() -> None:
    base = build_stack(32, 4, heads=2, seed=0)
    teacher, planted = make_teacher(base, [1, 2, 5, 3], seed=0)
    assert (
        list(planted) == adapted_layer_names(4) == ["blocks.0.fc", "blocks.1.attn.to_v", "blocks.2.fc", "blocks.3.fc"]
    )
    modules, base_modules = dict(teacher.named_modules()), dict(base.named_modules())
    for (name, delta), rank in zip(planted.items(), [1, 2, 5, 3], strict=True):
        assert int(torch.linalg.matrix_rank(delta)) == rank
        torch.testing.assert_close(modules[name].weight - base_modules[name].weight, delta)


def test_cli_prints_a_table_and_a_json_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    rank_recovery.main(["--true-ranks", "1,2,4", "--dim", "32", "--steps", "30", "--max-rank", "8"])
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["planted"] == [1, 2, 4] and len(summary["learned"]) == 3
    assert set(summary["methods"]) == {"lora2", "lora_r4", "lora_r16", "lora_r64"}
    assert all({"rel_mse", "params"} <= set(m) for m in summary["methods"].values())
    assert any(line.startswith("spearman(planted, learned)") for line in lines)


def test_cli_refuses_ranks_out_of_range() -> None:
    with pytest.raises(SystemExit):
        rank_recovery.main(["--true-ranks", "0,4", "--dim", "32"])


def test_reset_moments_ablation_runs_beside_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    rank_recovery.main(
        ["--true-ranks", "1,4", "--dim", "32", "--steps", "40", "--max-rank", "8", "--ablation-reset-moments"]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["methods"]) == {"lora2", "lora_r4", "lora_r16", "lora_r64", "lora2_reset_moments"}
    assert len(summary["learned"]) == 2


def test_sweep_reports_every_run_and_the_acceptance_band(capsys: pytest.CaptureFixture[str]) -> None:
    from comfyui_lora2.bench import rank_recovery_sweep as sweep

    assert sweep.planted_for(0) == [1, 2, 4, 8, 16, 32]
    assert all(1 <= r <= 32 for r in sweep.planted_for(3)) and len(sweep.planted_for(3)) == 6
    assert sweep.within_bounds([1, 8, 32], [2, 10, 50]) and not sweep.within_bounds([8], [15])
    summary = sweep.main(["--runs", "2", "--steps", "30", "--dim", "64"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["runs"] == 2 and len(last["rows"]) == 2 == summary["runs"]
    assert {"min_spearman", "all_within_bounds", "max_rel_mse"} <= set(last)
