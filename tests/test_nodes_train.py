"""Training in ComfyUI's graph, in-process: Dataset -> Train -> Apply -> KSampler on tiny seeded models.

Objects cross the graph boundary through the test-only nodes of ``devtools.tiny_nodes``; the pack's
node classes come from ComfyUI's own registry (ComfyUI imports the pack under a path-derived name).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from comfyui_lora2.devtools.comfy_host import ComfyHost, run_prompt
from comfyui_lora2.devtools.layout import MISSING_HOST_REASON, host_available
from comfyui_lora2.devtools.prompts import ksampler, lora2_dataset, lora2_train

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON)

LATENT_NODE = {"sd15": "EmptyLatentImage", "sdxl": "EmptyLatentImage", "flux": "EmptySD3LatentImage"}
VAE_CHANNELS = {"sd15": "sd15", "sdxl": "sdxl", "flux": "flux"}


@pytest.fixture(scope="module")
def subject(comfy_host: ComfyHost) -> Path:
    """Five small photos with captions in ComfyUI's input folder (real photos when ../shared has them)."""
    folder = comfy_host.base_dir / "input" / "subject"
    folder.mkdir(parents=True, exist_ok=True)
    shared = Path(__file__).resolve().parents[2] / "shared/data/dreambooth_256/dog"
    sources = sorted(shared.glob("*.jpg"))[:5] if shared.is_dir() else []
    for index in range(5):
        if sources:
            image = Image.open(sources[index]).convert("RGB").resize((96, 80))
        else:
            generator = torch.Generator().manual_seed(index)
            pixels = (torch.rand(80, 96, 3, generator=generator) * 255).to(torch.uint8).numpy()
            image = Image.fromarray(pixels)
        image.save(folder / f"{index:02d}.png")
    (folder / "00.txt").write_text("a photo of sks dog on grass")
    return folder


def training_prompt(family: str, steps: int = 20, **train_overrides) -> dict:
    settings = {
        "steps": steps,
        "batch_size": 2,
        "learning_rate": 1e-2,
        "rank_learning_rate": 0.1,
        "max_rank": 16,
        "checkpoint_name": f"lora2/{family}_checkpoint",
    }
    return {
        "model": {"class_type": "TestTinyModel", "inputs": {"family": family, "seed": 0}},
        "vae": {"class_type": "TestTinyVAE", "inputs": {"family": VAE_CHANNELS[family], "seed": 0}},
        "cond": {"class_type": "TestRandomConditioning", "inputs": {"family": family, "seed": 1, "batch": 1}},
        "dataset": lora2_dataset(["vae", 0], ["cond", 0], trigger="sks dog", flip=True),
        "train": lora2_train(["model", 0], ["dataset", 0], **{**settings, **train_overrides}),
        "apply": {
            "class_type": "LoRA2Apply",
            "inputs": {"model": ["model", 0], "adapter": ["train", 1], "strength": 1.0},
        },
        "latent": {"class_type": LATENT_NODE[family], "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": ksampler(["apply", 0], ["cond", 0], ["cond", 0], ["latent", 0]),
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
        "keep_adapter": {"class_type": "TestCapture", "inputs": {"value": ["train", 1], "key": f"adapter-{family}"}},
        "keep_history": {"class_type": "TestCapture", "inputs": {"value": ["train", 2], "key": f"history-{family}"}},
        "keep_image": {"class_type": "TestCapture", "inputs": {"value": ["decode", 0], "key": f"image-{family}"}},
        "keep_trained": {"class_type": "TestCapture", "inputs": {"value": ["train", 0], "key": f"trained-{family}"}},
    }


def test_pack_registers_its_nodes(comfy_host: ComfyHost) -> None:
    assert comfy_host.pack_import_failures == []
    assert {"LoRA2Dataset", "LoRA2Train", "LoRA2Apply", "LoRA2Save", "LoRA2Load"} <= set(comfy_host.pack_node_names())
    for name in comfy_host.pack_node_names():
        comfy_host.nodes.NODE_CLASS_MAPPINGS[name].define_schema().validate()
    info = comfy_host.nodes.NODE_CLASS_MAPPINGS["LoRA2Train"].INPUT_TYPES()
    for section in info.values():
        for name, spec in section.items():
            if len(spec) > 1 and isinstance(spec[1], dict):
                assert spec[1].get("tooltip"), f"LoRA2Train input {name} has no tooltip"


def test_fixed_rank_mode_trains_plain_lora_through_the_same_node(comfy_host: ComfyHost, subject: Path) -> None:
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED

    run_prompt(training_prompt("sd15", steps=12, mode="fixed rank", init_rank=6)).raise_for_failure()
    history, adapter = CAPTURED["history-sd15"], CAPTURED["adapter-sd15"]
    assert adapter.config.adaptive is False
    assert set(adapter.ranks().values()) == {6}
    assert all(set(row) == {6} for row in history["ranks"])


def test_sd15_dataset_train_apply_sample(comfy_host: ComfyHost, subject: Path) -> None:
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED

    result = run_prompt(training_prompt("sd15", steps=20)).raise_for_failure()
    history = CAPTURED["history-sd15"]
    adapter = CAPTURED["adapter-sd15"]
    assert len(history["loss"]) == 20 and len(history["ranks"]) == 20
    assert history["eval_loss"][-1] < history["eval_loss"][0], history["eval_loss"]
    ranks = adapter.ranks()
    assert len(ranks) == 7 * 8  # 7 transformer blocks x attn1/attn2 x q/k/v/out
    # 20 steps are too few for the evidence rule (decide_every=10, ~19-step evidence windows) to move a
    # width; growth and shrinking are pinned in tests/test_rank_control.py and the benchmarks
    assert all(1 <= rank <= 16 for rank in ranks.values()), ranks
    assert adapter.base_model == "TinySD15" or adapter.base_model.endswith("SD15")
    image = CAPTURED["image-sd15"]
    assert tuple(image.shape) == (1, 64, 64, 3) and bool(torch.isfinite(image).all())
    # the trained MODEL output differs from the base model: the patches are really there
    trained = CAPTURED["trained-sd15"]
    assert len(trained.patches) == len(ranks)
    train_progress = [p for p in result.progress if p.node_id == "train"]
    assert [p.value for p in train_progress][-1] == 20 and all(p.total == 20 for p in train_progress)


def test_second_run_hits_the_latent_cache(comfy_host: ComfyHost, subject: Path) -> None:
    from comfyui_lora2.devtools.tiny_models import tiny_vae
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED, put_object

    vae = tiny_vae(4, seed=7)  # weights no earlier test encoded with
    calls = []
    original = vae.encode
    vae.encode = lambda pixels: calls.append(pixels.shape[0]) or original(pixels)
    put_object("counted-vae", vae)
    prompt = training_prompt("sd15", steps=2)
    prompt["vae"] = {"class_type": "TestObjectVAE", "inputs": {"key": "counted-vae"}}
    prompt["dataset"]["inputs"]["folder"] = str(subject)  # an absolute path works too
    run_prompt(prompt).raise_for_failure()
    first = sum(calls)
    assert first == 10  # five images, each also mirrored
    run_prompt(prompt).raise_for_failure()
    assert sum(calls) == first  # nothing encoded again (memory cache)
    dataset_module = comfy_host.pack_module().nodes.dataset_node
    dataset_module.MEMORY_CACHE.clear()
    run_prompt(prompt).raise_for_failure()
    assert sum(calls) == first  # nothing encoded again (disk cache)
    assert len(list((comfy_host.base_dir / "models" / "lora2_cache").glob("latents-*.safetensors"))) >= 5
    assert CAPTURED["adapter-sd15"].ranks()


def _interrupt_at(step: int):
    """A progress hook wrapper that presses Cancel when the Train node reports ``step``."""
    import comfy.model_management
    import comfy.utils

    previous = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, prompt_id=None, node_id=None):
        if value >= step and total == 30:
            comfy.model_management.interrupt_current_processing()
        return previous(value, total, preview, prompt_id=prompt_id, node_id=node_id)

    return previous, hook


def test_cancel_saves_a_valid_adapter_and_resume_continues(comfy_host: ComfyHost, subject: Path) -> None:
    import comfy.model_management
    import comfy.utils

    from comfyui_lora2.devtools.tiny_nodes import CAPTURED

    lora_file = comfy_host.pack_module().lora2.lora_file
    prompt = training_prompt("sd15", steps=30, checkpoint_name="lora2/cancelled")
    previous, hook = _interrupt_at(7)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        result = run_prompt(prompt)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)
    assert result.interrupted and not result.success
    saved = comfy_host.base_dir / "models" / "loras" / "lora2" / "cancelled_step000007.safetensors"
    assert saved.is_file() and saved.with_suffix(".lora2state").is_file()
    partial = lora_file.load_adapter(saved)
    assert partial.steps == 7 and len(partial.history["loss"]) == 7 and partial.components
    state = partial.resume
    assert int(state.handle_state["__step__"]) == 7
    adam_steps = {float(v["step"]) for v in state.optimizer_state["state"].values()}
    assert adam_steps == {7.0}

    # a changed learning rate is not silently ignored: the file's continues the run, and the node says so
    resumed = training_prompt("sd15", steps=12, learning_rate=5e-3, resume="lora2/cancelled_step000007.lora2state")
    text = "\n".join(run_prompt(resumed).raise_for_failure().outputs["train"]["text"])
    assert "at step 7" in text and "learning_rate: 0.01 from the file (asked 0.005)" in text, text
    assert "steps=12" in text, text
    history = CAPTURED["history-sd15"]
    assert len(history["loss"]) == 12 and history["loss"][:7] == partial.history["loss"]
    final = CAPTURED["adapter-sd15"]
    assert final.steps == 12
    run_prompt(training_prompt("sd15", steps=12)).raise_for_failure()  # the same 12 steps, straight
    # 7 + 5 = 12, the same data in the same order: equal to the bit on most CPUs; on an AVX-512 EPYC one
    # run in three had the 12th loss one float32 ulp apart (MKL's kernels may depend on the data's
    # alignment). A resume with another data order, or one that lost the optimizer state, is caught.
    assert CAPTURED["history-sd15"]["loss"] == pytest.approx(history["loss"], rel=1e-6, abs=0)
    straight = CAPTURED["adapter-sd15"]
    for name, component in straight.components.items():
        # Equal up to round-off, for the same reason: ~1e-9 apart on values ~0.04 on that CPU.
        expected = component.delta()
        scale = float(expected.abs().max())
        torch.testing.assert_close(final.components[name].delta(), expected, rtol=0, atol=1e-6 * scale, msg=name)
    # every factor stepped 12 times (ν follows the width under the evidence rule: not an optimizer parameter)
    assert {float(v["step"]) for v in final.resume.optimizer_state["state"].values()} == {12.0}


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_other_families_train_and_sample(comfy_host: ComfyHost, subject: Path, family: str) -> None:
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED

    run_prompt(training_prompt(family, steps=4)).raise_for_failure()
    adapter = CAPTURED[f"adapter-{family}"]
    assert adapter.components and all(rank >= 2 for rank in adapter.ranks().values())
    if family == "flux":
        assert any(".img_attn.qkv" in name for name in adapter.components)
        assert any("single_blocks.0.linear1" == name for name in adapter.components)
    assert len(CAPTURED[f"history-{family}"]["loss"]) == 4
    image = CAPTURED[f"image-{family}"]
    assert image.shape[0] == 1 and bool(torch.isfinite(image).all())
