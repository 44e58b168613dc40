"""A small generated subject for the demo: the same toy drawn in a few poses, sizes and backgrounds.

Real photos cannot ship with the pack and the demo must run offline, so the subject is drawn: a red
robot with a yellow visor and blue feet, placed, scaled and mirrored differently in every picture on
varied backgrounds, each with a caption naming the trigger word. It is small enough to train on in
seconds and regular enough that the adapter has something to learn.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

BACKGROUNDS = [(120, 170, 110), (200, 190, 160), (110, 140, 190), (170, 120, 90), (235, 235, 235), (60, 70, 80)]
PLACES = ["on grass", "on sand", "by the sea", "on a wooden table", "in a white studio", "at night"]


def draw_toy(size: int, rng: random.Random, background: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(12):  # background texture
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size * 0.02, size * 0.08)
        shade = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in background)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=shade)
    scale = rng.uniform(0.45, 0.7) * size
    cx, cy = rng.uniform(0.35, 0.65) * size, rng.uniform(0.45, 0.6) * size
    body = (cx - 0.25 * scale, cy - 0.2 * scale, cx + 0.25 * scale, cy + 0.3 * scale)
    head = (cx - 0.18 * scale, cy - 0.5 * scale, cx + 0.18 * scale, cy - 0.2 * scale)
    draw.rounded_rectangle(body, radius=scale * 0.06, fill=(200, 40, 40), outline=(90, 10, 10), width=2)
    draw.rounded_rectangle(head, radius=scale * 0.08, fill=(210, 50, 45), outline=(90, 10, 10), width=2)
    draw.rectangle((cx - 0.13 * scale, cy - 0.42 * scale, cx + 0.13 * scale, cy - 0.32 * scale), fill=(250, 210, 40))
    for side in (-1, 1):
        draw.rectangle(
            (
                cx + side * 0.1 * scale - 0.07 * scale,
                cy + 0.3 * scale,
                cx + side * 0.1 * scale + 0.07 * scale,
                cy + 0.42 * scale,
            ),
            fill=(40, 70, 200),
        )
        draw.line(
            (cx + side * 0.25 * scale, cy - 0.1 * scale, cx + side * 0.4 * scale, cy + 0.1 * scale),
            fill=(90, 10, 10),
            width=4,
        )
    draw.ellipse((cx - 0.03 * scale, cy - 0.62 * scale, cx + 0.03 * scale, cy - 0.5 * scale), fill=(250, 210, 40))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image.filter(ImageFilter.GaussianBlur(0.6))


def write_subject(folder: Path, count: int = 6, size: int = 128, trigger: str = "sks toy", seed: int = 0) -> list[Path]:
    """Write ``count`` pictures with captions into ``folder``; returns the image paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for index in range(count):
        background = BACKGROUNDS[index % len(BACKGROUNDS)]
        path = folder / f"toy_{index:02d}.png"
        draw_toy(size, rng, background).save(path)
        path.with_suffix(".txt").write_text(f"a photo of {trigger} {PLACES[index % len(PLACES)]}")
        paths.append(path)
    return paths


if __name__ == "__main__":
    import sys

    for written in write_subject(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out/subject")):
        print(written)
