"""Where LoRA² reads and writes in a ComfyUI install: models/loras, datasets, caches (via ``folder_paths``).

The rules themselves (containment, safe names, atomic writes) are :mod:`lora2.paths`; this module only
knows which folders ComfyUI has.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths

from ...lora2.dataset_files import resolve_folder
from ...lora2.errors import LoRA2Error
from ...lora2.lora_file import STATE_SUFFIX, state_path
from ...lora2.paths import check_name_length, is_inside, remove_orphan_temporaries, safe_child

log = logging.getLogger("LoRA²")

CACHE_DIR = "lora2_cache"
"""``models/lora2_cache``: encoded datasets on disk, next to the models (ComfyUI empties temp/ at start)."""


LORA_SUFFIXES = (".safetensors", STATE_SUFFIX)


def loras_dir() -> Path:
    """The first ``models/loras`` folder: where the pack writes."""
    return Path(folder_paths.get_folder_paths("loras")[0])


def lora_names() -> list[str]:
    """Every LoRA file ComfyUI lists (relative names), for file pickers."""
    return folder_paths.get_filename_list("loras")


def models_subdir(name: str) -> Path:
    """``ComfyUI/models/<name>`` (the pack's caches and evaluation models live beside the models)."""
    return Path(folder_paths.models_dir) / name


def safe_lora_path(name: str, suffix: str = ".safetensors") -> Path:
    """``models/loras/<name><suffix>`` (see :func:`lora2.paths.safe_child`: sub-folders, never outside)."""
    return safe_child(loras_dir(), name, suffix, LORA_SUFFIXES)


def save_path(name: str, overwrite: bool) -> tuple[Path, str | None]:
    """Where LoRA² Save writes ``name``, and a note when that is not the name asked for.

    A LoRA and its ``.lora2state`` are one pair: with ``overwrite`` off, a name is taken when either
    file exists, and the first free ``<name>_2``, ``<name>_3``, ... is used instead (nothing replaced,
    and no old state ever sits beside the new file).
    """
    path = safe_lora_path(name)
    if overwrite or not _taken(path):
        return path, None
    stem = path.name[: -len(".safetensors")]
    for number in range(2, 10_000):
        candidate = path.with_name(f"{stem}_{number}.safetensors")
        check_name_length(candidate, "numbered file name")
        if not _taken(candidate):
            return candidate, f"'{path.name}' already exists (overwrite is off): saved as '{candidate.name}'"
    raise LoRA2Error(f"'{path}' and 10,000 numbered variants exist; choose another name or turn overwrite on")


def _taken(path: Path) -> bool:
    return path.exists() or state_path(path).exists()


def lora_file(name: str) -> Path:
    """The full path of a file listed in ``models/loras`` (ComfyUI's own lookup)."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise LoRA2Error(f"no file '{name}' in models/loras; refresh the node list or check the name")
    return Path(path)


def resume_choices() -> list[str]:
    """``none`` and every ``*.lora2state`` file under models/loras (relative names)."""
    names = []
    for root in folder_paths.get_folder_paths("loras"):
        base = Path(root)
        if base.is_dir():
            names += sorted(str(p.relative_to(base)) for p in base.rglob("*" + STATE_SUFFIX))
    return ["none", *names]


def resume_path(name: str) -> Path:
    """The ``.lora2state`` named ``name`` in one of the loras folders (never a path outside them)."""
    for root in folder_paths.get_folder_paths("loras"):
        candidate = Path(root) / name
        if is_inside(candidate, root) and candidate.is_file():
            return Path(os.path.realpath(candidate))
    raise LoRA2Error(f"no training state '{name}' in models/loras")


ANY_DATASET_PATH = "COMFYUI_LORA2_ANY_DATASET_PATH"
"""Set to 1 (in the environment ComfyUI starts in) to let LoRA² Dataset read absolute paths anywhere."""


def dataset_roots() -> list[Path]:
    """Where LoRA² Dataset looks up folder names: ComfyUI's input folder, then its ``datasets`` folders.

    ComfyUI 0.33 has a ``datasets`` folder type (``<base>/datasets``, more through extra_model_paths.yaml);
    older hosts such as 0.3.75 do not, and get the same default folder, so one workflow works on both.
    """
    if "datasets" in folder_paths.folder_names_and_paths:
        datasets = folder_paths.get_folder_paths("datasets")
    else:
        datasets = [os.path.join(folder_paths.base_path, "datasets")]
    return [Path(folder_paths.get_input_directory()), *(Path(p) for p in datasets)]


def dataset_folder(name: str) -> Path:
    """The folder LoRA² Dataset reads for ``name`` (absolute paths outside the roots only when opted in)."""
    allowed = os.environ.get(ANY_DATASET_PATH, "").strip().lower() in ("1", "true", "yes")
    hint = f", add its folder under 'datasets:' in extra_model_paths.yaml, or start ComfyUI with {ANY_DATASET_PATH}=1"
    return resolve_folder(name, dataset_roots(), allow_absolute=allowed, opt_in_hint=hint)


def cleanup_orphans() -> list[Path]:
    """Remove temporary files that interrupted writes left in models/loras and the dataset cache.

    Called once while ComfyUI loads the pack; never raises (see :func:`lora2.paths.remove_orphan_temporaries`).
    """
    try:
        folders = [*folder_paths.get_folder_paths("loras"), str(models_subdir(CACHE_DIR))]
        return remove_orphan_temporaries(folder for folder in folders if os.path.isdir(folder))
    except Exception as exc:  # start-up must not fail over housekeeping
        log.warning("LoRA²: skipped the clean-up of unfinished temporary files (%s)", exc)
        return []
