"""lora2/targets.py: presets find the same roles across naming schemes; regexes and errors."""

from __future__ import annotations

import pytest
from torch import nn

from comfyui_lora2.lora2 import LoRA2Error, select_targets


def tree(names: dict[str, nn.Module]) -> nn.Module:
    """A model whose modules have exactly these dotted names."""
    root = nn.Module()
    for dotted, module in names.items():
        parent = root
        *path, leaf = dotted.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)
    return root


def lin() -> nn.Linear:
    return nn.Linear(4, 4)


UNET = {
    "input_blocks.1.1.proj_in": lin(),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q": lin(),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_k": lin(),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_v": lin(),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0": lin(),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k": lin(),
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj": lin(),
    "input_blocks.1.1.transformer_blocks.0.ff.net.2": lin(),
    "input_blocks.1.0.in_layers.2": nn.Conv2d(4, 4, 3),
    "input_blocks.1.0.emb_layers.1": lin(),
    "time_embed.0": lin(),
}
FLUX = {
    "double_blocks.0.img_attn.qkv": lin(),
    "double_blocks.0.img_attn.proj": lin(),
    "double_blocks.0.txt_attn.qkv": lin(),
    "double_blocks.0.txt_attn.proj": lin(),
    "double_blocks.0.img_mlp.0": lin(),
    "double_blocks.0.img_mlp.2": lin(),
    "double_blocks.0.img_mod.lin": lin(),
    "single_blocks.0.linear1": lin(),
    "single_blocks.0.linear2": lin(),
    "single_blocks.0.modulation.lin": lin(),
}
SD3 = {
    "joint_blocks.0.x_block.attn.qkv": lin(),
    "joint_blocks.0.x_block.attn.proj": lin(),
    "joint_blocks.0.x_block.mlp.fc1": lin(),
    "joint_blocks.0.x_block.mlp.fc2": lin(),
    "joint_blocks.0.x_block.adaLN_modulation.1": lin(),
}
HF = {
    "layers.0.self_attn.q_proj": lin(),
    "layers.0.self_attn.o_proj": lin(),
    "layers.0.mlp.up_proj": lin(),
    "layers.0.mlp.gate_proj": lin(),
    "lm_head": lin(),
}


def names(model: nn.Module, targets: str, **kwargs) -> list[str]:
    return [name for name, _ in select_targets(model, targets, **kwargs)]


def test_attention_preset_across_families() -> None:
    assert names(tree(UNET), "attn") == [
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_k",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_v",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    ]
    assert names(tree(FLUX), "attn") == [
        "double_blocks.0.img_attn.qkv",
        "double_blocks.0.img_attn.proj",
        "double_blocks.0.txt_attn.qkv",
        "double_blocks.0.txt_attn.proj",
        "single_blocks.0.linear1",
        "single_blocks.0.linear2",
    ]
    assert names(tree(SD3), "attn") == ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.attn.proj"]
    assert names(tree(HF), "attn") == ["layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj"]


def test_attention_plus_feed_forward() -> None:
    unet = names(tree(UNET), "attn+ff")
    assert "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj" in unet
    assert "input_blocks.1.1.transformer_blocks.0.ff.net.2" in unet
    assert "input_blocks.1.0.emb_layers.1" not in unet and "time_embed.0" not in unet
    flux = names(tree(FLUX), "attn+ff")
    assert {"double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2"} <= set(flux)
    assert "double_blocks.0.img_mod.lin" not in flux
    assert {"joint_blocks.0.x_block.mlp.fc1", "joint_blocks.0.x_block.mlp.fc2"} <= set(names(tree(SD3), "attn+ff"))
    assert {"layers.0.mlp.up_proj", "layers.0.mlp.gate_proj"} <= set(names(tree(HF), "attn+ff"))


def test_all_linear_and_all() -> None:
    model = tree(UNET)
    assert len(names(model, "all-linear")) == 10
    assert "input_blocks.1.0.in_layers.2" in names(model, "all")
    assert len(names(model, "all")) == 11


def test_regex_exclude_and_module_types() -> None:
    model = tree(UNET)
    assert names(model, r"attn1\.to_(q|v)$") == [
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_v",
    ]
    assert names(model, "attn", exclude="attn2") == names(model, r"attn1")
    assert names(model, r"in_layers", module_types=("conv2d",)) == ["input_blocks.1.0.in_layers.2"]
    with pytest.raises(LoRA2Error, match="matched no layer"):
        names(model, r"in_layers", module_types=("linear",))


def test_errors_name_the_problem() -> None:
    with pytest.raises(LoRA2Error, match="neither a preset"):
        names(tree(UNET), "attn[")
    with pytest.raises(LoRA2Error, match=r"layers start with: input_blocks\.1\.1\.proj_in"):
        names(tree(UNET), "nothing_like_this")
