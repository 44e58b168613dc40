"""The training graph through the REAL ComfyUI server: POST /prompt, websocket, history, outputs.

The server loads its model with the stock ``UNETLoader`` (so the weights are inference tensors, as in
real use), encodes a small dataset, trains a few steps, saves the adapter, and samples with it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from comfyui_lora2.devtools.comfy_server import ComfyServer
from comfyui_lora2.devtools.layout import MISSING_HOST_REASON, host_available
from comfyui_lora2.devtools.prompts import ksampler, lora2_dataset, lora2_save, lora2_train

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON)


def write_subject(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(3):
        pixels = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(index)) * 255).to(torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")


def test_training_graph_runs_on_the_real_server(host_server: ComfyServer, comfy_host) -> None:
    # comfy_host: the in-process host makes ComfyUI importable here, to write the tiny model files
    from comfyui_lora2.devtools.tiny_models import write_tiny_taesd, write_tiny_unet

    base = host_server.base_dir
    write_tiny_unet(base / "models" / "diffusion_models" / "tiny_sd20.safetensors", "sd20")
    write_tiny_taesd(base / "models" / "vae" / "tiny_taesd.safetensors")
    write_subject(base / "input" / "subject")
    info = host_server.object_info()
    assert {"LoRA2Dataset", "LoRA2Train", "LoRA2Apply", "LoRA2Save", "LoRA2Load"} <= set(info)
    assert info["LoRA2Train"]["category"] == "LoRA²"
    assert info["LoRA2Train"]["output"] == ["MODEL", "LORA2_ADAPTER", "LORA2_HISTORY"]

    prompt = {
        "unet": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "tiny_sd20.safetensors", "weight_dtype": "default"},
        },
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_taesd.safetensors"}},
        "cond": {"class_type": "LotusConditioning", "inputs": {}},
        "dataset": lora2_dataset(["vae", 0], ["cond", 0]),
        "train": lora2_train(["unet", 0], ["dataset", 0], gradient_checkpointing=True, checkpoint_name="lora2/server"),
        "save": lora2_save(
            ["train", 1], "lora2/server_run", model=["unet", 0], save_training_state=True, precision="float16"
        ),
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": ksampler(["train", 0], ["cond", 0], ["cond", 0], ["latent", 0]),
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
        "preview": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }
    run = host_server.run(json.loads(json.dumps(prompt)), timeout=240)

    types = run.event_types()
    assert types.index("execution_start") < types.index("execution_success"), types
    assert run.history["status"]["status_str"] == "success", host_server.log_tail()
    train_progress = [e["data"] for e in run.events if e["type"] == "progress" and e["data"].get("node") == "train"]
    assert train_progress and train_progress[-1]["value"] == 3 and train_progress[-1]["max"] == 3
    saved = base / "models" / "loras" / "lora2" / "server_run.safetensors"
    assert saved.is_file() and saved.with_suffix(".lora2state").is_file()
    assert run.outputs()["save"]["text"] == [str(saved.resolve())]
    (image,) = run.images()
    png = Image.open(io.BytesIO(host_server.view(**image)))
    assert png.size == (64, 64)
    # the saved file is a kohya-style LoRA with diffusers-derived names for this UNet
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata()
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.") for k in keys)
    assert all(k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha")) for k in keys)
    assert metadata["ss_network_dim"] == "Dynamic" and json.loads(metadata["lora2"])["ranks"]
