"""What a sweep runs and what is already done: subjects × methods × seeds as a fixed, numbered job list.

Why a fixed list and a static split (process ``i`` of ``N`` takes jobs ``i, i+N, …``): every process
computes the same list from the same settings, so no process has to hand out work, and a restart with
the same settings gives every unfinished job to a process again. Why a job is done exactly when its
folder exists: a job trains into ``jobs/.partial/<job>-<pid>/`` and the finished folder is renamed to
``jobs/<job>/`` in one ``rename`` (atomic on one file system), so a killed job leaves only a partial
folder, which its owner clears before training that job again, and a finished one is never redone.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..lora2.config import LoRA2Config
from ..lora2.errors import LoRA2Error

DEFAULT_METHODS = ("lora2", "r4", "r16", "r64", "r128")
"""The paper's comparison: LoRA² against fixed-rank LoRA at ranks 4, 16, 64 and 128."""
_FIXED = re.compile(r"^r(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PARTIAL = ".partial"
LEDGER = "jobs.log"


@dataclass(frozen=True)
class Subject:
    """One subject: a dataset folder and how its captions and evaluation prompts read."""

    name: str
    data: Path
    trigger: str | None = None
    """None: the sweep's --trigger."""
    caption_template: str | None = None


@dataclass(frozen=True)
class Job:
    index: int
    subject: Subject
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.subject.name}__{self.method}__seed{self.seed}"


def check_name(name: str, what: str) -> str:
    if not _NAME.match(name) or "__" in name:
        raise LoRA2Error(f"{what} {name!r} must be letters, digits, '_', '-', '.' (no '__', no leading dot)")
    return name


def parse_subject(text: str) -> Subject:
    """``name=folder`` (a command-line subject)."""
    name, sep, folder = text.partition("=")
    if not sep or not folder.strip():
        raise LoRA2Error(f"subject {text!r} must be NAME=FOLDER, e.g. dog=datasets/dog")
    return Subject(check_name(name.strip(), "subject name"), Path(folder.strip()).expanduser())


def subject_from_table(table: dict, source: str) -> Subject:
    """A ``[[subjects]]`` table of a TOML file: ``name``, ``data``, optional ``trigger``, ``caption_template``."""
    known = {"name", "data", "trigger", "caption_template"}
    unknown = sorted(set(table) - known)
    if unknown or "name" not in table or "data" not in table:
        raise LoRA2Error(
            f"{source}: each [[subjects]] needs name and data (optional: trigger, caption_template); "
            f"got {sorted(table)}"
        )
    return Subject(
        check_name(str(table["name"]), "subject name"),
        Path(str(table["data"])).expanduser(),
        table.get("trigger"),
        table.get("caption_template"),
    )


def method_config(method: str, base: LoRA2Config) -> LoRA2Config:
    """``lora2``: the base settings, adaptive; ``rN``: fixed-rank LoRA at N (same code path, ``adaptive=False``)."""
    if method == "lora2":
        return dataclasses.replace(base, adaptive=True)
    match = _FIXED.match(method)
    if match is None or int(match.group(1)) < 1:
        raise LoRA2Error(f"method {method!r} is not lora2 or rN (fixed rank N, e.g. r16)")
    rank = int(match.group(1))
    return dataclasses.replace(base, adaptive=False, init_rank=rank, max_rank=max(rank, base.max_rank))


def plan(subjects: list[Subject], methods: list[str], seeds: list[int]) -> list[Job]:
    """Every job, numbered in a fixed order: subject, then method, then seed."""
    if not subjects:
        raise LoRA2Error("the sweep has no subjects; pass --subjects NAME=FOLDER ... or [[subjects]] in --config")
    names = [s.name for s in subjects]
    if len(set(names)) != len(names):
        raise LoRA2Error(f"subject names must differ, got {names}")
    for method in methods:
        method_config(method, LoRA2Config())
    combos = [(s, m, seed) for s in subjects for m in methods for seed in seeds]
    return [Job(index, s, m, seed) for index, (s, m, seed) in enumerate(combos)]


def shard(jobs: list[Job], process_index: int, num_processes: int) -> list[Job]:
    """Process ``i`` of ``N`` takes jobs ``i, i+N, i+2N, …``."""
    return jobs[process_index::num_processes]


def job_folder(root: Path, job: Job) -> Path:
    return Path(root) / "jobs" / job.name


def is_done(root: Path, job: Job) -> bool:
    return (job_folder(root, job) / "run.json").is_file()


def fresh_partial(root: Path, job: Job) -> Path:
    """An empty folder for ``job`` to train into; partial folders an earlier, killed try left are removed."""
    partial = Path(root) / "jobs" / PARTIAL
    partial.mkdir(parents=True, exist_ok=True)
    for stale in partial.glob(f"{job.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    folder = partial / f"{job.name}-{os.getpid()}"
    folder.mkdir()
    return folder


def publish(root: Path, job: Job, partial: Path) -> Path:
    """Make the finished ``partial`` folder the job's folder in one rename."""
    final = job_folder(root, job)
    if final.exists():
        raise LoRA2Error(f"'{final}' exists already; two sweeps are writing into '{root}' at once")
    os.rename(partial, final)
    return final


def record(root: Path, event: str, job: Job, process_index: int) -> None:
    """One line in ``jobs.log`` (appended; lines from several processes never interleave within a line)."""
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {event} {job.name} process={process_index} pid={os.getpid()}\n"
    descriptor = os.open(Path(root) / LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(descriptor, line.encode())
    finally:
        os.close(descriptor)
