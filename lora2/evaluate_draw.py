"""The evaluation table as an image (PIL only), with the heatmap's fonts and colours.

One row per generated image (index, DINO, CLIP-I, CLIP-T, prompt), then mean and std; each metric
cell carries a thin bar of its value on [0, 1] so a low image stands out without reading numbers.
Rows alternate in shade so a long table stays followable across its width.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from .evaluate import METRICS, PROTOCOL, EvalResult
from .heatmap_draw import BACKGROUND, GRIDLINE, INK, MUTED, draw_text, palette_colour, shorten, text_size

SIZE = 18
"""Font size of the cells in pixels; the title is a little larger."""
PAD = 12
ROW = SIZE + 18
NUMBER_WIDTH = 96
PROMPT_LIMIT = 90
STRIPE = (246, 246, 246)
SUMMARY = (232, 240, 250)


def _columns(result: EvalResult) -> tuple[list[int], int]:
    """x of each column (index, three metrics, prompt) and the image width."""
    index_width = max(text_size("mean", SIZE)[0], text_size(str(len(result.prompts)), SIZE)[0]) + PAD
    xs = [PAD, PAD + index_width]
    for _ in METRICS:
        xs.append(xs[-1] + NUMBER_WIDTH)
    prompt_width = max(
        [text_size("prompt", SIZE)[0]] + [text_size(shorten(p, PROMPT_LIMIT), SIZE)[0] for p in result.prompts]
    )
    title_width = text_size(_title(result), SIZE + 2)[0]
    return xs, max(xs[-1] + PAD + prompt_width + PAD, PAD + title_width + PAD, 480)


def _title(result: EvalResult) -> str:
    return f"LoRA² Evaluate - {len(result.prompts)} generated vs {len(result.real_names)} real photos"


def _bar(draw: ImageDraw.ImageDraw, x: int, y: int, value: float) -> None:
    """A thin bar under a number: its length and colour show the value clamped to [0, 1]."""
    t = min(max(value, 0.0), 1.0)
    width = NUMBER_WIDTH - PAD
    draw.rectangle((x, y, x + width, y + 3), fill=GRIDLINE)
    if t > 0:
        draw.rectangle((x, y, x + round(width * t), y + 3), fill=palette_colour(t))


def _row(
    draw: ImageDraw.ImageDraw, xs: list[int], y: int, label: str, values: list[float], prompt: str, bars: bool = True
) -> None:
    draw_text(draw, (xs[0], y + 4), label, SIZE, INK)
    for x, value in zip(xs[1:-1], values, strict=True):
        draw_text(draw, (x + NUMBER_WIDTH - PAD, y + 4), f"{value:.4f}", SIZE, INK, anchor="ra")
        if bars:
            _bar(draw, x, y + ROW - 8, value)
    draw_text(draw, (xs[-1] + PAD, y + 4), shorten(prompt, PROMPT_LIMIT), SIZE, MUTED)


def render_table(result: EvalResult) -> Image.Image:
    """The table of :meth:`EvalResult.to_text` drawn as an RGB image."""
    xs, width = _columns(result)
    rows = len(result.prompts)
    height = PAD + 2 * (SIZE + 10) + ROW * (rows + 3) + PAD
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw_text(draw, (PAD, PAD), _title(result), SIZE + 2, INK)
    draw_text(draw, (PAD, PAD + SIZE + 10), PROTOCOL, SIZE - 4, MUTED)
    y = PAD + 2 * (SIZE + 10)
    draw_text(draw, (xs[0], y + 4), "#", SIZE, MUTED)
    for x, (_, label) in zip(xs[1:-1], METRICS, strict=True):
        draw_text(draw, (x + NUMBER_WIDTH - PAD, y + 4), label, SIZE, MUTED, anchor="ra")
    draw_text(draw, (xs[-1] + PAD, y + 4), "prompt", SIZE, MUTED)
    y += ROW
    draw.line((PAD, y - 2, width - PAD, y - 2), fill=INK)
    for i, prompt in enumerate(result.prompts):
        if i % 2:
            draw.rectangle((PAD, y, width - PAD, y + ROW - 1), fill=STRIPE)
        _row(draw, xs, y, str(i), [result.values(key)[i] for key, _ in METRICS], prompt)
        y += ROW
    draw.line((PAD, y + 1, width - PAD, y + 1), fill=INK)
    summary = result.summary()
    for stat in ("mean", "std"):
        draw.rectangle((PAD, y + 3, width - PAD, y + ROW + 2), fill=SUMMARY)
        _row(draw, xs, y + 3, stat, [summary[key][stat] for key, _ in METRICS], "", bars=stat == "mean")
        y += ROW
    return image
