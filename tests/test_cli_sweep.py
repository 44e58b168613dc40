"""lora2-train sweep: a queue of jobs over processes under ``accelerate launch``, restartable after a kill.

* Two CPU processes (``accelerate launch --multi_gpu --num_processes 2``; on CPU accelerate's ``--cpu``
  starts one process unless MPI is set up) run a 4-job sweep: every job is started and finished exactly
  once, process ``i`` takes jobs ``i, i+2``, and the table has a row per subject and method.
* A sweep killed (SIGKILL) after its first job and started again redoes only the unfinished jobs: the
  finished one is neither started again nor touched, and no partial folder is left. With the evaluation
  models present the table gains DINO / CLIP-I / CLIP-T.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SETTINGS = ["--steps", "2", "--resolution", "64", "--dtype", "float32", "--init-rank", "2", "--max-rank", "8"]
JOBS = {"a__lora2__seed0", "a__r2__seed0", "b__lora2__seed0", "b__r2__seed0"}


@pytest.fixture(scope="module")
def sweep_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from comfyui_lora2.devtools.tiny_eval_models import save_tiny_eval_models
    from comfyui_lora2.devtools.tiny_pipelines import save_tiny_pipeline, write_subject

    root = tmp_path_factory.mktemp("sweep_inputs")
    save_tiny_eval_models(root / "eval")
    return {
        "model": save_tiny_pipeline(root / "model", "sd15"),
        "a": write_subject(root / "a", seed=1),
        "b": write_subject(root / "b", seed=2),
        "eval": root / "eval",
    }


def sweep_args(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    subjects = ["--subjects", f"a={inputs['a']}", f"b={inputs['b']}", "--methods", "lora2", "r2"]
    return ["sweep", "--model", str(inputs["model"]), "--output", str(out), *subjects, *SETTINGS, *extra]


def ledger(out: Path) -> list[tuple[str, str, int]]:
    """``(event, job, process)`` per line of jobs.log."""
    lines = (out / "jobs.log").read_text(encoding="utf-8").splitlines() if (out / "jobs.log").exists() else []
    return [(p[1], p[2], int(p[3].removeprefix("process="))) for p in (line.split() for line in lines)]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_two_processes_finish_every_job_exactly_once(sweep_inputs, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    result = subprocess.run(
        [*launch, "-m", "comfyui_lora2.cli", *sweep_args(sweep_inputs, out)],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    events = ledger(out)
    order = sorted(JOBS, key=["a__lora2__seed0", "a__r2__seed0", "b__lora2__seed0", "b__r2__seed0"].index)
    for index, job in enumerate(order):
        assert [(e, p) for e, j, p in events if j == job] == [("start", index % 2), ("done", index % 2)], job
    assert {p.name for p in (out / "jobs").iterdir()} == {*JOBS, ".partial"}
    assert not any((out / "jobs" / ".partial").iterdir())
    table = json.loads((out / "summary.json").read_text())["rows"]
    assert [(r["subject"], r["method"], r["n"]) for r in table] == [
        ("a", "lora2", 1),
        ("a", "r2", 1),
        ("b", "lora2", 1),
        ("b", "r2", 1),
    ]
    runs = {job: json.loads((out / "jobs" / job / "run.json").read_text()) for job in JOBS}
    assert runs["a__r2__seed0"]["mean_rank"] == 2 and runs["a__r2__seed0"]["lora2"]["adaptive"] is False
    assert all((out / "jobs" / job / f"{job}.safetensors").is_file() for job in JOBS)
    assert "| a | lora2 | 1 |" in (out / "summary.md").read_text()


def test_killed_sweep_redoes_only_unfinished_jobs(sweep_inputs, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "comfyui_lora2.cli", *sweep_args(sweep_inputs, out)]
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not any(e == "done" for e, _, _ in ledger(out)) and process.poll() is None:
            assert time.monotonic() < deadline, "the first job never finished"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    finished = {p.name for p in (out / "jobs").iterdir() if p.name != ".partial"}
    assert finished and finished != JOBS, "the kill has to leave unfinished jobs (the jobs ran too fast)"
    stamps = {job: (out / "jobs" / job / "run.json").stat().st_mtime_ns for job in finished}
    before = len(ledger(out))

    evaluation = ["--eval-models", str(sweep_inputs["eval"]), "--eval-images", "1", "--eval-steps", "2"]
    result = subprocess.run(
        [*command, *evaluation, "--eval-size", "64"], env=environment(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    again = ledger(out)[before:]
    assert {j for e, j, _ in again if e == "start"} == JOBS - finished
    assert sorted(j for e, j, _ in again if e == "done") == sorted(JOBS - finished)
    assert {p.name for p in (out / "jobs").iterdir()} == {*JOBS, ".partial"}
    assert not any((out / "jobs" / ".partial").iterdir())  # the killed job's partial folder is cleared
    assert {job: (out / "jobs" / job / "run.json").stat().st_mtime_ns for job in finished} == stamps
    redone = json.loads((out / "jobs" / sorted(JOBS - finished)[0] / "run.json").read_text())
    assert set(redone["eval"]) == {"dino", "clip_i", "clip_t"}
    assert "DINO" in (out / "summary.md").read_text() and "DINO" in result.stdout
