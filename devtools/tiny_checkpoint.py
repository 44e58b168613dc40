"""Write the demo's tiny default checkpoint: SD1.5-shaped, seeded, random weights (~140 MB, ~5 s).

It must load through ComfyUI's stock ``CheckpointLoaderSimple`` like any SD1.5 checkpoint, so every
part has the shapes ComfyUI's detection expects: a one-level UNet at SD1.x widths (320 channels,
context 768: 25.8 M parameters, the smallest ComfyUI recognises as SD1.5), the real CLIP-L text
encoder architecture (123 M parameters; its size is fixed by ComfyUI's SD1 CLIP config), and a TAESD
autoencoder (1.2 M parameters) in place of the 83 M-parameter KL VAE. The weights are random: images
sampled from it are noise. It is generated at run time, never committed.

Run inside ComfyUI's environment: ``PYTHONPATH=<ComfyUI>:<torchvision stub> python devtools/tiny_checkpoint.py OUT``.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

from comfy.cli_args import args

args.cpu = True  # before comfy.model_management is imported: this writes a file, it needs no device

import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.taesd.taesd  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def _tiny_models():
    """``tiny_models.py`` beside this file, from a bare package over this folder: importing
    ``comfyui_lora2.devtools`` would import the pack's ``__init__``, which registers the nodes whenever
    ComfyUI is importable (it is, here). The package lets its relative imports (``.unet_configs``) resolve."""
    package = types.ModuleType("_lora2_devtools")
    package.__path__ = [str(Path(__file__).parent)]
    sys.modules[package.__name__] = package
    return importlib.import_module("_lora2_devtools.tiny_models")


_shapes = _tiny_models()
REAL_WIDTH_FAMILIES, REAL_WIDTH_ONE_LEVEL, fill_seeded_ = (
    _shapes.REAL_WIDTH_FAMILIES,
    _shapes.REAL_WIDTH_ONE_LEVEL,
    _shapes.fill_seeded_,
)

UNET_CONFIG = {**REAL_WIDTH_ONE_LEVEL, **REAL_WIDTH_FAMILIES["sd15"]}
"""One level at SD1.x widths: the smallest UNet ComfyUI's detection accepts as SD1.5 (25.8 M parameters)."""


def tiny_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict, with SD1.5 checkpoint prefixes."""
    ops = comfy.ops.disable_weight_init
    unet = fill_seeded_(openaimodel.UNetModel(**UNET_CONFIG, dtype=torch.float32, operations=ops), seed)
    clip = fill_seeded_(comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32), seed + 1)
    vae = fill_seeded_(comfy.taesd.taesd.TAESD(latent_channels=4), seed + 2)
    state: dict[str, torch.Tensor] = {}
    for prefix, module in (("model.diffusion_model.", unet), ("cond_stage_model.", clip), ("first_stage_model.", vae)):
        for key, value in module.state_dict().items():
            state[prefix + key] = value.detach().to(torch.float16 if value.is_floating_point() else value.dtype)
    return {k: v.contiguous() for k, v in state.items()}


def main(argv: list[str]) -> None:
    out = Path(argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_suffix(".tmp")
    save_file(tiny_checkpoint(), str(temporary), metadata={"lora2_demo": "tiny random SD1.5-shaped checkpoint"})
    temporary.replace(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main(sys.argv)
