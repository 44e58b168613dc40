"""Seeded tiny DINO (``ViTModel``) and CLIP (``CLIPModel``) folders in Hugging Face format, for the metric tests.

Why: no reachable registry ships DINO or CLIP weights, and the metric code must be tested through the
same ``from_pretrained`` folders a user downloads. These folders hold what the real ones hold (config,
weights, image-processor config, and for CLIP a byte-level BPE tokenizer), at 32×32 pixels with 16-pixel
patches and 32-wide layers, so loading and a forward pass take milliseconds.

The tokenizer needs no download either: its vocabulary is CLIP's 256 byte symbols, each also with the
end-of-word marker ``</w>``, plus the two special tokens, and no merges, so every prompt tokenises
character by character. Imports only ``transformers`` (no ComfyUI).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HIDDEN = 32
IMAGE_SIZE = 32
BOS, EOS = 512, 513
VOCAB_SIZE = 514


def byte_symbols() -> list[str]:
    """CLIP's (and GPT-2's) printable stand-in for each of the 256 byte values, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            codes[byte] = byte
        else:
            codes[byte] = 256 + extra
            extra += 1
    return [chr(codes[byte]) for byte in range(256)]


def write_tokenizer_files(folder: Path) -> None:
    """``vocab.json`` + ``merges.txt`` of the tiny character-level BPE (every transformers version reads them)."""
    symbols = byte_symbols()
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": 256 + i for i, symbol in enumerate(symbols)})
    vocab.update({"<|startoftext|>": BOS, "<|endoftext|>": EOS})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def _layers(**extra) -> dict:
    return dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=2, **extra)


def save_tiny_dino(folder: Path, seed: int = 0) -> Path:
    """A random ``ViTModel`` (no pooler, like ``facebook/dino-vits16``) and its image processor in ``folder``."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    # a wider init than the default 0.02 so different images get clearly different CLS embeddings
    config = ViTConfig(**_layers(image_size=IMAGE_SIZE, patch_size=16, initializer_range=0.2))
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return Path(folder)


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random ``CLIPModel`` with its ``CLIPProcessor`` (image processor + tiny tokenizer) in ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    write_tokenizer_files(folder)
    torch.manual_seed(seed)
    text = _layers(
        vocab_size=VOCAB_SIZE, max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS
    )
    vision = _layers(image_size=IMAGE_SIZE, patch_size=16)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, initializer_factor=4.0)
    CLIPModel(config).eval().save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_eval_models(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """``(dino folder, clip folder)`` under ``root``, named like the node's defaults."""
    root = Path(root)
    return save_tiny_dino(root / "dino-vits16", seed), save_tiny_clip(root / "clip-vit-b32", seed + 1)
