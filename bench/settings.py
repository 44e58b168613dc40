"""``--set lora2.FIELD=VALUE`` / ``--set train.FIELD=VALUE``: ablations on any config field.

The benchmarks train with the dataclass defaults of :class:`~lora2.config.LoRA2Config` and
:class:`~lora2.train.TrainConfig` (the node's defaults, which are being tuned), so they never name a
learning rate or a prior themselves; this flag is how a run changes one. Values are parsed as JSON
when they parse (``1e-3``, ``true``, ``[1, 2]``, ``"text"``) and kept as strings otherwise (``adamw``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..lora2.config import LoRA2Config
from ..lora2.errors import LoRA2Error
from ..lora2.train import TrainConfig

SCOPES = {"lora2": LoRA2Config, "train": TrainConfig}
RESERVED = {"train": {"steps": "--steps"}}
"""Fields the benchmark sets from its own flags; ``--set`` pointing at them names the flag to use."""


@dataclass
class Overrides:
    """Field values from ``--set``, per dataclass."""

    lora2: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"lora2": dict(self.lora2), "train": dict(self.train)}


def parse_value(text: str) -> Any:
    """JSON when it parses, else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_settings(items: list[str] | None) -> Overrides:
    """``["lora2.alpha=8", "train.lr=3e-4"]`` → :class:`Overrides`; bad items raise naming ``--set``."""
    overrides = Overrides()
    for item in items or []:
        key, sep, raw = item.partition("=")
        scope, dot, name = key.strip().partition(".")
        if not sep or not dot or scope not in SCOPES:
            raise LoRA2Error(f"--set {item!r}: expected lora2.FIELD=VALUE or train.FIELD=VALUE")
        known = {f.name for f in dataclasses.fields(SCOPES[scope])}
        if name not in known:
            raise LoRA2Error(f"--set {item!r}: {SCOPES[scope].__name__} has no field {name!r}; known: {sorted(known)}")
        if name in RESERVED.get(scope, {}):
            raise LoRA2Error(f"--set {item!r}: use {RESERVED[scope][name]} for that")
        getattr(overrides, scope)[name] = parse_value(raw.strip())
    return overrides


def lora2_config(overrides: dict[str, Any] | None = None, **fixed: Any) -> LoRA2Config:
    """A :class:`LoRA2Config` at its defaults, plus the benchmark's ``fixed`` fields and ``overrides``."""
    return _build(LoRA2Config, "lora2", {**fixed, **(overrides or {})})


def train_config(overrides: dict[str, Any] | None = None, **fixed: Any) -> TrainConfig:
    """A :class:`TrainConfig` at its defaults, plus the benchmark's ``fixed`` fields and ``overrides``."""
    return _build(TrainConfig, "train", {**fixed, **(overrides or {})})


def _build(cls: type, scope: str, values: dict[str, Any]) -> Any:
    try:
        return cls(**values)
    except (TypeError, LoRA2Error) as exc:
        raise LoRA2Error(f"--set {scope}.*: {exc}") from exc


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """The repeatable ``--set SCOPE.FIELD=VALUE`` flag, as every training benchmark spells it."""
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="SCOPE.FIELD=VALUE",
        help="override a LoRA2Config (lora2.*, LoRA² only) or TrainConfig (train.*, every method) field; repeatable",
    )


def method_progress(total: int) -> tuple[Any, Callable[[str], None]]:
    """A tqdm bar over every method's steps, and the per-step callback that names the method training."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="step", mininterval=1.0, file=sys.stderr)

    def update(method: str) -> None:
        if bar.desc != method:
            bar.set_description(method)
        bar.update(1)

    return bar, update


def parse_fixed(text: str) -> tuple[int, ...]:
    """``--fixed 4,16`` → the extra fixed-rank baselines; errors name the flag."""
    try:
        ranks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise LoRA2Error(f"--fixed {text!r}: expected comma-separated ranks such as 4,16") from None
    if any(rank < 1 for rank in ranks):
        raise LoRA2Error(f"--fixed {text!r}: ranks must be at least 1")
    return ranks


def parse_training_bench_args(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, tuple[int, ...], Overrides]:
    """One thread, parsed flags, and the checked ``--steps``/``--fixed``/``--set`` every training bench takes."""
    import os

    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    try:
        return args, parse_fixed(args.fixed), parse_settings(args.settings)
    except LoRA2Error as exc:
        parser.error(str(exc))


def run_training_bench(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    total_steps: Callable[[argparse.Namespace, tuple[int, ...], Overrides], int],
    run: Callable[..., dict],
    format_table: Callable[[dict], str],
    json_line: Callable[[dict], str],
) -> dict:
    """A training benchmark's ``main``: the checked flags (:func:`parse_training_bench_args`), a progress bar
    over ``total_steps(args, fixed, overrides)`` steps, ``run(args, fixed, overrides, update, log)`` (``log``
    writes to stderr), then the table and, as the last line, the JSON record; returns the results.

    A :class:`LoRA2Error` from ``run`` (an input found wrong while running) ends as a usage error naming it.
    """
    args, fixed, overrides = parse_training_bench_args(parser, argv)
    bar, update = method_progress(total_steps(args, fixed, overrides))
    try:
        results = run(args, fixed, overrides, update, lambda message: print(message, file=sys.stderr))
    except LoRA2Error as exc:
        bar.close()
        parser.error(str(exc))
    bar.close()
    print(format_table(results))
    print(json_line(results))
    return results
