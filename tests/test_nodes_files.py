"""Issue 10 through ComfyUI's graph: LoRA² Save names and overwrites, key names through Load -> Prune -> Save."""

from __future__ import annotations

import os
import time

import pytest

from comfyui_lora2.devtools.adapters import random_adapter
from comfyui_lora2.devtools.comfy_host import ComfyHost, run_prompt
from comfyui_lora2.devtools.layout import MISSING_HOST_REASON, host_available
from comfyui_lora2.devtools.prompts import adapter_object, lora2_save
from comfyui_lora2.lora2.lora_file import read_safetensors

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON)


def save_prompt(source: dict, filename: str, model: bool = False, **extra) -> dict:
    prompt = dict(source)
    if model:
        prompt["model"] = {"class_type": "TestTinyModel", "inputs": {"family": "sd15", "seed": 0}}
    prompt["save"] = lora2_save(["adapter", 0], filename, model=["model", 0] if model else None, **extra)
    return prompt


def _object(key: str) -> dict:
    return {"adapter": adapter_object(key)}


def test_save_keeps_unicode_names_and_never_overwrites_silently(comfy_host: ComfyHost) -> None:
    from comfyui_lora2.devtools.tiny_models import FAMILIES
    from comfyui_lora2.devtools.tiny_nodes import put_object

    key = put_object("names", random_adapter(FAMILIES["sd15"].model(0).model.diffusion_model, "sd15"))
    loras = comfy_host.base_dir / "models" / "loras" / "names"
    run_prompt(save_prompt(_object(key), "names/日本語")).raise_for_failure()
    run_prompt(save_prompt(_object(key), "names/中文")).raise_for_failure()
    assert {p.name for p in loras.iterdir()} == {"日本語.safetensors", "中文.safetensors"}
    again = run_prompt(save_prompt(_object(key), "names/日本語")).raise_for_failure()
    assert (loras / "日本語_2.safetensors").is_file()
    assert "already exists" in again.outputs["save"]["text"][0]
    run_prompt(save_prompt(_object(key), "names/日本語", overwrite=True)).raise_for_failure()
    assert len(list(loras.iterdir())) == 3
    long = "x" * 235
    run_prompt(save_prompt(_object(key), f"names/{long}")).raise_for_failure()
    assert (loras / f"{long}.safetensors").is_file()


def test_keys_survive_load_prune_save_without_the_model(comfy_host: ComfyHost) -> None:
    from comfyui_lora2.devtools.tiny_models import FAMILIES
    from comfyui_lora2.devtools.tiny_nodes import put_object

    key = put_object("keys", random_adapter(FAMILIES["sd15"].model(0).model.diffusion_model, "sd15"))
    run_prompt(save_prompt(_object(key), "keys/with_model", model=True)).raise_for_failure()
    prompt = {
        "adapter": {"class_type": "LoRA2Load", "inputs": {"lora_name": "keys/with_model.safetensors"}},
        "prune": {
            "class_type": "LoRA2Prune",
            "inputs": {"adapter": ["adapter", 0], "lora_name": "none", "policy": "singular-value energy", "value": 0.9},
        },
    }
    prompt = save_prompt(prompt, "keys/pruned")
    prompt["save"]["inputs"]["adapter"] = ["prune", 0]
    run_prompt(prompt).raise_for_failure()
    loras = comfy_host.base_dir / "models" / "loras" / "keys"
    original, _ = read_safetensors(loras / "with_model.safetensors")
    pruned, _ = read_safetensors(loras / "pruned.safetensors")
    assert any("down_blocks" in k for k in original)
    assert set(pruned) == set(original)  # diffusers names, not ComfyUI paths


def test_sdxl_label_emb_keys_are_the_ones_diffusers_and_comfyui_read(comfy_host: ComfyHost) -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key

    from comfyui_lora2.devtools.tiny_models import FAMILIES

    patches = comfy_host.pack_module().nodes.comfy.patches
    model = FAMILIES["sdxl"].model(0)
    key_for = patches.kohya_key_for(model)
    key_map = patches.lora_key_map(model)
    for module, diffusers_name in (
        ("label_emb.0.0", "add_embedding.linear_1"),
        ("label_emb.0.2", "add_embedding.linear_2"),
    ):
        key = key_for(module)
        assert key == "lora_unet_" + module.replace(".", "_")
        assert _convert_unet_lora_key(key) == diffusers_name
        assert key_map[key] == f"diffusion_model.{module}.weight"


def test_orphan_temporaries_are_cleaned_at_start_up(comfy_host: ComfyHost) -> None:
    files = comfy_host.pack_module().nodes.comfy.files
    loras = comfy_host.base_dir / "models" / "loras"
    orphan = loras / f".lora2-tmp-999999999-{'0' * 16}.tmp"
    orphan.write_bytes(b"0" * 1000)
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    assert orphan in files.cleanup_orphans() and not orphan.exists()


def test_absolute_dataset_paths_need_the_opt_in(comfy_host: ComfyHost, tmp_path, monkeypatch) -> None:
    from comfyui_lora2.lora2 import LoRA2Error

    files = comfy_host.pack_module().nodes.comfy.files
    (tmp_path / "photos").mkdir()
    monkeypatch.delenv(files.ANY_DATASET_PATH, raising=False)
    with pytest.raises(Exception, match="COMFYUI_LORA2_ANY_DATASET_PATH=1") as error:
        files.dataset_folder(str(tmp_path / "photos"))
    assert type(error.value).__name__ == LoRA2Error.__name__
    monkeypatch.setenv(files.ANY_DATASET_PATH, "1")
    assert files.dataset_folder(str(tmp_path / "photos")) == (tmp_path / "photos").resolve()
    (comfy_host.base_dir / "datasets" / "mine").mkdir(parents=True)
    monkeypatch.delenv(files.ANY_DATASET_PATH)
    assert files.dataset_folder("mine") == (comfy_host.base_dir / "datasets" / "mine").resolve()
