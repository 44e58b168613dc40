"""lora2/lora_file.py + lora2/adapter.py: folding, kohya-style files, resume state, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comfyui_lora2.lora2 import LoRA2Error, attach
from comfyui_lora2.lora2.adapter import Adapter, Component, ResumeState
from comfyui_lora2.lora2.lora_file import (
    adapter_tensors,
    load_adapter,
    read_safetensors,
    save_adapter,
    state_path,
)


def trained_handle():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Conv2d(3, 4, 3, padding=1)).requires_grad_(False)
    handle = attach(model, targets="all", init_rank=3)
    optimizer = torch.optim.Adam(handle.param_groups(1e-2, nu_lr=0.1))
    for _ in range(5):
        loss = model[0](torch.randn(4, 12)).pow(2).mean() + model[1](torch.randn(2, 3, 5, 5)).sin().mean()
        (loss + handle.regularizer()).backward()
        optimizer.step()
        optimizer.zero_grad()
        handle.step(optimizer)
    return model, handle, optimizer


def test_folded_factors_reproduce_every_delta() -> None:
    _, handle, _ = trained_handle()
    adapter = Adapter.from_handle(handle, base_model="Test", history={"loss": [1.0]})
    assert adapter.ranks() == handle.ranks()
    for name in handle.ranks():
        torch.testing.assert_close(adapter.delta(name), handle.delta(name), atol=1e-6, rtol=1e-5)
        component = adapter.components[name]
        assert component.nu == pytest.approx(float(handle.components[name].nu))
        # the scale is split evenly: both factors carry √(αp)
        assert component.up.abs().max() > 0 and component.down.abs().max() > 0
    assert adapter.num_parameters() == handle.num_parameters()


def test_file_round_trip_and_kohya_layout(tmp_path) -> None:
    _, handle, _ = trained_handle()
    adapter = Adapter.from_handle(handle, base_model="SD15", history={"loss": [0.5, 0.4], "ranks": [[3, 3]]})
    path = tmp_path / "my_lora.safetensors"
    save_adapter(path, adapter)
    tensors, metadata = read_safetensors(path)
    for name, component in adapter.components.items():
        key = "lora_unet_" + name.replace(".", "_")
        assert tensors[f"{key}.lora_down.weight"].shape == component.down.shape
        assert tensors[f"{key}.lora_up.weight"].dtype == torch.float16
        assert float(tensors[f"{key}.alpha"]) == 1.0  # scale 1/r; the factors carry √r
        written = tensors[f"{key}.lora_up.weight"].float().flatten(1) @ tensors[
            f"{key}.lora_down.weight"
        ].float().flatten(1)
        torch.testing.assert_close(written / component.rank, component.delta().flatten(1), atol=2e-3, rtol=2e-2)
    assert metadata["ss_network_dim"] == "Dynamic" and metadata["ss_base_model_version"] == "SD15"
    info = json.loads(metadata["lora2"])
    assert info["ranks"] == {"lora_unet_" + n.replace(".", "_"): r for n, r in adapter.ranks().items()}
    assert info["config"]["targets"] == "all" and info["history"]["loss"] == [0.5, 0.4]
    loaded = load_adapter(path)
    assert loaded.ranks() == adapter.ranks() and loaded.config == adapter.config
    for name in adapter.ranks():
        torch.testing.assert_close(loaded.delta(name), adapter.delta(name), atol=2e-3, rtol=2e-2)
    assert not list(tmp_path.glob("*.tmp"))
    assert not state_path(path).exists()


def test_foreign_alpha_is_folded(tmp_path) -> None:
    from safetensors.torch import save_file

    up, down = torch.randn(6, 2), torch.randn(2, 5)
    save_file({"a.lora_up.weight": up, "a.lora_down.weight": down, "a.alpha": torch.tensor(1.0)}, tmp_path / "x.st")
    adapter = load_adapter(tmp_path / "x.st")
    torch.testing.assert_close(adapter.delta("a"), (up @ down) * 0.5)
    assert adapter.source == "kohya" and adapter.components["a"].nu is None


def test_resume_state_round_trip_feeds_a_new_optimizer(tmp_path) -> None:
    _, handle, optimizer = trained_handle()
    resume = ResumeState(handle.state_dict(), optimizer.state_dict(), torch.Generator().get_state(), {"steps": 9})
    adapter = Adapter.from_handle(handle, resume=resume)
    save_adapter(tmp_path / "run.safetensors", adapter)
    assert state_path(tmp_path / "run.safetensors").name == "run.lora2state"
    loaded = load_adapter(tmp_path / "run.safetensors").resume
    assert loaded.train_config == {"steps": 9}
    assert set(loaded.handle_state) == set(handle.state_dict())
    for key, value in handle.state_dict().items():
        torch.testing.assert_close(loaded.handle_state[key], value, atol=0, rtol=0)
    model2 = nn.Sequential(nn.Linear(12, 10), nn.Conv2d(3, 4, 3, padding=1)).requires_grad_(False)
    handle2 = attach(model2, targets="all", init_rank=3)
    handle2.load_state_dict(loaded.handle_state)
    optimizer2 = torch.optim.Adam(handle2.param_groups(1e-2, nu_lr=0.1))
    optimizer2.load_state_dict(loaded.optimizer_state)
    for p1, p2 in zip(handle.parameters(), handle2.parameters(), strict=True):
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optimizer.state[p1][k], optimizer2.state[p2][k])
    F.mse_loss(model2[0](torch.randn(2, 12)), torch.zeros(2, 10)).backward()
    optimizer2.step()


def test_bad_files_are_refused_by_name(tmp_path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoRA2Error, match=r"junk\.safetensors"):
        load_adapter(tmp_path / "junk.safetensors")
    with pytest.raises(LoRA2Error, match="does not exist"):
        load_adapter(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(LoRA2Error, match="holds no LoRA weights"):
        load_adapter(tmp_path / "plain.safetensors")


def test_duplicate_keys_are_refused() -> None:
    adapter = Adapter(
        {"a.b": Component(torch.zeros(2, 1), torch.zeros(1, 2)), "a_b": Component(torch.zeros(2, 1), torch.zeros(1, 2))}
    )
    with pytest.raises(LoRA2Error, match="mapping is not one"):
        adapter_tensors(adapter)
