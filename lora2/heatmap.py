"""The LoRA² rank heatmap: which block learned how much rank, as a PIL image (what the node shows).

Public API::

    table = build_rank_table(adapter)          # rows = blocks in model order, columns = layer types
    image = render_heatmap(table, history=adapter.history, title="my subject", width=1024)
    print(table.to_text())                     # the same numbers as text; table.to_dict() as JSON

The image, top to bottom: a title, a line of totals (trainable parameters, fp16 file size, mean and max
rank), the grid (row labels on the left, column labels on top, turned vertical when they do not fit
their column; each cell coloured by rank with its number in black or white, whichever contrasts more;
blocks without a component of that type grey and blank; a small gap between groups of rows such as
input / middle / output), a colour bar on the right, and, when a training history is given, a panel
with total rank and loss over the steps. The width is what was asked for; the height follows the
number of rows. Sizes derive from the width and the table size, so SDXL's 70 transformer blocks and
Flux's 57 blocks stay readable at 1024 px (cells 14-36 px tall, labels up to 14 px).

:func:`draw_heatmap` returns the image together with the box of every cell, the colour bar and the
charts, which is what tests sample; :func:`render_heatmap` returns the image only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

from .adapter import Adapter
from .errors import LoRA2Error
from .heatmap_charts import draw_history, has_history
from .heatmap_draw import (
    BACKGROUND,
    EMPTY,
    INK,
    MUTED,
    Box,
    cell_colour,
    draw_cell,
    draw_legend,
    draw_text,
    draw_vertical_text,
    fit_size,
    rank_ticks,
    shorten,
    text_size,
)
from .heatmap_layout import Cell, RankTable, build_rank_table, layout

__all__ = [
    "Heatmap",
    "RankTable",
    "adapter_heatmap",
    "build_rank_table",
    "cell_colour",
    "draw_heatmap",
    "layout",
    "render_heatmap",
]

MIN_WIDTH, MAX_WIDTH = 320, 8192


@dataclass
class Heatmap:
    """A rendered heatmap and where its parts are (boxes are ``(x0, y0, x1, y1)``, ends exclusive)."""

    image: Image.Image
    cells: dict[Cell, Box] = field(default_factory=dict)
    """Filled area of every cell that has a component."""
    empty_cells: dict[Cell, Box] = field(default_factory=dict)
    grid: Box = (0, 0, 0, 0)
    legend: Box | None = None
    """The colour bar."""
    charts: tuple[Box, Box] | None = None
    """Plot areas of the total-rank and loss charts, when a history was drawn."""
    number_size: int | None = None
    """Font size of the numbers in the cells (None: cells too small for numbers)."""


def _clamp(value: float, lo: int, hi: int) -> int:
    return int(min(max(round(value), lo), hi))


@dataclass
class _Sizes:
    """Every size the drawing needs, derived from the width and the table."""

    margin: int
    cell_h: int
    label: int
    title: int
    summary: int
    row_label_w: int
    legend_w: int
    bar_w: int
    vertical_columns: bool
    header_h: int
    group_gap: int

    @classmethod
    def plan(cls, table: RankTable, width: int, title: str | None) -> _Sizes:
        margin = max(8, width // 80)
        cell_h = _clamp(1.3 * width / max(len(table.rows), 1), 14, 36)
        label = _clamp(min(width / 72, cell_h - 5), 9, 14)
        title_size = fit_size([title or ""], width - 2 * margin, 10**6, _clamp(width / 40, 10, 26), 8) or 8
        summary = fit_size([table.summary()], width - 2 * margin, 10**6, _clamp(width / 64, 8, 16)) or 6
        row_label_w = max([text_size(shorten(r), label)[0] for r in table.rows] or [0]) + 10
        bar_w = max(10, width // 64)
        tick_w = max(text_size(t, label)[0] for t in (str(table.max_rank), "rank", "none"))
        legend_w = bar_w + 10 + tick_w + margin
        grid_w = width - 2 * margin - row_label_w - legend_w
        column_w = grid_w / max(len(table.columns), 1)
        widths = [text_size(shorten(c), label)[0] for c in table.columns] or [0]
        vertical = max(widths) > column_w - 6
        header_h = (max(widths) if vertical else text_size("Ag", label)[1]) + 10
        return cls(
            margin=margin,
            cell_h=cell_h,
            label=label,
            title=title_size,
            summary=summary,
            row_label_w=row_label_w,
            legend_w=legend_w,
            bar_w=bar_w,
            vertical_columns=vertical,
            header_h=header_h,
            group_gap=max(3, cell_h // 3),
        )


def _row_tops(table: RankTable, top: int, sizes: _Sizes) -> list[int]:
    """Top edge of every row: rows stack, with a gap where the group (input/middle/output...) changes."""
    tops, y = [], top
    groups = table.row_groups or [""] * len(table.rows)
    for i in range(len(table.rows)):
        if i > 0 and groups[i] != groups[i - 1]:
            y += sizes.group_gap
        tops.append(y)
        y += sizes.cell_h
    return tops


def _draw_header(draw: ImageDraw.ImageDraw, table: RankTable, title: str | None, sizes: _Sizes) -> int:
    """Title and totals line; returns the y below them."""
    y = sizes.margin
    if title:
        draw_text(draw, (sizes.margin, y), title, sizes.title, INK, "la")
        y += text_size("Ag", sizes.title)[1] + sizes.margin // 2 + 2
    draw_text(draw, (sizes.margin, y), table.summary(), sizes.summary, MUTED, "la")
    return y + text_size("Ag", sizes.summary)[1] + sizes.margin


def draw_heatmap(table: RankTable, history: Any = None, title: str | None = None, width: int = 1024) -> Heatmap:
    """Render ``table`` (and ``history``, when it has steps) at ``width`` pixels; see the module docstring."""
    if not MIN_WIDTH <= int(width) <= MAX_WIDTH:
        raise LoRA2Error(f"heatmap width must be between {MIN_WIDTH} and {MAX_WIDTH} pixels, got {width}")
    width = int(width)
    sizes = _Sizes.plan(table, width, title)
    with_history = has_history(history)
    m = sizes.margin
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    header_bottom = _draw_header(probe, table, title, sizes)
    grid_top = header_bottom + sizes.header_h
    tops = _row_tops(table, grid_top, sizes)
    grid_bottom = (tops[-1] + sizes.cell_h) if tops else grid_top + 2 * sizes.cell_h
    grid_x0, grid_x1 = m + sizes.row_label_w, width - m - sizes.legend_w
    bar_top = grid_top + text_size("Ag", sizes.label)[1] + 4
    bar_bottom = bar_top + _clamp(grid_bottom - bar_top, 100, 420)
    show_empty = len(table.cells) < len(table.rows) * len(table.columns)
    legend_bottom = bar_bottom + (text_size("Ag", sizes.label)[1] + 14 if show_empty else sizes.label)
    body_bottom = max(grid_bottom, legend_bottom)
    panel_h = _clamp(width * 0.3, 180, 420) if with_history else 0
    height = body_bottom + m + (panel_h + m if with_history else 0)

    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    _draw_header(draw, table, title, sizes)
    result = Heatmap(image=image, grid=(grid_x0, grid_top, grid_x1, grid_bottom))
    if not table.rows:
        centre = ((grid_x0 + grid_x1) / 2, (grid_top + grid_bottom) / 2)
        draw_text(draw, centre, "no components", sizes.label, MUTED, "mm")
    else:
        _draw_grid(draw, image, table, tops, result, sizes)
        vmin, vmax = table.min_rank, table.max_rank
        bar = (grid_x1 + m, bar_top, grid_x1 + m + sizes.bar_w, bar_bottom)
        draw_legend(draw, bar, vmin, vmax, sizes.label, rank_ticks(vmin, vmax), show_empty)
        result.legend = bar
    if with_history:
        top = body_bottom + m
        draw.line((m, top - m // 2, width - m, top - m // 2), fill=EMPTY)
        result.charts = draw_history(draw, (m, top, width - m, top + panel_h), history, max(sizes.label, 10))
    return result


def _draw_grid(
    draw: ImageDraw.ImageDraw, image: Image.Image, table: RankTable, tops: list[int], out: Heatmap, sizes: _Sizes
) -> None:
    grid_x0, grid_top, grid_x1, _ = out.grid
    n = len(table.columns)
    xs = [grid_x0 + round(j * (grid_x1 - grid_x0) / n) for j in range(n + 1)]
    numbers = sorted({str(v) for v in table.cells.values()}, key=len)[-1:]
    out.number_size = fit_size(numbers, xs[1] - xs[0] - 6, sizes.cell_h - 4, sizes.label + 2, 7)
    for j, column in enumerate(table.columns):
        centre = (xs[j] + xs[j + 1]) // 2
        if sizes.vertical_columns:
            draw_vertical_text(image, shorten(column), sizes.label, centre, grid_top - 5, INK)
        else:
            draw_text(draw, (centre, grid_top - 5), shorten(column), sizes.label, INK, "md")
    vmin, vmax = table.min_rank, table.max_rank
    for row, top in zip(table.rows, tops, strict=True):
        centre_y = top + sizes.cell_h / 2
        draw_text(draw, (grid_x0 - 6, centre_y), shorten(row), sizes.label, INK, "rm")
        for j, column in enumerate(table.columns):
            box = (xs[j] + 1, top + 1, xs[j + 1] - 1, top + sizes.cell_h - 1)
            rank = table.cells.get((row, column))
            if rank is None:
                draw_cell(draw, box, EMPTY, None, None)
                out.empty_cells[(row, column)] = box
            else:
                draw_cell(draw, box, cell_colour(rank, vmin, vmax), str(rank), out.number_size)
                out.cells[(row, column)] = box


def render_heatmap(table: RankTable, history: Any = None, title: str | None = None, width: int = 1024) -> Image.Image:
    """The heatmap image of ``table`` (RGB, ``width`` pixels wide); see :func:`draw_heatmap`."""
    return draw_heatmap(table, history, title, width).image


def adapter_heatmap(
    adapter: Adapter, title: str | None = None, width: int = 1024, with_history: bool = True
) -> Image.Image:
    """Rank table of ``adapter`` and its training history (when it has one), drawn in one call."""
    history = adapter.history if with_history else None
    return render_heatmap(build_rank_table(adapter), history, title, width)
