"""Drawing primitives of the rank heatmap (PIL only): palette, fonts, text, grid cells, legend.

Palette: viridis, written here as nine anchors (evenly spaced from 0 to 1) that :func:`palette_colour`
interpolates linearly in sRGB. Viridis is perceptually uniform, readable by the common forms of colour
blindness and in greyscale, and its lightness rises monotonically, so "brighter = higher rank" holds
everywhere on the bar. Cividis would be the other choice, but its middle is grey, which would blur
into the neutral grey of empty cells.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]
"""``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive."""

VIRIDIS: tuple[RGB, ...] = (
    (68, 1, 84),
    (71, 45, 123),
    (59, 82, 139),
    (44, 114, 142),
    (33, 144, 140),
    (39, 173, 129),
    (93, 200, 99),
    (170, 220, 50),
    (253, 231, 37),
)
BACKGROUND: RGB = (255, 255, 255)
INK: RGB = (30, 30, 30)
MUTED: RGB = (110, 110, 110)
EMPTY: RGB = (222, 222, 222)
"""Cells of a block that has no component of that type: neutral grey, no number."""
GRIDLINE: RGB = (232, 232, 232)


def palette_colour(t: float) -> RGB:
    """Viridis at ``t`` in [0, 1] (clamped), linear between the anchors."""
    t = min(max(float(t), 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    f = t - i
    a, b = VIRIDIS[i], VIRIDIS[i + 1]
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))  # type: ignore[return-value]


def cell_colour(rank: float, vmin: float, vmax: float) -> RGB:
    """Colour of a cell of ``rank`` on a scale from ``vmin`` (darkest) to ``vmax`` (brightest).

    Linear in rank: ranks are small integers, and a linear scale keeps equal steps of rank equally
    visible. A scale without range (every rank equal) uses the palette's middle.
    """
    if vmax <= vmin:
        return palette_colour(0.5)
    return palette_colour((rank - vmin) / (vmax - vmin))


def _linear(channel: int) -> float:
    c = channel / 255.0
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def luminance(colour: RGB) -> float:
    """WCAG relative luminance (0 black .. 1 white)."""
    r, g, b = (_linear(c) for c in colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_colour(background: RGB) -> RGB:
    """Black or white, whichever has the higher WCAG contrast ratio against ``background``."""
    lum = luminance(background)
    return (0, 0, 0) if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else (255, 255, 255)


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (FreeType; Pillow ≥ 10.1 scales it, older ones get the fixed bitmap)."""
    try:
        return ImageFont.load_default(size=max(int(size), 1))
    except TypeError:
        return ImageFont.load_default()


REPLACEMENTS = {"—": "-", "–": "-", "−": "-", "→": "->", "λ": "lambda", "ν": "nu", "’": "'", "“": '"', "”": '"'}
"""Stand-ins for characters the bundled font lacks (Unicode's compatibility forms cover ² ³ and the like)."""


def _glyph(char: str) -> tuple[tuple[int, int], bytes] | None:
    try:
        mask = font(24).getmask(char)
    except (UnicodeError, ValueError):
        return None
    return mask.size, bytes(mask)


@lru_cache(maxsize=4096)
def has_glyph(char: str) -> bool:
    """Whether the font draws ``char`` (rather than its empty-box "missing glyph")."""
    if char.isspace() or char.isascii():
        return True
    glyph = _glyph(char)
    return glyph is not None and glyph != _glyph("\ue000")  # a private-use code point: never in the font


def displayable(text: str) -> str:
    """``text`` with every character the font cannot draw replaced (``LoRA²`` -> ``LoRA2``), so no boxes appear."""
    out = []
    for char in text:
        if has_glyph(char):
            out.append(char)
            continue
        folded = "".join(c for c in unicodedata.normalize("NFKD", char) if c.isascii() or has_glyph(c))
        out.append(REPLACEMENTS.get(char) or folded or "?")
    return "".join(out)


def shorten(text: str, limit: int = 24) -> str:
    """At most ``limit`` characters: a long fallback label keeps its end, the most specific part."""
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]


def text_size(text: str, size: int) -> tuple[int, int]:
    """Width and height in pixels of ``text`` (as :func:`displayable` draws it) at font ``size``."""
    x0, y0, x1, y1 = font(size).getbbox(displayable(text))
    return int(x1 - x0), int(y1 - y0)


def draw_text(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int, fill: RGB, anchor: str = "la"
) -> None:
    """``draw.text`` with the bundled font at ``size`` and unsupported characters replaced."""
    draw.text(xy, displayable(text), font=font(size), fill=fill, anchor=anchor)


def fit_size(texts: list[str], width: float, height: float, largest: int, smallest: int = 6) -> int | None:
    """Largest font size (≤ ``largest``) at which every text fits in ``width`` × ``height``; None if none does."""
    for size in range(int(largest), smallest - 1, -1):
        if all(w <= width and h <= height for w, h in (text_size(t, size) for t in texts)):
            return size
    return None


def draw_vertical_text(image: PILImage.Image, text: str, size: int, centre_x: int, bottom: int, fill: RGB) -> None:
    """Text rotated 90° (reads bottom to top), centred on ``centre_x``, ending at ``bottom``."""
    text = displayable(text)
    w, h = text_size(text, size)
    left, top = font(size).getbbox(text)[:2]
    mask = PILImage.new("L", (w + 2, h + 2), 0)
    ImageDraw.Draw(mask).text((1 - left, 1 - top), text, font=font(size), fill=255)
    mask = mask.rotate(90, expand=True)
    image.paste(fill, (centre_x - mask.width // 2, bottom - mask.height), mask)


def draw_cell(draw: ImageDraw.ImageDraw, box: Box, colour: RGB, label: str | None, size: int | None) -> None:
    """One filled cell with its number centred in the contrasting text colour."""
    draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=colour)
    if label and size:
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        draw_text(draw, centre, label, size, text_colour(colour), "mm")


def draw_legend(
    draw: ImageDraw.ImageDraw, bar: Box, vmin: int, vmax: int, size: int, ticks: list[int], show_empty: bool
) -> None:
    """A vertical colour bar in ``bar`` (``vmax`` on top) with rank ticks to its right, a "rank" caption
    above it and, when some cells are empty, a grey "none" swatch below it."""
    x0, y0, x1, y1 = bar
    draw_text(draw, (x0, y0 - 6), "rank", size, INK, "ld")
    height = y1 - y0
    for y in range(y0, y1):
        t = 1.0 - (y - y0) / max(height - 1, 1)
        draw.line((x0, y, x1 - 1, y), fill=palette_colour(t) if vmax > vmin else palette_colour(0.5))
    for tick in ticks:
        t = 0.5 if vmax <= vmin else (tick - vmin) / (vmax - vmin)
        y = round(y1 - 1 - t * (height - 1))
        draw.line((x1, y, x1 + 4, y), fill=INK)
        draw_text(draw, (x1 + 7, y), str(tick), size, INK, "lm")
    if show_empty:
        top, swatch = y1 + 10, text_size("Ag", size)[1] + 4
        draw.rectangle((x0, top, x1 - 1, top + swatch - 1), fill=EMPTY)
        draw_text(draw, (x1 + 7, top + swatch / 2), "none", size, MUTED, "lm")


def rank_ticks(vmin: int, vmax: int, count: int = 5) -> list[int]:
    """Integer ticks from ``vmin`` to ``vmax`` inclusive, both ends always present, about ``count`` in all."""
    if vmax <= vmin:
        return [vmin]
    step = max(1, round((vmax - vmin) / max(count - 1, 1)))
    inner = [v for v in range(vmin + step, vmax, step) if vmax - v >= step / 2]
    return [vmin, *inner, vmax]
