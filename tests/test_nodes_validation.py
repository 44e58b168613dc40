"""LoRA² Validation in ComfyUI, in-process: its widgets, and the sampler drawing the adapter as it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_lora2.devtools.comfy_host import ComfyHost
from comfyui_lora2.devtools.layout import MISSING_HOST_REASON, host_available

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON)


def test_validation_widget_defaults_are_the_config_defaults(comfy_host: ComfyHost) -> None:
    from comfyui_lora2.lora2.validation import ValidationConfig

    info = comfy_host.nodes.NODE_CLASS_MAPPINGS["LoRA2Validation"].INPUT_TYPES()
    widgets = {name: spec[1].get("default") for section in info.values() for name, spec in section.items()}
    config = ValidationConfig()
    expected = {
        "validate_every": config.every,
        "seed": config.seed,
        "steps": config.steps,
        "width": config.width,
        "height": config.height,
        "cfg": config.cfg,
        "sampler_name": config.sampler,
        "scheduler": config.scheduler,
        "run_name": config.run_name,
    }
    assert {name: widgets[name] for name in expected} == expected
    for section in info.values():
        for name, spec in section.items():
            assert spec[1].get("tooltip"), f"LoRA2Validation input {name} has no tooltip"


def _plan(pack, vae, conditioning, **settings):
    sampling = pack.nodes.comfy.sampling
    config = pack.lora2.validation.ValidationConfig(**{"steps": 3, "width": 64, "height": 64, **settings})
    positives = sampling.split_conditioning(conditioning)
    return sampling.ValidationPlan(config, [f"p{i}" for i in range(len(positives))], positives, None, vae)


def test_sampler_draws_the_attached_adapter_as_apply_would(comfy_host: ComfyHost) -> None:
    """Sampling the MODEL while the adapter hooks are attached = sampling it with the folded adapter applied."""
    from comfyui_lora2.devtools.tiny_models import sd15_conditioning, tiny_sd15_model, tiny_vae

    pack = comfy_host.pack_module()
    sampling = pack.nodes.comfy.sampling
    model, vae = tiny_sd15_model(0), tiny_vae(4, 0)
    plan = _plan(pack, vae, sd15_conditioning(seed=1, batch=2))
    base = sampling.make_sampler(model, plan)()
    assert len(base) == 2 and all(image.size == (64, 64) for image in base)

    handle = pack.lora2.attach(model.model.diffusion_model, pack.lora2.LoRA2Config(targets="attn", init_rank=4))
    try:
        generator = torch.Generator().manual_seed(3)
        for component in handle.components.values():
            component.up.data = torch.randn(component.up.shape, generator=generator) * 0.5
        with torch.no_grad():
            hooked = sampling.make_sampler(model, plan)()
        adapter = pack.lora2.adapter.Adapter.from_handle(handle, "SD15")
    finally:
        handle.detach()
    patched = sampling.make_sampler(pack.nodes.comfy.patches.apply_adapter(model, adapter, 1.0), plan)()

    def pixels(images):
        return torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32)) for image in images])

    assert (pixels(hooked) - pixels(base)).abs().mean() > 10.0  # the adapter shows in the samples
    assert (pixels(hooked) - pixels(patched)).abs().max() <= 2.0  # ... exactly as Apply's patches draw it


def test_sampler_without_vae_draws_the_latent_preview(comfy_host: ComfyHost) -> None:
    from comfyui_lora2.devtools.tiny_models import sd15_conditioning, tiny_sd15_model

    pack = comfy_host.pack_module()
    plan = _plan(pack, None, sd15_conditioning(seed=1), width=96, height=64)
    images = pack.nodes.comfy.sampling.make_sampler(tiny_sd15_model(0), plan)()
    assert len(images) == 1 and images[0].size == (96, 64)
    assert images[0].getextrema() != ((0, 0), (0, 0), (0, 0))


def test_conditioning_splits_into_one_prompt_per_row(comfy_host: ComfyHost) -> None:
    from comfyui_lora2.devtools.tiny_models import sdxl_conditioning

    split = comfy_host.pack_module().nodes.comfy.sampling.split_conditioning
    parts = split(sdxl_conditioning(seed=0, batch=3))
    assert len(parts) == 3
    for part in parts:
        cross_attn, extras = part[0]
        assert cross_attn.shape[0] == 1 and extras["pooled_output"].shape[0] == 1
    full = sdxl_conditioning(seed=0, batch=3)
    assert torch.equal(parts[2][0][1]["pooled_output"], full[0][1]["pooled_output"][2:3])
    with pytest.raises(Exception, match="empty"):
        split([])


@pytest.fixture(scope="module")
def subject(comfy_host: ComfyHost) -> str:
    """Four generated 64 px photos in ComfyUI's input folder."""
    from PIL import Image

    folder = comfy_host.base_dir / "input" / "validation_subject"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(4):
        generator = torch.Generator().manual_seed(index)
        pixels = (torch.rand(64, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{index:02d}.png")
    return folder.name


def _graph(subject: str, validation: bool, steps: int = 10) -> dict:
    from comfyui_lora2.devtools.prompts import lora2_dataset, lora2_train

    prompt = {
        "model": {"class_type": "TestTinyModel", "inputs": {"family": "sd15", "seed": 0}},
        "vae": {"class_type": "TestTinyVAE", "inputs": {"family": "sd15", "seed": 0}},
        "cond": {"class_type": "TestRandomConditioning", "inputs": {"family": "sd15", "seed": 1, "batch": 1}},
        "dataset": lora2_dataset(["vae", 0], ["cond", 0], folder=subject),
        "train": lora2_train(["model", 0], ["dataset", 0], steps=steps, learning_rate=1e-2, eval_every=5),
        "keep_adapter": {"class_type": "TestCapture", "inputs": {"value": ["train", 1], "key": "val-adapter"}},
        "keep_history": {"class_type": "TestCapture", "inputs": {"value": ["train", 2], "key": "val-history"}},
    }
    if validation:
        prompt["prompts"] = {
            "class_type": "TestRandomConditioning",
            "inputs": {"family": "sd15", "seed": 5, "batch": 2},
        }
        prompt["validation"] = {
            "class_type": "LoRA2Validation",
            "inputs": {
                "prompts": "a sks dog\na sks dog in the snow",
                "validate_every": 4,
                "seed": 3,
                "steps": 2,
                "width": 64,
                "height": 64,
                "cfg": 5.0,
                "sampler_name": "euler_ancestral",  # draws fresh noise from the global RNG at every step
                "scheduler": "normal",
                "run_name": "graph_test",
                "conditioning": ["prompts", 0],
                "vae": ["vae", 0],
            },
        }
        prompt["train"]["inputs"]["validation"] = ["validation", 0]
    return prompt


def test_train_samples_grids_shows_them_and_leaves_the_adapter_bit_identical(
    comfy_host: ComfyHost, subject: str
) -> None:
    from PIL import Image

    from comfyui_lora2.devtools.comfy_host import run_prompt
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED

    run_prompt(_graph(subject, validation=False)).raise_for_failure()  # builds and caches model, VAE, dataset
    torch.manual_seed(7)
    result = run_prompt(_graph(subject, validation=True)).raise_for_failure()
    adapter, history, rng_validated = CAPTURED["val-adapter"], CAPTURED["val-history"], torch.get_rng_state()
    torch.manual_seed(7)
    run_prompt(_graph(subject, validation=False)).raise_for_failure()
    plain_adapter, plain_history, rng_plain = CAPTURED["val-adapter"], CAPTURED["val-history"], torch.get_rng_state()
    assert torch.equal(rng_validated, rng_plain)  # the sampler's torch.manual_seed did not leak out

    assert history["validation_steps"] == [0, 4, 8, 10] and not plain_history["validation_steps"]
    assert history["eval_steps"] == [0, 5, 10]  # eval_every reaches the trainer
    folder = comfy_host.base_dir / "output" / "lora2" / "graph_test"
    grids = sorted(path.name for path in folder.glob("step_*.png"))
    assert grids == ["step_000000.png", "step_000004.png", "step_000008.png", "step_000010.png"]
    first, last = (Image.open(folder / name).convert("RGB") for name in (grids[0], grids[-1]))
    assert first.size == last.size and first.width > 2 * 64  # two 64 px tiles side by side
    assert first.tobytes() != last.tobytes()  # the adapter changed what the model draws
    previews = [p for p in result.progress if p.node_id == "train" and p.has_preview]
    assert [p.value for p in previews] == [0, 4, 8, 10]
    shown = result.outputs["train"]["images"]
    assert shown[0] == {"filename": "step_000010.png", "subfolder": "lora2/graph_test", "type": "output"}

    assert history["loss"] == plain_history["loss"] and history["eval_loss"] == plain_history["eval_loss"]
    assert adapter.ranks() == plain_adapter.ranks()
    for name, component in plain_adapter.components.items():
        assert torch.equal(adapter.components[name].delta(), component.delta()), name
    for key, tensor in plain_adapter.resume.handle_state.items():
        assert torch.equal(adapter.resume.handle_state[key], tensor), key

    run_prompt(_graph(subject, validation=True, steps=3)).raise_for_failure()  # a second run: its own folder
    assert sorted(p.name for p in folder.with_name("graph_test_2").glob("step_*.png")) == [
        "step_000000.png",
        "step_000003.png",
    ]


def test_sample_prompts_draws_each_prompt_with_the_trained_model(comfy_host: ComfyHost, subject: str) -> None:
    from comfyui_lora2.devtools.comfy_host import run_prompt
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED

    prompt = _graph(subject, validation=True, steps=2)
    prompt["train"]["inputs"].pop("validation")
    prompt["sample"] = {
        "class_type": "LoRA2SamplePrompts",
        "inputs": {"model": ["train", 0], "prompts": ["validation", 0]},
    }
    prompt["sample_base"] = {
        "class_type": "LoRA2SamplePrompts",
        "inputs": {"model": ["model", 0], "prompts": ["validation", 0]},
    }
    for key, (node, index) in {"images": ("sample", 0), "text": ("sample", 1), "base": ("sample_base", 0)}.items():
        prompt[f"keep_{key}"] = {
            "class_type": "TestCapture",
            "inputs": {"value": [node, index], "key": f"sample-{key}"},
        }
    result = run_prompt(prompt).raise_for_failure()
    images, base = CAPTURED["sample-images"], CAPTURED["sample-base"]
    assert tuple(images.shape) == (2, 64, 64, 3) and bool(torch.isfinite(images).all())
    assert CAPTURED["sample-text"] == "a sks dog\na sks dog in the snow"
    assert (images - base).abs().mean() > 1e-3  # the trained adapter is in the MODEL it sampled
    assert [p.value for p in result.progress if p.node_id == "sample"][-2:] == [1, 2]
