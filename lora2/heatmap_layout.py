"""The rank table behind the heatmap: one row per block in model order, one column per layer type.

:func:`layout` places component names (rules in :mod:`lora2.heatmap_names`); :func:`build_rank_table`
fills the cells of an :class:`~lora2.adapter.Adapter` with ranks and, per component, the effective
ranks at 90 % and 99 % of the singular-value energy of ΔW. The energy ranks say how much of a
component's width actually carries the update: a plain rank-64 LoRA whose ``e90`` is 6 could be pruned
to a tenth with little loss, and for a LoRA² adapter they show how close the learned width is to the
spectrum. They come from the SVD through the factors (:func:`lora2.spectrum.factor_svd`), which costs
``O((in + out)·r²)`` per component, so they are computed for every adapter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .adapter import Adapter
from .errors import LoRA2Error
from .heatmap_names import COLUMN_ORDER, Place, place, split_name
from .spectrum import energy_rank, factor_svd

Cell = tuple[str, str]
"""(row label, column label)."""


@dataclass
class Layout:
    """Rows and columns in display order and the cell of every component name."""

    rows: list[str]
    columns: list[str]
    cells: dict[str, Cell]
    """component name -> (row, column)."""
    row_groups: list[str]
    """Group of each row (parallel to ``rows``): ``in``, ``mid``, ``out``, ``double``, ``te1`` ..."""


def _natural(text: str) -> tuple:
    """Sort key that orders ``a2`` before ``a10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def layout(names: Iterable[str]) -> Layout:
    """Place every name; two names that claim one cell keep the first there and send the second to ``other``."""
    names = list(names)
    has_single = any(split_name(n)[1][:1] == ["single_transformer_blocks"] for n in names)
    double_label = "double" if has_single else "block"
    places: dict[str, Place] = {}
    taken: set[Cell] = set()
    for name in names:
        found = place(name, double_label)
        if (found.row, found.column) in taken:
            found = Place("other", name, (2, "", ()), "other")
        taken.add((found.row, found.column))
        places[name] = found
    row_order: dict[str, tuple] = {}
    groups: dict[str, str] = {}
    for found in places.values():
        key = (found.order, _natural(found.row))
        if found.row not in row_order or key < row_order[found.row]:
            row_order[found.row], groups[found.row] = key, found.group
    rows = sorted(row_order, key=row_order.__getitem__)
    known = {column: i for i, column in enumerate(COLUMN_ORDER)}
    columns = sorted(
        {found.column for found in places.values()},
        key=lambda c: (known.get(c, len(known)), _natural(c)),
    )
    return Layout(
        rows=rows,
        columns=columns,
        cells={name: (found.row, found.column) for name, found in places.items()},
        row_groups=[groups[row] for row in rows],
    )


@dataclass
class RankTable:
    """What the heatmap shows: ranks per (row, column) cell, effective ranks, and adapter totals."""

    rows: list[str]
    columns: list[str]
    cells: dict[Cell, int]
    energy90: dict[Cell, int] = field(default_factory=dict)
    """Effective rank at 90 % of ΔW's singular-value energy (see :func:`lora2.spectrum.energy_rank`)."""
    energy99: dict[Cell, int] = field(default_factory=dict)
    components: dict[Cell, str] = field(default_factory=dict)
    """Which component each cell shows."""
    row_groups: list[str] = field(default_factory=list)
    parameters: int = 0
    """Trainable parameters of the adapter (both factors of every component)."""
    megabytes: float = 0.0
    """Size of the exported weights in fp16 (2 bytes per parameter)."""
    base_model: str = "unknown"

    @property
    def mean_rank(self) -> float:
        return sum(self.cells.values()) / len(self.cells) if self.cells else 0.0

    @property
    def max_rank(self) -> int:
        return max(self.cells.values(), default=0)

    @property
    def min_rank(self) -> int:
        return min(self.cells.values(), default=0)

    def totals(self) -> dict[str, Any]:
        return {
            "components": len(self.cells),
            "parameters": self.parameters,
            "megabytes_fp16": round(self.megabytes, 6),
            "mean_rank": round(self.mean_rank, 4),
            "max_rank": self.max_rank,
        }

    def summary(self) -> str:
        """One line of totals (the heatmap's title line uses it too)."""
        parameters = f"{self.parameters / 1e6:.2f} M" if self.parameters >= 1e6 else f"{self.parameters:,}"
        megabytes = f"{self.megabytes:.0f}" if self.megabytes >= 100 else f"{self.megabytes:.3g}"
        return (
            f"{self.base_model} · {len(self.cells)} components · {parameters} parameters · "
            f"{megabytes} MB (fp16) · mean rank {self.mean_rank:.1f} · max rank {self.max_rank}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: rows, columns, one entry per filled cell, totals."""
        cells = []
        for row in self.rows:
            for column in self.columns:
                if (row, column) in self.cells:
                    cell = (row, column)
                    cells.append(
                        {
                            "row": row,
                            "column": column,
                            "component": self.components.get(cell),
                            "rank": self.cells[cell],
                            "energy90": self.energy90.get(cell),
                            "energy99": self.energy99.get(cell),
                        }
                    )
        return {
            "base_model": self.base_model,
            "rows": list(self.rows),
            "columns": list(self.columns),
            "cells": cells,
            "totals": self.totals(),
        }

    def to_text(self, value: str = "rank") -> str:
        """Aligned text table of ``rank`` (or ``energy90`` / ``energy99``); ``.`` marks an empty cell."""
        source = {"rank": self.cells, "energy90": self.energy90, "energy99": self.energy99}.get(value)
        if source is None:
            raise LoRA2Error(f"value must be 'rank', 'energy90' or 'energy99', got {value!r}")
        label_width = max([len(value), *(len(row) for row in self.rows)])
        widths = [max(len(column), 3) for column in self.columns]
        lines = [self.summary()]
        lines.append(
            " ".join([f"{value:<{label_width}}", *(f"{c:>{w}}" for c, w in zip(self.columns, widths, strict=True))])
        )
        for row in self.rows:
            values = [str(source[(row, c)]) if (row, c) in source else "." for c in self.columns]
            lines.append(
                " ".join([f"{row:<{label_width}}", *(f"{v:>{w}}" for v, w in zip(values, widths, strict=True))])
            )
        return "\n".join(lines)


def build_rank_table(adapter: Adapter, energy: bool = True) -> RankTable:
    """The rank table of ``adapter`` (with energy ranks unless ``energy=False``)."""
    placed = layout(adapter.components)
    table = RankTable(
        rows=placed.rows,
        columns=placed.columns,
        cells={},
        row_groups=placed.row_groups,
        parameters=adapter.num_parameters(),
        megabytes=adapter.megabytes(2),
        base_model=adapter.base_model,
    )
    for name, component in adapter.components.items():
        cell = placed.cells[name]
        table.cells[cell] = component.rank
        table.components[cell] = name
        if energy:
            spectrum = factor_svd(component.up, component.down)[1]
            table.energy90[cell] = energy_rank(spectrum, 0.9)
            table.energy99[cell] = energy_rank(spectrum, 0.99)
    return table
