"""LoRA² Evaluate in ComfyUI's graph, in-process, with tiny random DINO/CLIP folders in models/lora2_eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from comfyui_lora2.devtools.comfy_host import ComfyHost, run_prompt
from comfyui_lora2.devtools.layout import MISSING_HOST_REASON, host_available
from comfyui_lora2.devtools.pictures import pictures, save_photos
from comfyui_lora2.devtools.tiny_eval_models import save_tiny_eval_models

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON)


@pytest.fixture(scope="module")
def eval_models(comfy_host: ComfyHost) -> tuple[Path, Path]:
    """The tiny models in the node's default folders, removed again after the module."""
    root = comfy_host.base_dir / "models" / "lora2_eval"
    folders = save_tiny_eval_models(root)
    yield folders
    shutil.rmtree(root, ignore_errors=True)


def evaluate_prompt(images_key: str, real_folder: str, prompts: str, **overrides: str) -> dict:
    inputs = {"images": ["images", 0], "real_folder": real_folder, "prompts": prompts, **overrides}
    return {
        "images": {"class_type": "TestObjectIMAGE", "inputs": {"key": images_key}},
        "evaluate": {"class_type": "LoRA2Evaluate", "inputs": inputs},
        "keep_image": {"class_type": "TestCapture", "inputs": {"value": ["evaluate", 0], "key": "eval_image"}},
        "keep_text": {"class_type": "TestCapture", "inputs": {"value": ["evaluate", 1], "key": "eval_text"}},
        "keep_json": {"class_type": "TestCapture", "inputs": {"value": ["evaluate", 2], "key": "eval_json"}},
    }


def test_evaluate_in_the_graph(comfy_host: ComfyHost, eval_models: tuple[Path, Path]) -> None:
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED, put_object
    from comfyui_lora2.lora2.evaluate import EvalModels, evaluate

    subject = pictures(1, seed=21)
    save_photos(comfy_host.base_dir / "input" / "eval_subject", torch.cat([subject, pictures(1, seed=22)]))
    generated = torch.cat([subject, pictures(2, seed=23)])
    prompts = "a photo of sks dog\nsks dog on a beach\nsks dog in the snow"
    result = run_prompt(evaluate_prompt(put_object("generated", generated), "eval_subject", prompts))
    result.raise_for_failure()

    image = CAPTURED["eval_image"]
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3 and image.shape[1] > 100
    data = json.loads(CAPTURED["eval_json"])
    assert data["num_generated"] == 3 and data["real_photos"] == ["photo_0.png", "photo_1.png"]
    assert [row["prompt"] for row in data["per_image"]] == prompts.splitlines()
    assert data["models"]["dino"] == str(eval_models[0]) and data["models"]["clip"] == str(eval_models[1])
    real = comfy_host.base_dir / "input" / "eval_subject"
    expected = evaluate(generated, real, prompts, EvalModels.load(*eval_models))
    for key in ("dino", "clip_i", "clip_t"):
        assert [row[key] for row in data["per_image"]] == pytest.approx(expected.values(key), abs=1e-5)
    assert "CLIP-T" in CAPTURED["eval_text"] and "mean" in CAPTURED["eval_text"]
    preview = result.outputs["evaluate"]["images"]
    assert len(preview) == 1 and (comfy_host.base_dir / "temp" / preview[0]["filename"]).is_file()


def test_missing_model_folder_fails_with_its_name(comfy_host: ComfyHost, eval_models: tuple[Path, Path]) -> None:
    from comfyui_lora2.devtools.tiny_nodes import put_object

    save_photos(comfy_host.base_dir / "input" / "eval_missing", pictures(1, seed=24))
    key = put_object("gen-missing", pictures(1, seed=25))
    result = run_prompt(evaluate_prompt(key, "eval_missing", "a dog", dino_model="nope"))
    assert not result.success
    message = result.execution_error["exception_message"]
    expected = comfy_host.base_dir / "models" / "lora2_eval" / "nope"
    assert str(expected) in message and "facebook/dino-vits16" in message
