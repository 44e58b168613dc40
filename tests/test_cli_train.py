"""lora2-train end to end on tiny SD1.5 / SDXL diffusers models: the file it writes is a LoRA ComfyUI loads.

* From a diffusers folder, the CLI trains and writes the adapter, its resume state, the heatmap PNG,
  validation grids, checkpoints and run.json; ComfyUI's stock LoraLoaderModelOnly loads the adapter
  onto the same network (ComfyUI's own tiny model of that layout) with zero "lora key not loaded", and
  every weight it patches moves by exactly the file's ``up @ down`` at the place ComfyUI's
  diffusers-name map puts it.
* From a single-file checkpoint (diffusers' single-file loader with a local folder of configs only, no
  weights) it trains the very same adapter as from the folder, bit for bit.
* Ctrl-C (SIGINT) stops after the current step with a checkpoint, exit status 130; resuming from it
  ends at the adapter of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from comfyui_lora2.cli import main, train_command
from comfyui_lora2.devtools.comfy_host import ComfyHost, logged_warnings, run_prompt
from comfyui_lora2.devtools.layout import MISSING_HOST_REASON, host_available

pytest_plugins = ["support.fixtures"]
needs_host = pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON)
TINY = ["--resolution", "64", "--dtype", "float32", "--validate-width", "64", "--validate-height", "64"]
TINY += ["--validate-steps", "2", "--init-rank", "2", "--max-rank", "8"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from comfyui_lora2.devtools.tiny_pipelines import save_tiny_pipeline, write_subject

    root = tmp_path_factory.mktemp("cli_models")
    write_subject(root / "data")
    return {
        "data": root / "data",
        "sd15": save_tiny_pipeline(root / "sd15", "sd15"),
        "sdxl": save_tiny_pipeline(root / "sdxl", "sdxl"),
    }


def train(model: Path, data: Path, output: Path, *extra: str) -> int:
    return main(["--model", str(model), "--data", str(data), "--output", str(output), *TINY, *extra])


def stock_loader_deltas(comfy_host: ComfyHost, family: str, lora: Path) -> tuple[dict, list[str]]:
    """Load ``lora`` with ComfyUI's LoraLoaderModelOnly onto its tiny ``family`` model; the weight deltas it
    applies (ComfyUI weight name -> tensor) and the warnings logged while loading."""
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED

    target = comfy_host.base_dir / "models" / "loras" / "cli" / f"{family}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(lora.read_bytes())
    prompt = {
        "model": {"class_type": "TestTinyModel", "inputs": {"family": family, "seed": 0}},
        "lora": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["model", 0], "lora_name": f"cli/{family}.safetensors", "strength_model": 1.0},
        },
        "keep": {"class_type": "TestCapture", "inputs": {"value": ["lora", 0], "key": f"cli-{family}"}},
    }
    with logged_warnings() as warnings:
        run_prompt(prompt).raise_for_failure()
    patcher = CAPTURED[f"cli-{family}"]
    before = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    patcher.patch_model()
    try:
        after = patcher.model.state_dict()
        deltas = {k: after[k].float() - before[k].float() for k in patcher.patches}
    finally:
        patcher.unpatch_model()
    return deltas, warnings


def file_deltas(path: Path) -> dict[str, torch.Tensor]:
    """``alpha / rank · up @ down`` per LoRA key of a kohya file: the standard definition, read independently."""
    tensors = load_file(str(path))
    out = {}
    for key in {k.rsplit(".lora_up.weight", 1)[0] for k in tensors if k.endswith(".lora_up.weight")}:
        up, down = tensors[f"{key}.lora_up.weight"].float(), tensors[f"{key}.lora_down.weight"].float()
        scale = float(tensors[f"{key}.alpha"]) / down.shape[0]
        out[key] = scale * (up.flatten(1) @ down.flatten(1))
    return out


def comfy_weight_names(comfy_host: ComfyHost, family: str) -> dict[str, str]:
    """kohya key on diffusers names -> ComfyUI weight, from ComfyUI's own name map."""
    import comfy.utils

    from comfyui_lora2.devtools.tiny_models import FAMILIES

    config = FAMILIES[family].model(0).model.model_config.unet_config
    return {
        "lora_unet_" + d[: -len(".weight")].replace(".", "_"): "diffusion_model." + ldm
        for d, ldm in comfy.utils.unet_to_diffusers(config).items()
        if d.endswith(".weight")
    }


@needs_host
@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cli_adapter_loads_in_comfyui_stock_loader(comfy_host: ComfyHost, tiny, tmp_path: Path, family: str) -> None:
    out = tmp_path / "out"
    assert train(tiny[family], tiny["data"], out, "--steps", "4", "--save-every", "2", "--validate-every", "2") == 0
    for name in ("lora2.safetensors", "lora2.lora2state", "checkpoints/lora2_step000002.safetensors", "run.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [f"step_00000{i}.png" for i in (0, 2, 4)]
    assert Image.open(out / "lora2_heatmap.png").width == 1024
    summary = json.loads((out / "run.json").read_text())
    assert summary["family"] == family.upper() and summary["steps"] == 4 and summary["lora2"]["init_rank"] == 2

    expected = file_deltas(out / "lora2.safetensors")
    names = comfy_weight_names(comfy_host, family)
    deltas, warnings = stock_loader_deltas(comfy_host, family, out / "lora2.safetensors")
    assert not [m for m in warnings if "lora key not loaded" in m]
    assert len(expected) == summary["components"] and set(deltas) == {names[key] for key in expected}
    for key, delta in expected.items():
        got = deltas[names[key]]
        torch.testing.assert_close(got.flatten(1), delta, atol=2e-3, rtol=1e-2)  # fp16 file, fp32 model
    assert max(float(d.abs().max()) for d in expected.values()) > 0  # training moved the adapter


@needs_host
@pytest.mark.slow
def test_single_file_checkpoint_trains_the_same_adapter(comfy_host: ComfyHost, tiny, tmp_path: Path) -> None:
    from comfyui_lora2.devtools.tiny_pipelines import write_single_file

    checkpoint = write_single_file(tiny["sd15"], tmp_path / "tiny_sd15.safetensors", "sd15")
    configs = shutil.copytree(tiny["sd15"], tmp_path / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    common = ["--steps", "3", "--no-validate"]
    assert train(tiny["sd15"], tiny["data"], tmp_path / "folder", *common) == 0
    assert train(checkpoint, tiny["data"], tmp_path / "single", *common, "--model-config", str(configs)) == 0
    folder, single = (
        load_file(str(tmp_path / "folder/lora2.safetensors")),
        load_file(str(tmp_path / "single/lora2.safetensors")),
    )
    assert folder.keys() == single.keys()
    for key, value in folder.items():
        # The same training up to round-off: the two loads' weights reach the kernels in different
        # layouts, and on some CPUs (AVX-512 EPYC) that moves a few float16 values of the file by one
        # unit in the last place. A model loaded wrongly differs by the values' own size.
        torch.testing.assert_close(single[key], value, rtol=0, atol=2 * float(value.abs().max()) * 2**-10, msg=key)
    assert train(checkpoint, tiny["data"], tmp_path / "none", *common) == 2  # no --model-config: told what to pass


def test_ctrl_c_checkpoints_and_resume_matches_an_uninterrupted_run(tiny, tmp_path: Path, monkeypatch) -> None:
    common = ["--steps", "4", "--no-validate", "--name", "run"]
    assert train(tiny["sd15"], tiny["data"], tmp_path / "straight", *common) == 0

    original = train_command._tqdm_progress

    def interrupting(total: int, start: int, enabled: bool):
        update, close = original(total, start, enabled)

        def update_and_interrupt(report) -> None:
            update(report)
            if report.step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the CLI must stop after this step

        return update_and_interrupt, close

    monkeypatch.setattr(train_command, "_tqdm_progress", interrupting)
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite was started in the background
    out = tmp_path / "interrupted"
    assert train(tiny["sd15"], tiny["data"], out, *common) == train_command.EXIT_CANCELLED
    checkpoint = out / "checkpoints" / "run_step000002.safetensors"
    assert checkpoint.is_file() and not (out / "run.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) == handler_before  # the handler is put back
    steps_done: list[int] = []

    def counting(total: int, start: int, enabled: bool):
        update, close = original(total, start, enabled)
        return (lambda report: (steps_done.append(report.step), update(report))), close

    monkeypatch.setattr(train_command, "_tqdm_progress", counting)
    assert train(tiny["sd15"], tiny["data"], out, *common, "--resume", str(checkpoint)) == 0
    assert steps_done == [3, 4]  # continued, not started again
    straight, resumed = load_file(str(tmp_path / "straight/run.safetensors")), load_file(str(out / "run.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert train(tiny["sd15"], tiny["data"], out, *common) == 2  # the finished file is never overwritten silently
