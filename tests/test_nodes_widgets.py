"""The widgets of Apply, Save and Heatmap reach what they claim (Train and Dataset: test_nodes_declared.py).

As there: each widget gets a value no default uses and is read back from what the node made; every node
lists all its inputs, so a new widget fails until it is covered here or named where it is covered.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_lora2.devtools.comfy_host import ComfyHost, run_prompt
from comfyui_lora2.devtools.layout import MISSING_HOST_REASON, host_available
from comfyui_lora2.devtools.prompts import adapter_object, lora2_save

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON)

COVERED = {
    "LoRA2Apply": {"model": "socket", "adapter": "socket", "strength": "below"},
    "LoRA2Save": {
        "adapter": "socket",
        "filename": "below",
        "save_training_state": "below",
        "precision": "below",
        "model": "tests/test_nodes_files.py (diffusers key names)",
        "overwrite": "tests/test_nodes_files.py::test_save_keeps_unicode_names_and_never_overwrites_silently",
    },
    "LoRA2Load": {"lora_name": "tests/test_nodes_files.py (Load -> Prune -> Save)"},
    "LoRA2Heatmap": {
        "adapter": "socket",
        "lora_name": "tests/test_nodes_inspect.py (any LoRA file)",
        "history": "tests/test_nodes_inspect.py (history panel)",
        "width": "below",
        "title": "below",
    },
    "LoRA2Prune": {
        "adapter": "socket",
        "lora_name": "tests/test_nodes_inspect.py",
        "policy": "tests/test_nodes_inspect.py::test_every_prune_policy_runs_the_pruning_it_names",
        "value": "the same test (each policy's own value)",
    },
    "LoRA2Evaluate": {
        "images": "socket",
        "real_folder": "tests/test_nodes_evaluate.py",
        "prompts": "tests/test_nodes_evaluate.py",
        "dino_model": "tests/test_nodes_evaluate.py (the seeded tiny DINO)",
        "clip_model": "tests/test_nodes_evaluate.py (the seeded tiny CLIP)",
        "batch_size": "tests/test_nodes_evaluate.py",
    },
}
"""Per node, every input and where it is shown to reach its setting (Train, Dataset, Validation and
Sample Prompts list theirs in test_nodes_declared.py and test_nodes_validation.py)."""


def test_every_input_of_these_nodes_is_covered(comfy_host: ComfyHost) -> None:
    for node, covered in COVERED.items():
        inputs = {i.id for i in comfy_host.nodes.NODE_CLASS_MAPPINGS[node].define_schema().inputs}
        assert inputs == set(covered), f"{node}: add the new input's check here"


def trained_adapter(with_state: bool):
    """A LoRA² adapter on the tiny SD1.5 model's attention, with non-zero factors (and a resume state)."""
    from comfyui_lora2.devtools.tiny_models import FAMILIES
    from comfyui_lora2.lora2 import LoRA2Config, attach
    from comfyui_lora2.lora2.adapter import Adapter, ResumeState

    model = FAMILIES["sd15"].model(0).model.diffusion_model
    handle = attach(model, LoRA2Config(targets="attn", init_rank=2, max_rank=4))
    with torch.no_grad():
        for component in handle.components.values():
            component.up.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    state = ResumeState(handle.state_dict(), None, torch.Generator().get_state(), {"lora2": handle.config.to_dict()})
    adapter = Adapter.from_handle(handle, "SD15", resume=state if with_state else None)
    handle.detach()
    return adapter


def test_apply_strength_is_the_patch_strength(comfy_host: ComfyHost) -> None:
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED, put_object

    prompt = {
        "model": {"class_type": "TestTinyModel", "inputs": {"family": "sd15", "seed": 0}},
        "adapter": {
            "class_type": "TestObjectLORA2_ADAPTER",
            "inputs": {"key": put_object("w-apply", trained_adapter(False))},
        },
        "apply": {
            "class_type": "LoRA2Apply",
            "inputs": {"model": ["model", 0], "adapter": ["adapter", 0], "strength": 0.37},
        },
        "keep": {"class_type": "TestCapture", "inputs": {"value": ["apply", 0], "key": "w-applied"}},
    }
    run_prompt(prompt).raise_for_failure()
    patches = CAPTURED["w-applied"].patches
    assert patches and {entry[0] for entries in patches.values() for entry in entries} == {0.37}


@pytest.mark.parametrize(
    ("precision", "dtype", "with_state"), [("bfloat16", torch.bfloat16, False), ("float32", torch.float32, True)]
)
def test_save_writes_the_name_precision_and_state_it_is_asked_for(
    comfy_host: ComfyHost, precision: str, dtype: torch.dtype, with_state: bool
) -> None:
    from comfyui_lora2.devtools.tiny_nodes import put_object
    from comfyui_lora2.lora2.lora_file import read_safetensors, state_path

    name = f"widgets/saved {precision}"
    prompt = {
        "adapter": adapter_object(put_object("w-save", trained_adapter(True))),
        "save": lora2_save(["adapter", 0], name, save_training_state=with_state, precision=precision),
    }
    result = run_prompt(prompt).raise_for_failure()
    path = comfy_host.base_dir / "models" / "loras" / "widgets" / f"saved {precision}.safetensors"
    assert result.outputs["save"]["text"][0].startswith(str(path))
    tensors, _ = read_safetensors(path)
    assert {t.dtype for key, t in tensors.items() if not key.endswith(".alpha")} == {dtype}
    assert state_path(path).is_file() == with_state


def test_heatmap_width_and_title_reach_the_image(comfy_host: ComfyHost) -> None:
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED, put_object

    key = put_object("w-heatmap", trained_adapter(False))
    images = {}
    for title in ("", "Zq widget title"):
        prompt = {
            "adapter": {"class_type": "TestObjectLORA2_ADAPTER", "inputs": {"key": key}},
            "heatmap": {
                "class_type": "LoRA2Heatmap",
                "inputs": {"adapter": ["adapter", 0], "lora_name": "none", "width": 777, "title": title},
            },
            "keep": {"class_type": "TestCapture", "inputs": {"value": ["heatmap", 0], "key": "w-heatmap-image"}},
        }
        run_prompt(prompt).raise_for_failure()
        images[title] = CAPTURED["w-heatmap-image"]
    assert all(image.shape[2] == 777 for image in images.values())  # IMAGE is [B, H, W, C]
    plain, titled = images[""], images["Zq widget title"]
    assert plain.shape != titled.shape or not torch.equal(plain, titled)  # the title is drawn
