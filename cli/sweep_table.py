"""The sweep's table: per subject and method, size, rank, loss and (with evaluation models) DINO / CLIP-I / CLIP-T.

Read from the finished jobs' ``run.json`` files only, so any process can (re)write it at any time and
the table is always exactly what is on disk; values are means over the seeds done (``n`` says how many).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .sweep_plan import Job, job_folder

COLUMNS = (
    ("adapter_mb", "MB", "{:.2f}"),
    ("mean_rank", "mean rank", "{:.2f}"),
    ("final_loss", "final loss", "{:.4f}"),
    ("final_eval_loss", "eval loss", "{:.4f}"),
    ("dino", "DINO", "{:.3f}"),
    ("clip_i", "CLIP-I", "{:.3f}"),
    ("clip_t", "CLIP-T", "{:.3f}"),
)
"""``(key in a row, header, format)``: the paper's table columns."""


def read_run(root: Path, job: Job) -> dict[str, Any] | None:
    path = job_folder(root, job) / "run.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def rows(root: Path, jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """One row per (subject, method) in job order, averaged over its finished seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for job in jobs:
        groups.setdefault((job.subject.name, job.method), [])
        run = read_run(root, job)
        if run is not None:
            groups[(job.subject.name, job.method)].append({**run, **(run.get("eval") or {})})
    table = []
    for (subject, method), runs in groups.items():
        row: dict[str, Any] = {"subject": subject, "method": method, "n": len(runs)}
        for key, _, _ in COLUMNS:
            row[key] = _mean([run.get(key) for run in runs])
        table.append(row)
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    """The table as Markdown; columns nobody has (no evaluation models) are left out."""
    shown = [c for c in COLUMNS if any(row[c[0]] is not None for row in table)]
    header = ["subject", "method", "n", *(title for _, title, _ in shown)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in table:
        cells = [row["subject"], row["method"], str(row["n"])]
        cells += ["–" if row[key] is None else fmt.format(row[key]) for key, _, fmt in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
