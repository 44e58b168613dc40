"""The adapter file is a standard LoRA: ComfyUI's stock loader and diffusers read it as LoRA² Apply does.

* ``LoraLoaderModelOnly`` on a file written by LoRA² Save changes the sampler output exactly as LoRA²
  Apply does (max abs diff < 1e-4 in fp32), with zero "lora key not loaded" warnings, on tiny SD1.5-,
  SDXL- and Flux-shaped models.
* The SD1.5-shaped file loads into a diffusers UNet of the same layout and changes its output exactly
  as merging every ΔW into the matching diffusers weight would.
* Files in other layouts (ComfyUI-native, PEFT, diffusers) read back to the same ΔW.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfyui_lora2.devtools.adapters import random_adapter
from comfyui_lora2.devtools.comfy_host import ComfyHost, logged_warnings, run_prompt
from comfyui_lora2.devtools.layout import MISSING_HOST_REASON, host_available
from comfyui_lora2.devtools.prompts import adapter_object, ksampler, lora2_save
from comfyui_lora2.lora2 import LoRA2Error
from comfyui_lora2.lora2.lora_file import load_adapter, read_safetensors
from comfyui_lora2.lora2.lora_formats import parse_lora

pytest_plugins = ["support.fixtures"]
needs_host = pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON)
LATENT = {"sd15": ("EmptyLatentImage", 4), "sdxl": ("EmptyLatentImage", 4), "flux": ("EmptySD3LatentImage", 16)}


def sample_prompt(family: str, model_source: dict) -> dict:
    latent, _ = LATENT[family]
    return {
        "model": {"class_type": "TestTinyModel", "inputs": {"family": family, "seed": 0}},
        **model_source,
        "cond": {"class_type": "TestRandomConditioning", "inputs": {"family": family, "seed": 1, "batch": 1}},
        "latent": {"class_type": latent, "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": ksampler(["adapted", 0], ["cond", 0], ["cond", 0], ["latent", 0], steps=3, seed=3),
        "keep": {"class_type": "TestCapture", "inputs": {"value": ["sample", 0], "key": f"latent-{family}"}},
    }


@needs_host
@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_stock_loader_matches_lora2_apply(comfy_host: ComfyHost, family: str) -> None:
    from comfyui_lora2.devtools.tiny_models import FAMILIES
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED, put_object

    adapter = random_adapter(FAMILIES[family].model(0).model.diffusion_model, family)
    key = put_object(f"adapter-{family}", adapter)
    apply = {
        "adapter": adapter_object(key),
        "adapted": {
            "class_type": "LoRA2Apply",
            "inputs": {"model": ["model", 0], "adapter": ["adapter", 0], "strength": 1.0},
        },
        "save": lora2_save(["adapter", 0], f"compat/{family}", model=["model", 0]),
    }
    run_prompt(sample_prompt(family, apply)).raise_for_failure()
    with_apply = CAPTURED[f"latent-{family}"]["samples"].clone()

    base = {
        "adapted": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["model", 0], "lora_name": "x", "strength_model": 0.0},
        }
    }
    base["adapted"]["inputs"]["lora_name"] = f"compat/{family}.safetensors"
    run_prompt(sample_prompt(family, base)).raise_for_failure()
    without = CAPTURED[f"latent-{family}"]["samples"].clone()

    stock = {
        "adapted": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["model", 0], "lora_name": f"compat/{family}.safetensors", "strength_model": 1.0},
        }
    }
    with logged_warnings() as warnings:
        run_prompt(sample_prompt(family, stock)).raise_for_failure()
    with_stock = CAPTURED[f"latent-{family}"]["samples"]
    assert not [m for m in warnings if "lora key not loaded" in m]
    assert float((with_apply - without).abs().max()) > 1e-2  # the adapter does change the output
    assert float((with_apply - with_stock).abs().max()) < 1e-4
    tensors, metadata = read_safetensors(comfy_host.base_dir / "models" / "loras" / "compat" / f"{family}.safetensors")
    assert len([k for k in tensors if k.endswith(".alpha")]) == len(adapter.components)
    assert metadata["ss_network_dim"] == "Dynamic"


def _diffusers_unet():
    from diffusers import UNet2DConditionModel

    from comfyui_lora2.devtools.tiny_pipelines import SD15_UNET

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD15_UNET).eval()


@needs_host
def test_sd15_file_loads_in_diffusers(comfy_host: ComfyHost) -> None:
    import comfy.utils
    from diffusers import StableDiffusionPipeline

    from comfyui_lora2.devtools.tiny_models import FAMILIES, SD15_UNET_CONFIG
    from comfyui_lora2.devtools.tiny_nodes import put_object

    model = FAMILIES["sd15"].model(0)
    adapter = random_adapter(model.model.diffusion_model, "sd15", seed=5)
    key = put_object("adapter-diffusers", adapter)
    prompt = {
        "model": {"class_type": "TestTinyModel", "inputs": {"family": "sd15", "seed": 0}},
        "adapter": adapter_object(key),
        "save": lora2_save(["adapter", 0], "compat/diffusers_sd15", model=["model", 0]),
    }
    run_prompt(prompt).raise_for_failure()
    path = comfy_host.base_dir / "models" / "loras" / "compat" / "diffusers_sd15.safetensors"

    # where each component lives in diffusers' layout, from ComfyUI's own name map
    config = dict(SD15_UNET_CONFIG, num_heads=4, num_head_channels=-1)
    to_diffusers = {
        v[: -len(".weight")]: k[: -len(".weight")] for k, v in comfy.utils.unet_to_diffusers(config).items()
    }
    merged = _diffusers_unet()
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, component in adapter.components.items():
            modules[to_diffusers[name]].weight += component.delta()

    unet = _diffusers_unet()
    state_dict, network_alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(state_dict, network_alphas, unet=unet)

    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = _diffusers_unet()(sample, 10, encoder_hidden_states=context).sample
        expected = merged(sample, 10, encoder_hidden_states=context).sample
        got = unet(sample, 10, encoder_hidden_states=context).sample
    assert float((expected - base).abs().max()) > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _reference() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, generator=generator), torch.randn(3, 5, generator=generator)


@pytest.mark.parametrize(
    ("layout", "expected_format"),
    [
        ({"k.lora_up.weight": "up", "k.lora_down.weight": "down", "k.alpha": 1.5}, "kohya"),
        ({"diffusion_model.k.lora_up.weight": "up", "diffusion_model.k.lora_down.weight": "down"}, "comfyui"),
        ({"unet.k.lora_B.weight": "up", "unet.k.lora_A.weight": "down"}, "peft"),
        ({"unet.k.lora.up.weight": "up", "unet.k.lora.down.weight": "down"}, "diffusers"),
        ({"k.lora_linear_layer.up.weight": "up", "k.lora_linear_layer.down.weight": "down"}, "transformers"),
    ],
)
def test_foreign_layouts_read_to_the_same_delta(tmp_path, layout: dict, expected_format: str) -> None:
    up, down = _reference()
    tensors = {}
    for key, value in layout.items():
        tensors[key] = {"up": up, "down": down}[value] if isinstance(value, str) else torch.tensor(value)
    tensors["unrelated.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "foreign.safetensors")
    adapter = load_adapter(tmp_path / "foreign.safetensors")
    (name,) = adapter.components
    scale = 1.5 / 3 if "k.alpha" in layout else 1.0
    torch.testing.assert_close(adapter.delta(name), (up @ down) * scale)
    assert adapter.source == expected_format
    assert adapter.extra["ignored_keys"] == ["unrelated.weight"]


def test_unsupported_layouts_are_refused_by_name() -> None:
    up, down = _reference()
    with pytest.raises(LoRA2Error, match="lora_mid"):
        parse_lora({"k.lora_up.weight": up, "k.lora_down.weight": down, "k.lora_mid.weight": torch.zeros(3, 3, 1, 1)})
    with pytest.raises(LoRA2Error, match="has no matching"):
        parse_lora({"k.lora_up.weight": up})
    with pytest.raises(LoRA2Error, match="do not chain"):
        parse_lora({"k.lora_up.weight": up, "k.lora_down.weight": torch.zeros(4, 5)})
