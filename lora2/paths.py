"""Where the pack may read and write, and how it writes: one owner for every file-system rule.

* **Containment** (:func:`is_inside`, :func:`inside`): a user-given path must stay inside its folder
  after ``..`` and symlinks are resolved. The test is ComfyUI's own (``folder_paths.is_within_directory``
  in ComfyUI 0.33: ``realpath`` on both sides, then ``commonpath``), so the pack and the host agree on
  what "inside" means, including for symlinks placed inside the folder that point elsewhere.
* **Names** (:func:`safe_child`): a user-typed name (``lora2/my run``) becomes a path below a folder:
  sub-folders allowed, only characters file systems refuse replaced, never outside the folder.
* **Atomic writes** (:func:`atomic_write`): the bytes go to a temporary file in the target folder, are
  flushed to disk, and the file is renamed over the target, so a crash leaves the old file or the new
  one, never half of one. The temporary name has a fixed length (``.lora2-tmp-<pid>-<random>.tmp``),
  whatever the target's name, so a name that fits the file system also fits while it is being written;
  it is created with mode ``0o666`` and the process umask applied (``mkstemp``'s ``0o600`` would make
  every LoRA unreadable to other users, containers and a second UI).
* **Orphans** (:func:`remove_orphan_temporaries`): a process killed during a write leaves its temporary
  file behind (a LoRA can be gigabytes). At start-up the pack removes the ones whose writer is gone.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import LoRA2Error

log = logging.getLogger("LoRA²")

TEMP_PREFIX = ".lora2-tmp-"
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\.lora2-tmp-(\d+)-[0-9a-f]{16}\.tmp$")
_LEGACY_TEMP_NAME = re.compile(r"^\..+\.(safetensors|lora2state)\.[A-Za-z0-9_]{8}\.tmp$")
"""What ``tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")`` made before this module owned the writes."""
STALE_SECONDS = 300.0
"""A temporary file untouched for this long, whose writer process is gone, is an orphan."""
ABANDONED_SECONDS = 24 * 3600.0
"""Untouched for this long it is an orphan whatever its name says (its writer may live in another container)."""
NAME_MAX = 255
"""Bytes in one file name on every file system the pack is used on (ext4, xfs, btrfs, APFS, NTFS)."""


def is_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """True when ``path`` resolves (symlinks included) to ``root`` or somewhere below it."""
    try:
        real_root = os.path.realpath(root)
        real_path = os.path.realpath(path)
        return os.path.commonpath((real_root, real_path)) == real_root
    except ValueError:  # an embedded NUL byte, or another drive on Windows: not inside
        return False


def inside(path: str | os.PathLike[str], root: str | os.PathLike[str], what: str) -> Path:
    """``path`` resolved, or :class:`LoRA2Error` naming ``what`` when it leaves ``root``."""
    if not is_inside(path, root):
        raise LoRA2Error(f"{what} points outside '{root}' (through '..', an absolute path or a symlink)")
    return Path(os.path.realpath(path))


_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"|?*]+')
"""Characters no file system (or no shell-safe name) takes; letters of every script are kept."""
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
"""Windows device names, which cannot be file names there whatever the extension."""


def _name_part(part: str) -> str:
    part = _UNSAFE.sub("_", unicodedata.normalize("NFC", part)).strip(" .")
    return f"_{part}" if part.split(".")[0].lower() in _RESERVED else part


def safe_child(
    root: str | os.PathLike[str], name: str, suffix: str, known_suffixes: tuple[str, ...] = (), what: str = "file name"
) -> Path:
    """``<root>/<name><suffix>``, sub-folders allowed, never outside ``root``; any script's letters are kept.

    Only characters file systems refuse (``<>:"|?*``, control characters) become ``_``, so ``日本語`` and
    ``中文`` stay two names; a name ending in one of ``known_suffixes`` loses it first (``a.safetensors``
    is ``a``). A name longer than the file system takes is refused, not cut. ``what`` names the name in
    errors ("file name", "validation run name", ...).
    """
    real_root = Path(os.path.realpath(root))
    parts = [_name_part(part) for part in re.split(r"[\\/]+", name) if part.strip(" .")]
    parts = [part for part in parts if part]
    if not parts:
        raise LoRA2Error(f"{what} {name!r} is empty after removing unsafe characters; use letters and digits")
    stem = parts[-1]
    for known in known_suffixes:
        stem = stem.removesuffix(known)
    parts[-1] = stem + suffix
    for part in parts:
        check_name_length(Path(part), what)
    return inside(real_root.joinpath(*parts), real_root, f"{what} {name!r}")


def check_name_length(path: Path, what: str = "file name") -> None:
    """Refuse a final path component longer than the file system takes, before anything is written."""
    size = len(path.name.encode("utf-8"))
    if size > NAME_MAX:
        raise LoRA2Error(
            f"the {what} '{path.name[:40]}...' is {size} bytes long; file systems allow {NAME_MAX}: use a shorter name"
        )


def temporary_name() -> str:
    """A fresh fixed-length temporary file name that records the writing process."""
    return f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}{TEMP_SUFFIX}"


def _create_temporary(folder: Path) -> Path:
    for _ in range(16):
        candidate = folder / temporary_name()
        try:
            handle = os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # the umask applies
        except FileExistsError:
            continue
        os.close(handle)
        return candidate
    raise LoRA2Error(f"could not create a temporary file in '{folder}'")


def _fsync(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary)`` for a temporary file beside ``path``, then rename it over ``path``.

    On any failure (including KeyboardInterrupt) the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    check_name_length(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_temporary(path.parent)
    try:
        mode = temporary.stat().st_mode & 0o777  # 0o666 less the umask, as the kernel applied it
        write(temporary)
        os.chmod(temporary, mode)  # writers such as safetensors may recreate the file with 0o600
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or unknowable: assume alive
    return True


def is_orphan(path: Path, now: float | None = None) -> bool:
    """True for a temporary file of the pack that nothing is writing any more (see the module docstring)."""
    match = _TEMP_NAME.match(path.name)
    legacy = _LEGACY_TEMP_NAME.match(path.name)
    if match is None and legacy is None:
        return False
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except OSError:
        return False
    if age >= ABANDONED_SECONDS:
        return True
    if match is not None:
        return age >= STALE_SECONDS and not _process_alive(int(match.group(1)))
    return age >= STALE_SECONDS  # legacy names carry no pid; no writer of this version makes them


def remove_orphan_temporaries(folders: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Delete the orphaned temporary files under ``folders`` (recursively); returns what was removed.

    Never raises: this runs while ComfyUI starts, where a failure would only hide the pack's nodes.
    """
    removed: list[Path] = []
    for folder in folders:
        for directory, _subdirs, files in os.walk(folder):
            for name in files:
                candidate = Path(directory) / name
                if not name.endswith(TEMP_SUFFIX) or not is_orphan(candidate):
                    continue
                try:
                    size = candidate.stat().st_size
                    candidate.unlink()
                except OSError as exc:
                    log.warning("LoRA²: could not remove the unfinished temporary file %s (%s)", candidate, exc)
                    continue
                log.info("LoRA²: removed %s (%.1f MB), left by an interrupted write", candidate, size / 1e6)
                removed.append(candidate)
    return removed
