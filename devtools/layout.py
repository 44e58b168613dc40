"""Where the pinned ComfyUI host lives and how a ComfyUI base directory is laid out.

`scripts/install_host.sh` installs the host tree into ``.host/ComfyUI``; the in-process harness and
the real-server helper both need the same facts (the tree, the torchvision stub, a base directory
whose ``custom_nodes`` holds our pack), so they live here once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COMFY_DIR = REPO_ROOT / ".host" / "ComfyUI"
STUBS_DIR = Path(__file__).resolve().parent / "stubs"
PACK_LINK_NAME = "ComfyUI-LoRA2"
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "loras", "vae", "text_encoders", "clip")
BASE_FOLDERS = ("input", "output", "temp", "user")
MISSING_HOST_REASON = f"ComfyUI host not installed at {COMFY_DIR} (run `make host` or `bash scripts/install_host.sh`)"

NEWEST_COMFY_VERSION = "0.33.0"
NEWEST_COMFY_CANDIDATES = (
    (Path(os.environ["LORA2_NEWEST_COMFY"]),)
    if os.environ.get("LORA2_NEWEST_COMFY")
    else (
        REPO_ROOT.parent / "shared" / "hosts" / f"ComfyUI-{NEWEST_COMFY_VERSION}",
        Path("/work/shared/hosts") / f"ComfyUI-{NEWEST_COMFY_VERSION}",
    )
)
"""Where the newest ComfyUI tree may be: CI and the developers' machines carry it under ``shared/hosts``
beside the checkout; users do not, so everything that needs it skips with ``MISSING_NEWEST_REASON``.
``LORA2_NEWEST_COMFY`` replaces the search (another tree, or a missing path to see the skip)."""
NEWEST_COMFY_DIR = next(
    (path for path in NEWEST_COMFY_CANDIDATES if (path / "main.py").is_file()), NEWEST_COMFY_CANDIDATES[0]
)
MISSING_NEWEST_REASON = (
    f"the newest ComfyUI tree ({NEWEST_COMFY_VERSION}) is not at {' or '.join(map(str, NEWEST_COMFY_CANDIDATES))}: "
    "only CI and development machines carry ../shared/hosts (set LORA2_NEWEST_COMFY to point at one)"
)


def newest_host_available() -> bool:
    """True when the newest ComfyUI tree is present (read-only: it is never installed into)."""
    return (NEWEST_COMFY_DIR / "main.py").is_file() and (NEWEST_COMFY_DIR / "nodes.py").is_file()


def comfy_version(comfy_dir: Path) -> str:
    """The ``__version__`` a ComfyUI tree declares in ``comfyui_version.py``, read without importing it."""
    text = (comfy_dir / "comfyui_version.py").read_text()
    return text.split("__version__", 1)[1].split("=", 1)[1].strip().split()[0].strip("\"'")


def host_available() -> bool:
    """True when the pinned ComfyUI tree is installed, so tests can skip with a reason otherwise."""
    return (COMFY_DIR / "main.py").is_file() and (COMFY_DIR / "nodes.py").is_file()


def make_base(base_dir: str | os.PathLike[str]) -> Path:
    """Create a ComfyUI base directory (``--base-directory``) with our pack linked into ``custom_nodes``.

    ComfyUI lists ``custom_nodes`` through ``realpath``, so a symlink to the checkout loads the working
    tree as a user's install would. Idempotent: an existing layout is kept.
    """
    base = Path(base_dir).resolve()
    for name in MODEL_FOLDERS:
        (base / "models" / name).mkdir(parents=True, exist_ok=True)
    for name in BASE_FOLDERS:
        (base / name).mkdir(parents=True, exist_ok=True)
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK_LINK_NAME
    if link.is_symlink() and link.resolve() != REPO_ROOT:
        link.unlink()
    if not link.is_symlink():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    return base


def hide_torchvision_stub() -> list[str]:
    """Make the torchvision stub invisible once ComfyUI's module-level imports have bound it.

    While the stub is importable, ``transformers`` reports torchvision as available (it only asks
    ``importlib.util.find_spec``) and its image processors then fail to import. ComfyUI keeps the
    references it already holds; only code that imports torchvision later sees it missing, as on a
    machine without it. Returns the module names dropped; a real torchvision is left alone.
    """
    stub = str(STUBS_DIR)
    while stub in sys.path:
        sys.path.remove(stub)
    dropped = []
    stubbed = ("torchvision", "torchaudio", "_import_stub")  # every top-level name under devtools/stubs
    for name in [n for n in sys.modules if n.split(".")[0] in stubbed]:
        if str(getattr(sys.modules[name], "__file__", "") or "").startswith(stub):
            del sys.modules[name]
            dropped.append(name)
    forget_cached_torchvision_checks()
    return dropped


def forget_cached_torchvision_checks() -> None:
    """Clear ``transformers``' cached torchvision/torchaudio availability checks (``lru_cache``s filled at start-up)."""
    import_utils = sys.modules.get("transformers.utils.import_utils")
    for name in dir(import_utils) if import_utils is not None else ():
        if "torchvision" in name or "torchaudio" in name:
            clear = getattr(getattr(import_utils, name), "cache_clear", None)
            if callable(clear):
                clear()
