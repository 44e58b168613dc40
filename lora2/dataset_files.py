"""Finding a dataset's images and captions on disk (kohya's folder layout), nothing decoded yet.

Layout: a folder of images, optionally in kohya-style repeat sub-folders ``N_name`` (``10_sks dog``:
every image inside counts 10 times per epoch, and ``sks dog`` is its class prompt). Folders are read
recursively; an image takes its repeats from the nearest ``N_name`` folder above it (1 if none).
Names starting with ``.`` are skipped, so a cache folder inside the dataset is never read as data.

Caption of an image, first that applies:

1. ``<image stem>.txt`` beside it (UTF-8; an empty file falls through; whitespace runs become one space);
2. the caption template, e.g. ``"a photo of {trigger}"``;
3. the repeat folder's name (kohya's class/instance prompt);

otherwise :class:`LoRA2Error`. In captions and templates ``{trigger}`` becomes the trigger word (or, when
it is empty, the folder name) and ``{class}`` the folder name (or, outside repeat folders, the trigger);
a placeholder with nothing to fill it is an error rather than a caption silently missing its subject.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import LoRA2Error

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
PLACEHOLDER = re.compile(r"\{(\w*)\}")
PLACEHOLDERS = ("trigger", "class")
_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


@dataclass(frozen=True)
class ImageItem:
    """One training image as found on disk (pixels are read only when it is encoded)."""

    path: Path
    caption: str
    repeats: int
    width: int
    """Width as displayed, i.e. after the EXIF orientation is applied."""
    height: int
    class_name: str = ""
    """The ``name`` of the ``N_name`` folder it came from ("" outside repeat folders)."""
    caption_source: str = "file"
    """Where the caption came from: ``file``, ``template`` or ``folder``."""


def resolve_folder(name_or_path: str, input_root: Path) -> Path:
    """The dataset folder for a node's text field: an absolute path, or a name under ``input_root``.

    A relative name must stay inside ``input_root`` after ``..`` and symlinks are resolved, so a
    workflow shared with someone cannot read folders elsewhere on their disk by a relative name.
    """
    text = name_or_path.strip()
    if not text:
        raise LoRA2Error(f"the dataset folder is empty; type a folder name under '{input_root}' or an absolute path")
    given = Path(text).expanduser()
    if given.is_absolute():
        folder = given.resolve()
    else:
        root = Path(input_root).resolve()
        folder = (root / given).resolve()
        if not folder.is_relative_to(root):
            raise LoRA2Error(
                f"dataset folder '{text}' points outside the input folder '{root}' (through '..' or a symlink); "
                "use a folder inside it, or give an absolute path"
            )
    if not folder.is_dir():
        raise LoRA2Error(f"dataset folder '{folder}' does not exist or is not a folder")
    return folder


def scan_folder(folder: Path, caption_template: str | None, trigger: str) -> list[ImageItem]:
    """Every image under ``folder`` with its caption and repeats, sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoRA2Error(f"dataset folder '{folder}' does not exist or is not a folder")
    template = caption_template.strip() if caption_template else ""
    if template:
        _check_template(template)
    trigger = trigger.strip()
    found = sorted(_image_paths(folder), key=lambda path: path.relative_to(folder).as_posix())
    if not found:
        raise LoRA2Error(f"dataset folder '{folder}' has no images (looked for {' '.join(IMAGE_EXTENSIONS)})")
    return [_item(path, folder, template, trigger) for path in found]


def _image_paths(folder: Path) -> list[Path]:
    paths = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(Path(directory) / name)
    return paths


def repeat_folder(path: Path, root: Path) -> tuple[int, str]:
    """``(repeats, class name)`` from the nearest ``N_name`` folder above ``path``, ``root`` included
    (so pointing the node straight at ``10_sks dog`` keeps its repeats)."""
    for parent in [root / p for p in path.relative_to(root).parents]:
        match = REPEAT_FOLDER.match(parent.name)
        if match:
            repeats = int(match.group(1))
            if repeats < 1:
                raise LoRA2Error(f"folder '{parent}' repeats its images {repeats} times; use at least 1")
            return repeats, match.group(2).strip()
    return 1, ""


def _item(path: Path, root: Path, template: str, trigger: str) -> ImageItem:
    repeats, class_name = repeat_folder(path, root)
    values = {"trigger": trigger or class_name, "class": class_name or trigger}
    caption, source = _read_caption(path), "file"
    if not caption and template:
        caption, source = template, "template"
    if not caption and class_name:
        caption, source = class_name, "folder"
    if not caption:
        raise LoRA2Error(
            f"image '{path}' has no caption: add '{path.with_suffix('.txt').name}' beside it, set a caption "
            "template such as 'a photo of {trigger}', or put it in a kohya folder like '10_sks dog'"
        )
    empty = sorted({name for name in PLACEHOLDER.findall(caption) if name in values and not values[name]})
    if empty:
        raise LoRA2Error(
            f"the {source} caption of '{path}' uses {{{empty[0]}}} but the trigger word is empty and the image is "
            "not in a kohya folder like '10_sks dog'; fill in the trigger word"
        )
    width, height = image_size(path)
    caption = PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), caption)
    return ImageItem(path, " ".join(caption.split()), repeats, width, height, class_name, source)


def _read_caption(path: Path) -> str:
    caption_path = path.with_suffix(".txt")
    if not caption_path.is_file():
        return ""
    try:
        return caption_path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise LoRA2Error(f"caption file '{caption_path}' is not UTF-8 text ({exc}); save it as UTF-8") from exc


def _check_template(template: str) -> None:
    unknown = sorted({name for name in PLACEHOLDER.findall(template) if name not in PLACEHOLDERS})
    if unknown:
        names = ", ".join("{" + name + "}" for name in unknown)
        raise LoRA2Error(f"caption template {template!r} uses {names}; only {{trigger}} and {{class}} are filled in")


def image_size(path: Path) -> tuple[int, int]:
    """Displayed ``(width, height)`` from the file header; errors name the file."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            # JPEG and WebP keep EXIF in the header; PNG's getexif() would decode the whole image
            exif_in_header = image.format in ("JPEG", "MPO", "WEBP")
            orientation = image.getexif().get(_ORIENTATION_TAG, 1) if exif_in_header else 1
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise LoRA2Error(f"image '{path}' cannot be read ({exc}); replace or remove it") from exc
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)
