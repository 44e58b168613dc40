"""LoRA² Rank Heatmap and LoRA² Prune in ComfyUI's graph, in-process."""

from __future__ import annotations

import json

import pytest

from comfyui_lora2.devtools.adapters import random_adapter
from comfyui_lora2.devtools.comfy_host import ComfyHost, run_prompt
from comfyui_lora2.devtools.layout import MISSING_HOST_REASON, host_available
from comfyui_lora2.devtools.prompts import adapter_object, lora2_save

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON)


def heatmap_prompt(adapter_key: str | None, lora_name: str = "none", history_key: str | None = None) -> dict:
    inputs = {"lora_name": lora_name, "width": 1024, "title": ""}
    prompt: dict = {}
    if adapter_key is not None:
        prompt["adapter"] = {"class_type": "TestObjectLORA2_ADAPTER", "inputs": {"key": adapter_key}}
        inputs["adapter"] = ["adapter", 0]
    if history_key is not None:
        prompt["history"] = {"class_type": "TestObjectLORA2_HISTORY", "inputs": {"key": history_key}}
        inputs["history"] = ["history", 0]
    prompt["heatmap"] = {"class_type": "LoRA2Heatmap", "inputs": inputs}
    prompt["keep_image"] = {"class_type": "TestCapture", "inputs": {"value": ["heatmap", 0], "key": "heatmap"}}
    prompt["keep_text"] = {"class_type": "TestCapture", "inputs": {"value": ["heatmap", 1], "key": "table"}}
    prompt["keep_json"] = {"class_type": "TestCapture", "inputs": {"value": ["heatmap", 2], "key": "json"}}
    return prompt


@pytest.mark.parametrize(("family", "rows", "first_row"), [("sd15", 7, "in1.t0"), ("flux", 2, "double0")])
def test_heatmap_of_an_adapter(comfy_host: ComfyHost, family: str, rows: int, first_row: str) -> None:
    from comfyui_lora2.devtools.tiny_models import FAMILIES
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED, put_object

    adapter = random_adapter(FAMILIES[family].model(0).model.diffusion_model, family)
    result = run_prompt(heatmap_prompt(put_object(f"heat-{family}", adapter))).raise_for_failure()
    image = CAPTURED["heatmap"]
    assert image.shape[0] == 1 and image.shape[2] == 1024 and image.shape[3] == 3
    table = json.loads(CAPTURED["json"])
    assert len(table["rows"]) == rows and table["rows"][0] == first_row
    assert first_row in CAPTURED["table"]
    assert table["totals"]["parameters"] == adapter.num_parameters()
    preview = result.outputs["heatmap"]["images"]
    assert len(preview) == 1 and (comfy_host.base_dir / "temp" / preview[0]["filename"]).is_file()


def test_heatmap_history_panel_and_any_lora_file(comfy_host: ComfyHost) -> None:
    from comfyui_lora2.devtools.tiny_models import FAMILIES
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED, put_object

    adapter = random_adapter(FAMILIES["sd15"].model(0).model.diffusion_model, "sd15")
    key = put_object("heat-file", adapter)
    run_prompt(heatmap_prompt(key)).raise_for_failure()
    plain_height = CAPTURED["heatmap"].shape[1]
    names = list(adapter.components)
    history = {"components": names, "loss": [0.3, 0.2, 0.1], "ranks": [[2] * len(names)] * 3}
    run_prompt(heatmap_prompt(key, history_key=put_object("hist", history))).raise_for_failure()
    assert CAPTURED["heatmap"].shape[1] > plain_height

    save = {
        "adapter": adapter_object(key),
        "save": lora2_save(["adapter", 0], "inspect/any", precision="float16"),
    }
    run_prompt(save).raise_for_failure()
    run_prompt(heatmap_prompt(None, lora_name="inspect/any.safetensors")).raise_for_failure()
    from_file = json.loads(CAPTURED["json"])
    assert from_file["rows"][0] == "in1.t0" and from_file["totals"]["parameters"] == adapter.num_parameters()
    cells = from_file["cells"]
    assert all(cell["energy90"] <= cell["rank"] for cell in cells)


def test_prune_to_a_budget_in_the_graph(comfy_host: ComfyHost) -> None:
    from comfyui_lora2.devtools.tiny_models import FAMILIES
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED, put_object

    adapter = random_adapter(FAMILIES["sd15"].model(0).model.diffusion_model, "sd15")
    budget = adapter.num_parameters() // 3
    prompt = {
        "adapter": {"class_type": "TestObjectLORA2_ADAPTER", "inputs": {"key": put_object("prune", adapter)}},
        "prune": {
            "class_type": "LoRA2Prune",
            "inputs": {
                "adapter": ["adapter", 0],
                "lora_name": "none",
                "policy": "budget (parameters)",
                "value": budget,
            },
        },
        "keep": {"class_type": "TestCapture", "inputs": {"value": ["prune", 0], "key": "pruned"}},
        "keep_report": {"class_type": "TestCapture", "inputs": {"value": ["prune", 1], "key": "report"}},
    }
    result = run_prompt(prompt).raise_for_failure()
    pruned = CAPTURED["pruned"]
    assert 0 < pruned.num_parameters() <= budget
    assert pruned.source == "pruned"
    assert "rank" in CAPTURED["report"] and result.outputs["prune"]["text"] == [CAPTURED["report"]]


def _ranked_adapter():
    """Two LoRA² components of rank 8 with equal singular values and a steep importance (rate 2): the
    importance mass keeps 2 positions at 0.9, singular-value energy keeps all 8, so every policy differs."""
    import torch

    from comfyui_lora2.lora2 import rank as rank_math
    from comfyui_lora2.lora2.adapter import Adapter, Component

    generator = torch.Generator().manual_seed(0)
    components = {}
    for name in ("blocks.0.attn.to_q", "blocks.0.attn.to_k"):
        up = torch.linalg.qr(torch.randn(24, 8, generator=generator, dtype=torch.float64))[0].float()
        down = torch.linalg.qr(torch.randn(16, 8, generator=generator, dtype=torch.float64))[0].T.float().contiguous()
        components[name] = Component(up, down, nu=rank_math.nu_for_rate(2.0))
    return Adapter(components=components, base_model="Test")


POLICY_VALUES = {"importance mass": 0.9, "singular-value energy": 0.9, "budget (parameters)": 200, "budget (MB)": 6e-4}
"""Per policy a setting at which, on :func:`_ranked_adapter`, it keeps 2+2, 8+8, 3+2 and 4+3 directions."""


@pytest.mark.parametrize("policy", list(POLICY_VALUES))
def test_every_prune_policy_runs_the_pruning_it_names(comfy_host: ComfyHost, policy: str) -> None:
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED, put_object
    from comfyui_lora2.lora2.prune import prune_by_energy, prune_by_mass, prune_to_budget

    adapter = _ranked_adapter()
    v = POLICY_VALUES
    expected = {
        "importance mass": prune_by_mass(adapter, v["importance mass"]),
        "singular-value energy": prune_by_energy(adapter, v["singular-value energy"]),
        "budget (parameters)": prune_to_budget(adapter, max_parameters=int(v["budget (parameters)"])),
        "budget (MB)": prune_to_budget(adapter, max_megabytes=v["budget (MB)"]),
    }
    ranks = {name: sorted(pruned.ranks().values()) for name, (pruned, _) in expected.items()}
    assert ranks == {
        "importance mass": [2, 2],
        "singular-value energy": [8, 8],
        "budget (parameters)": [2, 3],
        "budget (MB)": [3, 4],
    }  # the policies really differ on this adapter, so running the wrong one fails below
    prompt = {
        "adapter": {"class_type": "TestObjectLORA2_ADAPTER", "inputs": {"key": put_object("ranked", adapter)}},
        "prune": {
            "class_type": "LoRA2Prune",
            "inputs": {"adapter": ["adapter", 0], "lora_name": "none", "policy": policy, "value": v[policy]},
        },
        "keep": {"class_type": "TestCapture", "inputs": {"value": ["prune", 0], "key": "policy-pruned"}},
    }
    run_prompt(prompt).raise_for_failure()
    assert CAPTURED["policy-pruned"].ranks() == expected[policy][0].ranks()
