"""lora2/lora_keys.py: a file's format is decided the same way in every process, ties included."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from comfyui_lora2.lora2.lora_formats import parse_lora
from comfyui_lora2.lora2.lora_keys import LoRAFormat, default_key, detect_format, is_foreign_key

K, P = LoRAFormat.KOHYA, LoRAFormat.PEFT


def test_the_most_common_spelling_wins_and_a_tie_goes_to_the_earlier_table_row() -> None:
    assert detect_format([("a", P), ("b", P), ("c", K)]) is P
    assert detect_format([("a", K), ("b", P)]) is K
    assert detect_format([("b", P), ("a", K)]) is K  # the order of the pairs does not matter
    assert detect_format([("x", LoRAFormat.DIFFUSERS), ("y", LoRAFormat.TRANSFORMERS)]) is LoRAFormat.DIFFUSERS
    assert detect_format([("diffusion_model.in.0", K)]) is LoRAFormat.COMFYUI
    assert LoRAFormat.KOHYA == "kohya"  # stored as a plain string in Adapter.source and file metadata


TIED = """
import torch
from comfyui_lora2.lora2.lora_formats import parse_lora
tensors = {}
for i, (up, down) in enumerate([(".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")] * 2):
    tensors[f"m{i}{up}"], tensors[f"m{i}{down}"] = torch.ones(3, 2), torch.ones(2, 5)
print(parse_lora(tensors).format)
"""


def test_a_tied_file_reads_the_same_under_every_hash_seed() -> None:
    seen = set()
    for seed in range(8):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        done = subprocess.run([sys.executable, "-c", TIED], capture_output=True, text=True, env=env, check=True)
        seen.add(done.stdout.strip())
    assert seen == {"kohya"}


def test_parse_lora_reports_the_format_enum() -> None:
    tensors = {"x.lora_B.weight": torch.ones(3, 2), "x.lora_A.weight": torch.ones(2, 5)}
    assert parse_lora(tensors).format is P


def test_default_key_keeps_foreign_keys() -> None:
    assert default_key("input_blocks.1.1.proj") == "lora_unet_input_blocks_1_1_proj"
    assert is_foreign_key("lora_te1_text_model") and default_key("unet.up.0") == "unet.up.0"
