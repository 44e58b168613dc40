"""The README quotes defaults; they must be the config dataclasses' (one source of truth, issue 8).

Every ``\\`field\\` (…value)`` in the README, where ``field`` is a field of ``LoRA2Config`` or
``TrainConfig``, must give that field's default (``2 %`` reads as 0.02), and the SD1.5 column of the
"Recommended settings" table must give the learning rate and ranks the node starts with.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from comfyui_lora2.lora2.config import LoRA2Config
from comfyui_lora2.lora2.train import TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"
NUMBER = r"[0-9][0-9.]*(?:e[+-]?[0-9]+)?"
QUOTED = re.compile(
    rf"(?:`(?P<name>[a-z_]+)`\s*\((?:[^()`]*?,\s*)?|\(`(?P<inner>[a-z_]+)`,\s*)(?P<value>{NUMBER})(?P<percent>\s*%)?\)"
)
"""`` `name` (10)``, `` `name` (2 %)``, `` `name` (k, 0.85)`` and ``(`name`, 0.9)``."""


def _defaults() -> dict[str, object]:
    fields = {}
    for config in (LoRA2Config(), TrainConfig()):
        fields.update({field.name: getattr(config, field.name) for field in dataclasses.fields(config)})
    return fields


def _text() -> str:
    return " ".join(README.read_text(encoding="utf-8").split())


def quoted_defaults(text: str) -> list[tuple[str, float]]:
    """(field, value) for every quoted default in ``text`` that names a config field."""
    fields = _defaults()
    found = []
    for match in QUOTED.finditer(text):
        name = match["name"] or match["inner"]
        if name in fields and isinstance(fields[name], (int, float)) and not isinstance(fields[name], bool):
            value = float(match["value"]) / (100.0 if match["percent"] else 1.0)
            found.append((name, value))
    return found


def test_the_parser_reads_each_spelling() -> None:
    text = "`growth_z` (4) and `growth_fade` (2 %) and (`growth_alignment`, 0.9) and `mass` (k, 0.85)"
    assert quoted_defaults(text) == [
        ("growth_z", 4.0),
        ("growth_fade", 0.02),
        ("growth_alignment", 0.9),
        ("mass", 0.85),
    ]


def test_every_default_the_readme_quotes_is_the_dataclass_default() -> None:
    quoted = quoted_defaults(_text())
    names = {name for name, _ in quoted}
    # the rank-control section and the API table quote these; a README that stops quoting them fails too
    evidence_rule = {"decide_every", "growth_z", "growth_fade", "growth_patience", "shrink_ratio", "shrink_floor"}
    assert evidence_rule | {"shrink_horizon"} <= names
    assert {"mass", "alpha", "prior_strength"} <= names
    fields = _defaults()
    wrong = [(name, value, fields[name]) for name, value in quoted if value != pytest.approx(float(fields[name]))]
    assert not wrong, f"README quotes (field, value, actual default): {wrong}"


def test_the_recommended_sd15_column_is_where_the_node_starts() -> None:
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4:
            rows[cells[0]] = cells[1]
    assert float(rows["learning rate"]) == pytest.approx(TrainConfig().lr)
    config = LoRA2Config()
    assert rows["init rank / max rank"] == f"{config.init_rank} / {config.max_rank}"
