"""Content-addressed caches of encoded latents and text embeddings: in memory, then on disk.

Keys are sha256 digests of everything that changes an entry, and nothing else:

* latents: the image file's bytes, its pixel settings (bucket, flip, variants, and the augmentation
  settings and seed when augmentation is on; see ``DatasetSpec.pixel_settings``) and ``model_key``;
* text: the caption and ``model_key``.

So editing a caption re-encodes only that caption's text, never the VAE pass, and changing a setting
re-encodes only the images it changes. ``CACHE_VERSION`` is part of every key: bump it when the
preprocessing code changes what an entry holds.

On disk, one safetensors file per entry, ``<cache_dir>/<kind>-<sha256>.safetensors`` (kind is
``latents`` or ``text``), written to a temporary file in the same folder and renamed into place, so an
interrupted run never leaves a half-written entry; the metadata holds the settings as JSON for anyone
inspecting the folder. A file that cannot be read is treated as missing and rewritten. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .errors import LoRA2Error
from .lora_file import read_safetensors, write_safetensors_atomic

CACHE_VERSION = 1
CACHE_FORMAT = "lora2-dataset-cache"
Entry = dict[str, torch.Tensor]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    except OSError as exc:
        raise LoRA2Error(f"image '{path}' cannot be read ({exc})") from exc
    return digest.hexdigest()


def _key(kind: str, fields: dict[str, Any]) -> str:
    text = json.dumps({"cache_version": CACHE_VERSION, "kind": kind, **fields}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()}"


def latents_key(image_sha256: str, pixel_settings: dict[str, Any], model_key: str) -> str:
    """Cache key of one image's encoded versions."""
    return _key("latents", {"image": image_sha256, "pixels": pixel_settings, "model": model_key})


def text_key(caption: str, model_key: str) -> str:
    """Cache key of one caption's embeddings."""
    return _key("text", {"caption": caption, "model": model_key})


def entry_bytes(entry: Entry) -> int:
    return sum(t.numel() * t.element_size() for t in entry.values())


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)


class MemoryCache:
    """Least-recently-used entries up to ``max_bytes`` of tensor data (CPU).

    Why a passed-in object rather than a module global: the owner (the ComfyUI node) decides how long
    it lives and how big it may grow, and tests get a fresh one each.
    """

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        if max_bytes < 0:
            raise LoRA2Error(f"the memory cache size must be 0 or more bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry) -> None:
        """Store ``entry`` (dropping the oldest entries to make room); larger than the cap: not kept."""
        size = entry_bytes(entry)
        if key in self._entries:
            self.bytes -= entry_bytes(self._entries.pop(key))
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= entry_bytes(dropped)
        self._entries[key] = entry
        self.bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


class TensorCache:
    """Memory first, then ``cache_dir``; either may be absent. Disk hits are promoted to memory."""

    def __init__(self, memory: MemoryCache | None, cache_dir: Path | None) -> None:
        self.memory = memory
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LoRA2Error(f"cache folder '{self.cache_dir}' cannot be created ({exc})") from exc

    def path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.safetensors"

    def get(self, key: str) -> Entry | None:
        if self.memory is not None and (entry := self.memory.get(key)) is not None:
            return entry
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            entry, metadata = read_safetensors(path)
        except LoRA2Error:
            return None
        if metadata.get("format") != CACHE_FORMAT or metadata.get("key") != key:
            return None
        if self.memory is not None:
            self.memory.put(key, entry)
        return entry

    def put(self, key: str, entry: Entry, info: dict[str, Any]) -> Entry:
        """Keep ``entry`` in memory and write it to disk (``info`` goes into the file's metadata);
        returns the stored CPU copy."""
        # a copy: safetensors refuses tensors that share storage (views of one encoder output)
        entry = {name: _cpu_copy(tensor) for name, tensor in entry.items()}
        if self.memory is not None:
            self.memory.put(key, entry)
        path = self.path(key)
        if path is not None:
            metadata = {"format": CACHE_FORMAT, "version": str(CACHE_VERSION), "key": key, "info": json.dumps(info)}
            try:
                write_safetensors_atomic(path, entry, metadata)
            except OSError as exc:
                raise LoRA2Error(f"cache file '{path}' cannot be written ({exc}); check the cache folder") from exc
        return entry
