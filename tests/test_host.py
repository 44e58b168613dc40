"""The ComfyUI test harness itself: in-process boot and sampling, and the real server's round trip.

If these fail, every ComfyUI-level test is suspect, so they pin the harness down on stock nodes only
(plus the test-only nodes of ``devtools.tiny_nodes``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json

import pytest
from PIL import Image

from comfyui_lora2.devtools.comfy_host import ComfyHost, run_prompt
from comfyui_lora2.devtools.comfy_server import ComfyServer
from comfyui_lora2.devtools.layout import MISSING_HOST_REASON, PACK_LINK_NAME, STUBS_DIR, host_available
from comfyui_lora2.devtools.prompts import ksampler

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON)


def test_boot_loads_our_pack_cleanly(comfy_host: ComfyHost) -> None:
    assert comfy_host.pack_loaded, comfy_host.pack_import_failures
    assert comfy_host.pack_import_failures == []
    assert comfy_host.nodes.LOADED_MODULE_DIRS[PACK_LINK_NAME] == str(comfy_host.pack_path)
    # ComfyUI's copy of the pack, under its path-derived name, registers through comfy_entrypoint only
    # (one registration style), and every node of its list reached ComfyUI's registry.
    pack = comfy_host.pack_module()
    assert callable(pack.comfy_entrypoint) and not hasattr(pack, "NODE_CLASS_MAPPINGS")
    listed = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
    assert set(comfy_host.pack_node_names()) == {node.GET_SCHEMA().node_id for node in listed}
    assert "KSampler" in comfy_host.nodes.NODE_CLASS_MAPPINGS
    # Stock extras that need torchaudio/spandrel are expected to be missing on the CPU host, nothing else.
    expected_missing = {"nodes_audio.py", "nodes_audio_encoder.py", "nodes_upscale_model.py"}
    assert set(comfy_host.extras_import_failures) <= expected_missing


def test_torchvision_stub_is_hidden_after_boot(comfy_host: ComfyHost) -> None:
    """Once ComfyUI has imported it, the stub must not make transformers think torchvision exists."""
    from transformers.utils import is_torchvision_available

    spec = importlib.util.find_spec("torchvision")
    assert spec is None or not str(spec.origin).startswith(str(STUBS_DIR))
    assert spec is not None or not is_torchvision_available()


def _sample_prompt(family: str, empty_latent: str, steps: int = 2) -> dict:
    return {
        "model": {"class_type": "TestTinyModel", "inputs": {"family": family, "seed": 0}},
        "pos": {"class_type": "TestRandomConditioning", "inputs": {"family": family, "seed": 1, "batch": 1}},
        "neg": {"class_type": "TestRandomConditioning", "inputs": {"family": family, "seed": 2, "batch": 1}},
        "latent": {"class_type": empty_latent, "inputs": {"width": 64, "height": 48, "batch_size": 2}},
        "sample": ksampler(["model", 0], ["pos", 0], ["neg", 0], ["latent", 0], steps=steps, cfg=4.0),
        "vae": {"class_type": "TestTinyVAE", "inputs": {"family": family, "seed": 0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
        "capture": {"class_type": "TestCapture", "inputs": {"value": ["decode", 0], "key": f"image-{family}"}},
        "preview": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }


@pytest.mark.parametrize(
    ("family", "empty_latent"),
    [("sd15", "EmptyLatentImage"), ("sdxl", "EmptyLatentImage"), ("flux", "EmptySD3LatentImage")],
)
def test_in_process_ksampler_on_tiny_models(comfy_host: ComfyHost, family: str, empty_latent: str) -> None:
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED

    result = run_prompt(_sample_prompt(family, empty_latent)).raise_for_failure()

    image = CAPTURED[f"image-{family}"]
    assert tuple(image.shape) == (2, 48, 64, 3)
    assert bool(image.isfinite().all()) and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0
    assert result.outputs["capture"]["shape"] == [[2, 48, 64, 3]]
    preview = result.outputs["preview"]["images"]
    assert len(preview) == 2 and preview[0]["type"] == "temp"
    assert (comfy_host.base_dir / "temp" / preview[0]["filename"]).is_file()
    # KSampler reports each step through ProgressBar; the client saw the whole event sequence.
    sampler_steps = [p for p in result.progress if p.node_id == "sample"]
    assert [p.value for p in sampler_steps][-1] == 2 and all(p.total == 2 for p in sampler_steps)
    names = result.event_names()
    assert names[0] == "execution_start" and names[-1] == "execution_success"
    assert {"executing", "progress", "executed"} <= set(names)


def test_in_process_reports_validation_and_execution_errors(comfy_host: ComfyHost) -> None:
    invalid = run_prompt({"x": {"class_type": "VAEDecode", "inputs": {}}})
    assert not invalid.success and invalid.validation_error is not None

    prompt = _sample_prompt("sd15", "EmptyLatentImage")
    prompt["vae"]["inputs"]["family"] = "flux"  # a 16-channel VAE cannot decode 4-channel latents
    failed = run_prompt(prompt)
    assert not failed.success
    assert failed.execution_error is not None and failed.execution_error["node_id"] == "decode"
    with pytest.raises(AssertionError, match="decode"):
        failed.raise_for_failure()


def _v3_progress_node() -> type:
    """A V3 (``comfy_api.latest``) node that reports progress, may interrupt itself, previews an image."""
    import comfy.model_management
    import comfy.utils
    import torch
    from comfy_api.latest import io, ui

    class HostTestProgress(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id="HostTestProgress",
                category="_tests",
                inputs=[io.Int.Input("steps", default=3, min=1, max=10), io.Int.Input("interrupt_at", default=-1)],
                outputs=[io.Image.Output()],
                is_output_node=True,
            )

        @classmethod
        def execute(cls, steps: int, interrupt_at: int) -> io.NodeOutput:
            bar = comfy.utils.ProgressBar(steps)
            for step in range(steps):
                if step == interrupt_at:
                    comfy.model_management.interrupt_current_processing()  # as the UI's Cancel button does
                bar.update(1)  # the host's progress hook raises here once interrupted
            image = torch.zeros(1, 8, 8, 3)
            return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))

    return HostTestProgress


def test_in_process_v3_node_progress_preview_and_interrupt(comfy_host: ComfyHost) -> None:
    from comfyui_lora2.devtools.comfy_host import register_test_nodes

    register_test_nodes({"HostTestProgress": _v3_progress_node()})

    done = run_prompt({"n": {"class_type": "HostTestProgress", "inputs": {"steps": 3, "interrupt_at": -1}}})
    done.raise_for_failure()
    assert [(p.value, p.total, p.node_id) for p in done.progress] == [(1, 3, "n"), (2, 3, "n"), (3, 3, "n")]
    assert done.outputs["n"]["images"][0]["type"] == "temp"

    stopped = run_prompt({"n": {"class_type": "HostTestProgress", "inputs": {"steps": 3, "interrupt_at": 1}}})
    assert stopped.interrupted and not stopped.success
    assert [p.value for p in stopped.progress] == [1]


def test_written_sd15_unet_loads_with_stock_unet_loader(comfy_host: ComfyHost) -> None:
    """The generated file passes ComfyUI's SD1.x detection; objects built in Python reach the graph."""
    import torch

    from comfyui_lora2.devtools.tiny_models import write_tiny_sd15_unet
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED, put_object

    write_tiny_sd15_unet(comfy_host.base_dir / "models" / "diffusion_models" / "tiny_sd15.safetensors")
    put_object("cond768", [[torch.randn(1, 77, 768), {}]])
    prompt = _sample_prompt("sd15", "EmptyLatentImage")
    prompt["model"] = {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": "tiny_sd15.safetensors", "weight_dtype": "default"},
    }
    prompt["pos"] = prompt["neg"] = {"class_type": "TestObjectCONDITIONING", "inputs": {"key": "cond768"}}
    prompt["model_out"] = {"class_type": "TestCapture", "inputs": {"value": ["model", 0], "key": "sd15-file"}}

    run_prompt(prompt).raise_for_failure()

    model = CAPTURED["sd15-file"].model
    assert type(model.model_config).__name__ == "SD15"
    assert sum(p.numel() for p in model.diffusion_model.parameters()) == pytest.approx(25.8e6, rel=0.01)
    assert tuple(CAPTURED["image-sd15"].shape) == (2, 48, 64, 3)


def test_real_server_round_trip(host_server: ComfyServer) -> None:
    """post -> websocket -> execution_success -> history -> view, on stock nodes only.

    The server cannot take Python objects and has no CLIP model here; stock ``LotusConditioning``
    yields a CLIP-free [1, 77, 1024] conditioning, so the UNet is the one-level real-width SD2 shape
    (context 1024) that ``UNETLoader``'s model detection accepts.
    """
    from comfyui_lora2.devtools.tiny_models import write_tiny_taesd, write_tiny_unet

    models = host_server.base_dir / "models"
    write_tiny_unet(models / "diffusion_models" / "tiny_sd20.safetensors", "sd20")
    write_tiny_taesd(models / "vae" / "tiny_taesd.safetensors")

    info = host_server.object_info()
    assert {"KSampler", "UNETLoader", "VAELoader", "SaveImage", "LotusConditioning"} <= set(info)
    assert "tiny_sd20.safetensors" in host_server.object_info("UNETLoader")["input"]["required"]["unet_name"][0]

    prompt = {
        "unet": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "tiny_sd20.safetensors", "weight_dtype": "default"},
        },
        "cond": {"class_type": "LotusConditioning", "inputs": {}},
        "zero": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["cond", 0]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": ksampler(["unet", 0], ["cond", 0], ["zero", 0], ["latent", 0], cfg=2.0),
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_taesd.safetensors"}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "host_test"}},
    }
    run = host_server.run(json.loads(json.dumps(prompt)), timeout=120)

    types = run.event_types()
    assert types.index("execution_start") < types.index("execution_success"), types
    assert "progress" in types and "executed" in types
    assert run.history["status"]["status_str"] == "success"
    (image,) = run.images()
    assert image["type"] == "output" and image["filename"].startswith("host_test")
    png = Image.open(io.BytesIO(host_server.view(**image)))
    assert png.size == (64, 64)


def test_history_is_read_once_the_server_has_written_it(tmp_path, monkeypatch) -> None:
    """``execution_success`` arrives before ComfyUI writes the history entry: the client waits for it
    (a read right after the message found none on a loaded CI machine: ``KeyError: 'status'``)."""
    server = ComfyServer(tmp_path / "base")
    answers = iter([{}, {"prompt": []}, {"prompt": [], "status": {"status_str": "success"}}])
    monkeypatch.setattr(server, "history", lambda prompt_id: next(answers))
    assert server.finished_history("p1")["status"]["status_str"] == "success"
    monkeypatch.setattr(server, "history", lambda prompt_id: {})
    assert server.finished_history("p2", patience=0.2) == {}  # never written: what is there, not a hang
