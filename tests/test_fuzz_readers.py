"""Issue 10: hypothesis fuzzing of the LoRA reader and the dataset reader: LoRA2Error or success, nothing else.

Each example must finish well inside hypothesis' deadline, so a hang fails the test too.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from comfyui_lora2.lora2 import LoRA2Error
from comfyui_lora2.lora2.dataset_files import scan_folder
from comfyui_lora2.lora2.dataset_images import load_image
from comfyui_lora2.lora2.heatmap import build_rank_table
from comfyui_lora2.lora2.lora_file import load_adapter
from comfyui_lora2.lora2.prune import prune_by_energy

FUZZ = settings(max_examples=80, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int64, torch.bool]
SUFFIXES = [".lora_up.weight", ".lora_down.weight", ".alpha", ".lora_A.weight", ".lora_B.weight", ".weight"]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _tensor(draw, shape: list[int]) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    value = draw(st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -2.0]))
    return (torch.randn(shape) + value).to(dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype)


SHAPES = st.lists(st.integers(0, 4), max_size=4)


@st.composite
def plausible(draw) -> dict[str, torch.Tensor]:
    """A valid kohya pair whose up, down and alpha are each, sometimes, replaced by a damaged one."""
    out = {"a.lora_up.weight": torch.randn(4, 2), "a.lora_down.weight": torch.randn(2, 3), "a.alpha": torch.tensor(2.0)}
    damaged = draw(st.lists(st.sampled_from(sorted(out)), min_size=1, max_size=2, unique=True))
    for key in damaged:
        out[key] = _tensor(draw, draw(SHAPES))
    return out


@st.composite
def tensors(draw) -> dict[str, torch.Tensor]:
    out = draw(plausible()) if draw(st.integers(0, 3)) else {}
    for _ in range(draw(st.integers(0 if out else 1, 3))):
        key = draw(st.sampled_from(["b", "lora_unet_x", ""] if out else ["a", "b", ""])) + draw(
            st.sampled_from(SUFFIXES)
        )
        out[key] = _tensor(draw, draw(SHAPES))
    return out


@st.composite
def metadata(draw) -> dict[str, str]:
    lora2 = draw(
        st.one_of(
            st.text(max_size=20),
            JSON.map(json.dumps),
            st.fixed_dictionaries(
                {},
                optional={
                    "modules": JSON,
                    "nu": JSON,
                    "config": JSON,
                    "history": JSON,
                    "version": JSON,
                    "source": JSON,
                    "extra": JSON,
                },
            ).map(json.dumps),
        )
    )
    out = {"ss_steps": draw(st.text(max_size=6)), "ss_base_model_version": draw(st.text(max_size=6))}
    if draw(st.booleans()):  # without it the tensors are what is checked first
        out["lora2"] = lora2
    return out


def _read(path: Path) -> None:
    try:
        adapter = load_adapter(path)
        build_rank_table(adapter)
        prune_by_energy(adapter, 0.9)
    except LoRA2Error:
        pass


@FUZZ
@given(tensors(), metadata())
def test_lora_reader_raises_only_lora2error(tmp_path_factory, tensors, metadata) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    save_file(tensors, path, metadata=metadata)
    _read(path)


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 1 << 40))
def test_lora_reader_on_malformed_headers(tmp_path_factory, body, declared) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    header = json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, declared]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    _read(path)
    path.write_bytes(body)
    _read(path)


@FUZZ
@given(
    st.binary(max_size=400), st.sampled_from([".png", ".jpg", ".webp", ".bmp", ".gif", ".tiff"]), st.binary(max_size=40)
)
def test_dataset_reader_raises_only_lora2error(tmp_path_factory, data, suffix, caption) -> None:
    folder = tmp_path_factory.mktemp("data")
    (folder / f"x{suffix}").write_bytes(data)
    (folder / "x.txt").write_bytes(caption)
    try:
        for item in scan_folder(folder, "a photo", ""):
            load_image(item.path)
    except LoRA2Error:
        pass
