"""Pure-torch helpers that used to be reachable only through a booted ComfyUI: model preparation for
training, the model fingerprint, and the safe-name rule for files the pack writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from comfyui_lora2.devtools.adapters import attach_nonzero
from comfyui_lora2.lora2 import LoRA2Error, attach
from comfyui_lora2.lora2.fingerprint import fingerprint
from comfyui_lora2.lora2.model_prep import inplace_safe_norms, make_trainable, ordinary_tensors
from comfyui_lora2.lora2.paths import safe_child


class Residual(nn.Module):
    """``x += f(norm(x))`` in place, as ComfyUI's DiT blocks write it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in, self.norm, self.mlp = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        x += self.mlp(self.norm(x))
        return x


def test_make_trainable_turns_inference_weights_into_frozen_ordinary_ones() -> None:
    with torch.inference_mode():  # how a host's loader node creates the model
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    assert model[0].weight.is_inference() and model[2].running_mean.is_inference()
    before = model[0].weight.detach().clone()
    handle = attach(model, targets=r"^0$", init_rank=2)
    with pytest.raises(RuntimeError, match=r"[Ii]nference tensors"):
        model(torch.randn(3, 4)).sum().backward()
    make_trainable(model)
    assert not model[0].weight.is_inference() and not model[2].running_mean.is_inference()
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(model[0].weight, before)
    model(torch.randn(3, 4)).sum().backward()  # the adapter's gradient flows through the frozen layers
    assert all(p.grad is not None for p in handle.factor_parameters())


def test_inplace_safe_norms_lets_backward_through_inplace_residuals_and_removes_its_hooks() -> None:
    torch.manual_seed(0)
    block = Residual().requires_grad_(False)
    handle = attach_nonzero(block, targets=r"^proj_in$", init_rank=2)
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="inplace"):
        block(x).sum().backward()
    with inplace_safe_norms(block):
        block(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in handle.factor_parameters())
    assert not block.norm._forward_pre_hooks


def test_ordinary_tensors_copies_inference_tensors_at_any_depth() -> None:
    with torch.inference_mode():
        state = {"moments": [torch.ones(2), (torch.zeros(1),)], "step": torch.tensor(3.0), "name": "adamw"}
    plain = ordinary_tensors(state)
    assert plain["name"] == "adamw" and isinstance(plain["moments"][1], tuple)
    tensors = [plain["moments"][0], plain["moments"][1][0], plain["step"]]
    assert not any(t.is_inference() for t in tensors)
    plain["step"] += 1  # what the optimizer does to a loaded step count
    assert float(plain["step"]) == 4.0


class Wrapper:
    """Shaped like a host's VAE object: the torch module sits under ``first_stage_model``."""

    def __init__(self, module: nn.Module) -> None:
        self.first_stage_model = module


def test_fingerprint_tells_models_apart_and_ignores_everything_but_their_weights() -> None:
    torch.manual_seed(0)
    a = nn.Linear(300, 7)
    b = nn.Linear(300, 7)
    b.load_state_dict(a.state_dict())
    assert fingerprint(Wrapper(a)) == fingerprint(Wrapper(b)) == fingerprint(a)
    with torch.no_grad():
        b.weight[0, 0] += 1.0  # a sampled element (the first of the strided sample)
    assert fingerprint(Wrapper(a)) != fingerprint(Wrapper(b))
    tensors = {"x": torch.ones(2), "y": torch.zeros(3)}
    assert fingerprint(tensors) == fingerprint(dict(reversed(tensors.items())))
    assert fingerprint(tensors) != fingerprint({"x": torch.ones(2), "y": torch.ones(3)})
    assert len(fingerprint(object())) == 16


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lora2/my run", "lora2/my run.safetensors"),
        ("日本語", "日本語.safetensors"),
        ('a<b>:c"d|e?f*g', "a_b_c_d_e_f_g.safetensors"),
        ("../../escape", "escape.safetensors"),
        ("sub\\\\win", "sub/win.safetensors"),
        ("con", "_con.safetensors"),
        ("done.safetensors", "done.safetensors"),
        ("run.lora2state", "run.safetensors"),
    ],
)
def test_safe_child_keeps_names_readable_and_inside_the_folder(tmp_path: Path, name: str, expected: str) -> None:
    path = safe_child(tmp_path, name, ".safetensors", (".safetensors", ".lora2state"))
    assert path == tmp_path.resolve() / expected


def test_safe_child_refuses_empty_long_and_symlinked_names(tmp_path: Path) -> None:
    with pytest.raises(LoRA2Error, match="empty"):
        safe_child(tmp_path, " ./.. ", ".safetensors")
    with pytest.raises(LoRA2Error, match="bytes long"):
        safe_child(tmp_path, "x" * 300, ".safetensors")
    (tmp_path / "out").symlink_to(tmp_path.parent)
    with pytest.raises(LoRA2Error, match="outside"):
        safe_child(tmp_path, "out/file", ".safetensors")


def test_validation_run_folders_follow_the_same_name_rule(tmp_path: Path) -> None:
    from comfyui_lora2.lora2.validation import run_folder

    assert run_folder(tmp_path, 'runs/my:"dog"') == tmp_path.resolve() / "runs" / "my_dog_"
    assert run_folder(tmp_path, "aux") == tmp_path.resolve() / "_aux"
    with pytest.raises(LoRA2Error, match="validation run name"):
        run_folder(tmp_path, " ./ ")
