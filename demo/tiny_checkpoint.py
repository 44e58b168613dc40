"""Write the demo's tiny default checkpoint: SD1.5-shaped, seeded, random weights (~140 MB, ~5 s).

It must load through ComfyUI's stock ``CheckpointLoaderSimple`` like any SD1.5 checkpoint, so every
part has the shapes ComfyUI's detection expects: a one-level UNet at SD1.x widths (320 channels,
context 768: 25.8 M parameters, the smallest ComfyUI recognises as SD1.5), the real CLIP-L text
encoder architecture (123 M parameters; its size is fixed by ComfyUI's SD1 CLIP config), and a TAESD
autoencoder (1.2 M parameters) in place of the 83 M-parameter KL VAE. The weights are random: images
sampled from it are noise. It is generated at run time, never committed.

Run inside ComfyUI's environment: ``PYTHONPATH=<ComfyUI>:<torchvision stub> python demo/tiny_checkpoint.py OUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from comfy.cli_args import args

args.cpu = True  # before comfy.model_management is imported: this writes a file, it needs no device

import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.taesd.taesd  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "channel_mult": [1],
    "num_res_blocks": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "num_heads": 8,
    "num_head_channels": -1,
}


def seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter from a seeded generator (ComfyUI's ops skip initialisation).

    Matrices get N(0, 1/fan_in) so activations stay O(1); norm scales 1 + N(0, 0.02²); biases N(0, 0.02²).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 0:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2:
                value = noise / param[0].numel() ** 0.5
            elif name.endswith(("weight", "scale")):
                value = 1.0 + 0.02 * noise
            else:
                value = 0.02 * noise
            param.copy_(value.to(param.dtype))
    return module


def tiny_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict, with SD1.5 checkpoint prefixes."""
    ops = comfy.ops.disable_weight_init
    unet = seeded(openaimodel.UNetModel(**UNET_CONFIG, dtype=torch.float32, operations=ops), seed)
    clip = seeded(comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32), seed + 1)
    vae = seeded(comfy.taesd.taesd.TAESD(latent_channels=4), seed + 2)
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
