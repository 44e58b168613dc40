"""Finding a dataset's images and captions on disk (kohya's folder layout), nothing decoded yet.

Layout: a folder of images, optionally in kohya-style repeat sub-folders ``N_name`` (``10_sks dog``:
every image inside counts 10 times per epoch, and ``sks dog`` is its class prompt). Folders are read
recursively; an image takes its repeats from the nearest ``N_name`` folder above it (1 if none).
Names starting with ``.`` are skipped, so a cache folder inside the dataset is never read as data.
Images are ``.png .jpg .jpeg .webp .bmp .gif .tif .tiff`` (GIF and TIFF: the first frame); files in
formats Pillow cannot read (``.heic``, ``.avif``, camera raw, ...) are listed in a warning, not skipped
silently.

Where a dataset may come from (:func:`resolve_folder`), aligned with ComfyUI's own dataset nodes
(``secure_subfolder_path`` and the ``datasets`` folder type of ComfyUI 0.33): a folder name under one of
the allowed roots (the input folder, then every ``datasets`` folder), never escaping it through ``..``
or a symlink; an absolute path only inside those roots, unless the machine's owner opted in (the node
reads an environment variable; a workflow cannot opt in for them). Inside the dataset folder, a
symlinked image, caption or sub-folder is followed only while it stays inside the folder; one that
points out is an error naming the link, never a silent read or a silent skip.

Caption of an image, first that applies:

1. ``<image stem>.txt`` beside it (UTF-8, or UTF-16/UTF-32 with a byte-order mark as Windows Notepad
   writes it; an empty file falls through; whitespace runs become one space);
2. the caption template, e.g. ``"a photo of {trigger}"``;
3. the repeat folder's name (kohya's class/instance prompt);

otherwise :class:`LoRA2Error`. In captions and templates ``{trigger}`` becomes the trigger word (or, when
it is empty, the folder name) and ``{class}`` the folder name (or, outside repeat folders, the trigger);
a placeholder with nothing to fill it is an error rather than a caption silently missing its subject.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import LoRA2Error
from .paths import is_inside

log = logging.getLogger("LoRA²")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
UNREADABLE_IMAGES = (".heic", ".heif", ".avif", ".jxl", ".jp2", ".svg", ".psd", ".raw", ".cr2", ".nef", ".arw", ".dng")
"""Image formats Pillow cannot decode here: named in a warning when a dataset holds them."""
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16 LE, whose mark is its prefix
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
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


def resolve_folder(
    name_or_path: str, roots: Path | Sequence[Path], allow_absolute: bool = False, opt_in_hint: str = ""
) -> Path:
    """The dataset folder for a node's text field (see the module docstring for the policy).

    Args:
        roots: where dataset names are looked up, in order (the input folder first, then ``datasets``).
        allow_absolute: the machine's owner allows absolute paths outside ``roots``.
        opt_in_hint: how to allow them, for the error message.
    """
    roots = [Path(roots)] if isinstance(roots, (str, os.PathLike)) else [Path(r) for r in roots]
    text = name_or_path.strip()
    if not text:
        raise LoRA2Error(f"the dataset folder is empty; type a folder name under '{roots[0]}'")
    if "\x00" in text:
        raise LoRA2Error(f"dataset folder {text!r} contains a NUL character")
    given = Path(text).expanduser()
    folder = _absolute_folder(given, roots, allow_absolute, opt_in_hint) if given.is_absolute() else None
    if folder is None:
        folder = _named_folder(text, given, roots)
    if not folder.is_dir():
        raise LoRA2Error(f"dataset folder '{folder}' does not exist or is not a folder")
    return folder


def _absolute_folder(given: Path, roots: list[Path], allow_absolute: bool, opt_in_hint: str) -> Path:
    if allow_absolute or any(is_inside(given, root) for root in roots):
        return Path(os.path.realpath(given))
    places = " or ".join(f"'{root}'" for root in roots)
    raise LoRA2Error(
        f"dataset folder '{given}' is outside {places}; a workflow may only read folders there. Move or link the "
        f"images into one of them and type the folder's name{opt_in_hint}"
    )


def _named_folder(text: str, given: Path, roots: list[Path]) -> Path:
    for root in roots:
        candidate = root / given
        if not is_inside(candidate, root):
            raise LoRA2Error(
                f"dataset folder '{text}' points outside '{root}' (through '..' or a symlink); use a folder inside it"
            )
        if candidate.is_dir():
            return Path(os.path.realpath(candidate))
    places = ", ".join(f"'{root}'" for root in roots)
    raise LoRA2Error(f"dataset folder '{text}' does not exist in {places}; check the name")


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


def _check_link(path: Path, root: Path, what: str) -> None:
    """A symlink inside the dataset may point anywhere inside it, nowhere else."""
    if path.is_symlink() and not is_inside(path, root):
        raise LoRA2Error(
            f"the {what} '{path}' is a symlink to '{os.path.realpath(path)}', outside the dataset folder "
            f"'{root}'; copy the files into the folder instead"
        )


def _image_paths(folder: Path) -> list[Path]:
    """Every image under ``folder``, following symlinked sub-folders that stay inside (each real folder once)."""
    root = Path(os.path.realpath(folder))
    paths, unreadable, seen = [], [], set()
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:  # a symlink loop, or a second link to one folder
            subdirs[:] = []
            continue
        seen.add(real)
        subdirs[:] = sorted(name for name in subdirs if not name.startswith("."))
        for name in subdirs:
            _check_link(Path(directory) / name, root, "sub-folder")
        for name in sorted(files):
            suffix = Path(name).suffix.lower()
            if name.startswith("."):
                continue
            if suffix in IMAGE_EXTENSIONS:
                _check_link(Path(directory) / name, root, "image")
                paths.append(Path(directory) / name)
            elif suffix in UNREADABLE_IMAGES:
                unreadable.append(name)
    if unreadable:
        log.warning(
            "LoRA² Dataset: %d files in '%s' are in formats that cannot be read and are left out (%s); convert "
            "them to PNG or JPEG to train on them",
            len(unreadable),
            folder,
            ", ".join(unreadable[:5]) + (", ..." if len(unreadable) > 5 else ""),
        )
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
    _check_link(caption_path, Path(os.path.realpath(path.parent)), "caption file")
    try:
        return decode_caption(caption_path.read_bytes()).strip()
    except OSError as exc:
        raise LoRA2Error(f"caption file '{caption_path}' cannot be read ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise LoRA2Error(
            f"caption file '{caption_path}' is not UTF-8 text ({exc}); save it as UTF-8 (or UTF-16 with a BOM)"
        ) from exc


def decode_caption(data: bytes) -> str:
    """Caption text: UTF-16/UTF-32 when a byte-order mark says so, else UTF-8 (with or without its BOM)."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data.decode(encoding)
    return data.decode("utf-8-sig")


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
            exif_in_header = image.format in ("JPEG", "MPO", "WEBP", "TIFF")
            orientation = image.getexif().get(_ORIENTATION_TAG, 1) if exif_in_header else 1
    except Exception as exc:  # Pillow's decoders raise many types on damaged files; each one means "unreadable"
        reason = f"{type(exc).__name__}: {exc}"
        raise LoRA2Error(f"image '{path}' cannot be read ({reason}); replace or remove it") from exc
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)
