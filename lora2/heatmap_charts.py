"""The heatmap's training panel: total rank and loss over the optimizer steps, as two line charts.

Input is the run's history as :class:`lora2.train.History` stores it (``loss`` per step, ``ranks`` per
step as a list over components) or that object itself. The loss of a diffusion model jumps from step
to step with the sampled timestep, so it is drawn twice: raw in a light colour, and as a trailing
moving average over about 1/25 of the run in a strong one; the trend is what a reader wants.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw

from .errors import LoRA2Error
from .heatmap_draw import GRIDLINE, INK, MUTED, RGB, Box, draw_text, text_size

RANK_LINE: RGB = (59, 82, 139)
LOSS_RAW: RGB = (188, 200, 214)
LOSS_MEAN: RGB = (33, 144, 140)
VALIDATION_MARK: RGB = (214, 96, 77)
"""Validation-sample steps: a thin vertical line and a triangle on top of both charts."""


def history_series(history: Any) -> tuple[list[float], list[float]]:
    """``(total rank per step, loss per step)`` from a history dict (or an object with ``to_dict``)."""
    if hasattr(history, "to_dict"):
        history = history.to_dict()
    if not isinstance(history, Mapping) or "loss" not in history or "ranks" not in history:
        raise LoRA2Error("the history needs 'loss' and 'ranks' lists per step (as lora2.train.History records them)")
    try:
        totals = [float(sum(step)) for step in history["ranks"]]
        losses = [float(value) for value in history["loss"]]
    except (TypeError, ValueError) as error:
        raise LoRA2Error(f"history 'loss' must be numbers and 'ranks' lists of numbers per step ({error})") from None
    return totals, losses


def validation_steps(history: Any) -> list[int]:
    """The steps at which validation samples were drawn (``validation_steps``; none in older histories)."""
    if hasattr(history, "to_dict"):
        history = history.to_dict()
    steps = history.get("validation_steps", []) if isinstance(history, Mapping) else []
    if not isinstance(steps, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
        raise LoRA2Error("history 'validation_steps' must be a list of step numbers")
    return steps


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start); non-finite values are skipped."""
    out, total, count, queue = [], 0.0, 0, []
    for value in values:
        finite = math.isfinite(value)
        queue.append(value if finite else None)
        if finite:
            total, count = total + value, count + 1
        if len(queue) > window:
            old = queue.pop(0)
            if old is not None:
                total, count = total - old, count - 1
        out.append(total / count if count else math.nan)
    return out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 × 10ᵏ) from a multiple of the step at or below ``lo`` to one at
    or above ``hi``: about ``count`` of them, so an axis stretched to the first and last tick ends on labels."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * 0.999)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def _format(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}"


def draw_line_chart(
    draw: ImageDraw.ImageDraw,
    box: Box,
    title: str,
    lines: list[tuple[Sequence[float], RGB, int]],
    size: int,
    marks: Sequence[int] = (),
) -> Box:
    """Axes with ticks, a title, an x label ``step`` and the given ``(values, colour, width)`` lines.

    Every line is plotted against step 1..n; each step in ``marks`` (validation samples) gets a vertical
    line with a triangle on top (step 0, before the first step, sits on the y axis). Returns the plot area.
    """
    x0, y0, x1, y1 = box
    values = [v for series, _, _ in lines for v in series if math.isfinite(v)]
    steps = max((len(series) for series, _, _ in lines), default=0)
    draw_text(draw, (x0, y0), title, size, INK)
    if not values or steps == 0:
        draw_text(draw, ((x0 + x1) / 2, (y0 + y1) / 2), "no data", size, MUTED, "mm")
        return box
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12 * max(abs(hi), 1.0):  # a flat line: give it a visible range around its value
        pad = 0.5 if float(lo).is_integer() else max(abs(lo) * 0.05, 1e-6)
        lo, hi = lo - pad, hi + pad
    y_ticks = nice_ticks(lo, hi)
    lo, hi = min(lo, y_ticks[0]), max(hi, y_ticks[-1])
    label_w = max(text_size(_format(t), size)[0] for t in [*y_ticks, lo, hi])
    line_h = text_size("0", size)[1]
    plot = (x0 + label_w + 10, y0 + 2 * line_h + 8, x1 - 8, y1 - 2 * line_h - 14)

    def to_xy(i: int, v: float) -> tuple[float, float]:
        fx = (i / (steps - 1)) if steps > 1 else 0.5
        fy = (v - lo) / (hi - lo)
        return plot[0] + fx * (plot[2] - plot[0]), plot[3] - fy * (plot[3] - plot[1])

    for tick in y_ticks:
        y = to_xy(0, tick)[1]
        draw.line((plot[0], y, plot[2], y), fill=GRIDLINE)
        draw_text(draw, (plot[0] - 6, y), _format(tick), size, INK, "rm")
    for tick in nice_ticks(1, steps):
        if tick == int(tick) and 1 <= tick <= steps:
            x = to_xy(int(tick) - 1, lo)[0]
            draw.line((x, plot[3], x, plot[3] + 4), fill=INK)
            draw_text(draw, (x, plot[3] + 6), _format(tick), size, INK, "mt")
    draw.line((plot[0], plot[1], plot[0], plot[3], plot[2], plot[3]), fill=INK)
    draw_text(draw, ((plot[0] + plot[2]) / 2, y1), "step", size, MUTED, "mb")
    for mark in marks:
        x = to_xy(min(max(mark - 1, 0), steps - 1), lo)[0]
        draw.line((x, plot[1], x, plot[3]), fill=VALIDATION_MARK, width=1)
        half = max(3, size // 3)
        top = plot[1] - 2 * half
        draw.polygon([(x - half, top), (x + half, top), (x, plot[1])], fill=VALIDATION_MARK)
    stride = max(1, steps // max(2 * (plot[2] - plot[0]), 1))
    for series, colour, width in lines:
        points = [to_xy(i, v) for i, v in enumerate(series) if i % stride == 0 and math.isfinite(v)]
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        elif points:
            draw.line(points, fill=colour, width=width, joint="curve")
    return plot


def draw_history(draw: ImageDraw.ImageDraw, box: Box, history: Any, size: int) -> tuple[Box, Box]:
    """Total rank (left) and loss (right) side by side in ``box``; returns both plot areas."""
    totals, losses = history_series(history)
    x0, y0, x1, y1 = box
    middle = (x0 + x1) // 2
    gap = max(12, (x1 - x0) // 40)
    marks = validation_steps(history)
    rank_title = "total rank" + ("  (red: validation samples)" if marks else "")
    rank_lines = [(totals, RANK_LINE, 2)]
    rank_plot = draw_line_chart(draw, (x0, y0, middle - gap, y1), rank_title, rank_lines, size, marks)
    window = max(1, len(losses) // 25)
    title = "loss" if window == 1 else f"loss (raw; mean of {window} steps)"
    loss_lines = [(losses, LOSS_RAW, 1), (moving_average(losses, window), LOSS_MEAN, 2)]
    loss_plot = draw_line_chart(draw, (middle + gap, y0, x1, y1), title, loss_lines, size, marks)
    return rank_plot, loss_plot


def has_history(history: Any) -> bool:
    """True when ``history`` holds at least one recorded step (an empty one gets no panel)."""
    if history is None:
        return False
    totals, losses = history_series(history)
    return bool(totals or losses)


def render_history(history: Any, width: int = 1024, height: int = 360) -> Image.Image:
    """The loss and total-rank charts on their own (the heatmap's second panel as a picture)."""
    if not has_history(history):
        raise LoRA2Error("the history has no recorded steps to draw")
    image = Image.new("RGB", (width, height), "white")
    margin = max(12, width // 60)
    draw_history(
        ImageDraw.Draw(image), (margin, margin, width - margin, height - margin), history, max(12, width // 80)
    )
    return image
