"""lora2/dataset*.py: discovery, buckets, pixels, augmentation, encoding caches and batches."""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfyui_lora2.lora2 import LoRA2Error, lora_file
from comfyui_lora2.lora2.dataset import (
    Batch,
    CachedDataset,
    CachedItem,
    DatasetSpec,
    EncodingCancelled,
    MemoryCache,
    assign_bucket,
    build_dataset,
    collate_conditioning,
    make_buckets,
    resolve_folder,
    scan_folder,
)
from comfyui_lora2.lora2.dataset_augment import versions
from comfyui_lora2.lora2.dataset_images import fit_to_bucket, load_image

PHOTOS = Path(__file__).resolve().parents[2] / "shared/data/dreambooth_256"
needs_photos = pytest.mark.skipif(not (PHOTOS / "dog").is_dir(), reason="shared dreambooth photos are absent")
SPEC = DatasetSpec(resolution=128, bucket_step=32)
"""Buckets 96×160, 128×128 and 160×96: latents 12×20, 16×16, 20×12 under the fake VAE."""


class FakeVAE:
    """Average-pool by 8, then a fixed random 1×1 projection to 4 channels; counts its work."""

    def __init__(self) -> None:
        self.weight = torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(0))
        self.calls = 0
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.dtype == torch.float32 and 0.0 <= pixels.min() and pixels.max() <= 1.0
        self.calls += 1
        self.images += pixels.shape[0]
        return F.conv2d(F.avg_pool2d(pixels * 2 - 1, 8), self.weight)


class FakeText:
    """CLIP-like: 77 tokens per 20 words, 8 features, plus a pooled vector; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, caption: str) -> dict[str, torch.Tensor]:
        self.calls += 1
        seed = int(hashlib.sha256(caption.encode()).hexdigest()[:8], 16)
        generator = torch.Generator().manual_seed(seed)
        tokens = 77 * (1 + len(caption.split()) // 20)
        return {
            "cross_attn": torch.randn(1, tokens, 8, generator=generator),
            "pooled_output": torch.randn(1, 16, generator=generator),
        }


def write_image(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Path:
    """A noise image (distinct bytes per seed) in ``mode``, format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(data.squeeze(-1) if channels == 1 else data, mode).save(path)
    return path


def build(items, spec=None, vae=None, text=None, cache_dir=None, memory=None, model_key="test-model", **kwargs):
    return build_dataset(
        items,
        spec or SPEC,
        vae or FakeVAE(),
        text or FakeText(),
        cache_dir,
        model_key,
        memory_cache=memory,
        **kwargs,
    )


@pytest.fixture
def kohya(tmp_path: Path) -> Path:
    """``10_sks dog`` (2 images, one captioned), ``1_cat`` (1 upper-case JPG), a loose webp, hidden junk."""
    root = tmp_path / "data"
    write_image(root / "10_sks dog" / "a.png", (96, 160), seed=1)
    write_image(root / "10_sks dog" / "b.png", (160, 96), seed=2)
    (root / "10_sks dog" / "a.txt").write_text("  {trigger} on a sofa\n", encoding="utf-8")
    write_image(root / "1_cat" / "C.JPG", (128, 128), seed=3)
    write_image(root / "loose.webp", (64, 64), seed=4)
    write_image(root / ".cache" / "ignored.png", (64, 64), seed=5)
    (root / "notes.md").write_text("not an image")
    return root


# --- discovery -------------------------------------------------------------------------------------


@needs_photos
def test_scan_real_photos_with_template() -> None:
    items = scan_folder(PHOTOS / "dog", "a photo of {trigger}", "sks dog")
    assert [item.path.name for item in items] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg", "04.jpg"]
    assert {item.caption for item in items} == {"a photo of sks dog"}
    assert {(item.width, item.height, item.repeats, item.caption_source) for item in items} == {
        (256, 256, 1, "template")
    }


def test_scan_kohya_folders_captions_and_repeats(kohya: Path) -> None:
    items = scan_folder(kohya, "a photo of {trigger}, a {class}", "zwx")
    got = [(i.path.relative_to(kohya).as_posix(), i.repeats, i.caption, i.caption_source) for i in items]
    assert got == [
        ("10_sks dog/a.png", 10, "zwx on a sofa", "file"),
        ("10_sks dog/b.png", 10, "a photo of zwx, a sks dog", "template"),
        ("1_cat/C.JPG", 1, "a photo of zwx, a cat", "template"),
        ("loose.webp", 1, "a photo of zwx, a zwx", "template"),
    ]
    assert (items[0].width, items[0].height, items[0].class_name) == (96, 160, "sks dog")
    # without a trigger word, {trigger} is the folder's name (kohya's instance prompt) ...
    pointed_at = scan_folder(kohya / "10_sks dog", "a photo of {trigger}", "")[1]  # the root folder counts too
    assert (pointed_at.caption, pointed_at.repeats) == ("a photo of sks dog", 10)
    # ... and where there is no folder name either, the caption would lose its subject: an error
    with pytest.raises(LoRA2Error, match=r"template caption of '.*loose\.webp' uses \{trigger\}.*fill in the trigger"):
        scan_folder(kohya, "a photo of {trigger}", "")


def test_caption_fallbacks_and_missing_caption(kohya: Path) -> None:
    (kohya / "10_sks dog" / "b.txt").write_text("   \n", encoding="utf-8")  # empty: falls through
    items = {i.path.name: i for i in scan_folder(kohya / "10_sks dog", None, "")}
    assert (items["b.png"].caption, items["b.png"].caption_source) == ("sks dog", "folder")
    with pytest.raises(LoRA2Error, match=r"image '.*loose\.webp' has no caption: add 'loose\.txt'.*caption template"):
        scan_folder(kohya, None, "zwx")
    with pytest.raises(LoRA2Error, match=r"uses \{subject\}; only \{trigger\} and \{class\}"):
        scan_folder(kohya, "a {subject}", "zwx")


def test_empty_folder_corrupt_image_and_zero_repeats(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(LoRA2Error) as error:
        scan_folder(tmp_path / "empty", "x", "")
    looked = ".png .jpg .jpeg .webp .bmp .gif .tif .tiff"
    assert str(error.value) == f"dataset folder '{tmp_path / 'empty'}' has no images (looked for {looked})"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(LoRA2Error, match=r"image '.*broken\.png' cannot be read"):
        scan_folder(tmp_path / "bad", "x", "")
    write_image(tmp_path / "zero" / "0_dog" / "a.png", (8, 8))
    with pytest.raises(LoRA2Error, match=r"folder '.*0_dog' repeats its images 0 times"):
        scan_folder(tmp_path / "zero", "x", "")


def test_truncated_image_fails_at_decode_naming_the_file(tmp_path: Path) -> None:
    path = write_image(tmp_path / "cut.png", (64, 64))
    path.write_bytes(path.read_bytes()[:200])
    item = scan_folder(tmp_path, "x", "")[0]  # the header is intact
    with pytest.raises(LoRA2Error, match=r"image '.*cut\.png' cannot be decoded"):
        build([item])


def test_exif_rotation_swaps_the_displayed_size(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when displayed
    Image.new("RGB", (80, 40), "red").save(tmp_path / "turned.jpg", exif=exif)
    item = scan_folder(tmp_path, "x", "")[0]
    assert (item.width, item.height) == (40, 80)
    assert load_image(item.path).size == (40, 80)


def test_resolve_folder_stays_inside_the_input_root(tmp_path: Path) -> None:
    root = tmp_path / "input"
    (root / "dogs").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    assert resolve_folder("dogs", root) == (root / "dogs").resolve()
    assert resolve_folder(str(root / "dogs"), root) == (root / "dogs").resolve()  # absolute inside: allowed
    with pytest.raises(LoRA2Error, match="is outside"):
        resolve_folder(f"  {tmp_path / 'secret'} ", root)  # absolute outside: only with the opt-in
    assert resolve_folder(str(tmp_path / "secret"), root, allow_absolute=True) == (tmp_path / "secret").resolve()
    with pytest.raises(LoRA2Error, match=r"'\.\./secret' points outside"):
        resolve_folder("../secret", root)
    os.symlink(tmp_path / "secret", root / "link")
    with pytest.raises(LoRA2Error, match="'link' points outside"):
        resolve_folder("link", root)
    with pytest.raises(LoRA2Error, match="does not exist"):
        resolve_folder("cats", root)
    with pytest.raises(LoRA2Error, match="dataset folder is empty"):
        resolve_folder(" ", root)
    datasets = tmp_path / "datasets"
    (datasets / "cats").mkdir(parents=True)
    assert resolve_folder("cats", [root, datasets]) == (datasets / "cats").resolve()  # ComfyUI's datasets type


def test_symlinks_out_of_the_dataset_are_refused_inside_followed(tmp_path: Path) -> None:
    data, outside = tmp_path / "data", tmp_path / "outside"
    write_image(data / "a.png", (8, 8))
    write_image(outside / "b.png", (8, 8))
    os.symlink(outside / "b.png", data / "leak.png")
    with pytest.raises(LoRA2Error, match=r"image '.*leak\.png' is a symlink to .*outside the dataset folder"):
        scan_folder(data, "x", "")
    (data / "leak.png").unlink()
    os.symlink(outside, data / "more")
    with pytest.raises(LoRA2Error, match=r"sub-folder '.*more' is a symlink"):
        scan_folder(data, "x", "")
    (data / "more").unlink()
    write_image(data / "real" / "c.png", (8, 8))
    os.symlink(data / "real", data / "alias")  # inside: followed, each real folder once
    os.symlink(data, data / "real" / "loop")  # a loop ends
    names = sorted(item.path.name for item in scan_folder(data, "x", ""))
    assert names == ["a.png", "c.png"]


def test_utf16_captions_and_more_image_formats(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for suffix in ("bmp", "gif", "tiff"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / f"x_{suffix}.{suffix}")
    (tmp_path / "x_bmp.txt").write_bytes("a photo of 日本 dog".encode("utf-16"))  # BOM + UTF-16
    (tmp_path / "photo.heic").write_bytes(b"\x00" * 10)
    with caplog.at_level("WARNING"):
        items = scan_folder(tmp_path, "t", "")
    assert sorted(i.path.suffix for i in items) == [".bmp", ".gif", ".tiff"]
    assert next(i for i in items if i.path.suffix == ".bmp").caption == "a photo of 日本 dog"
    assert "photo.heic" in caplog.text
    assert all(load_image(i.path).size == (8, 8) for i in items)


# --- buckets and pixels ------------------------------------------------------------------------------


def test_make_buckets_kohya_style() -> None:
    assert make_buckets(512) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    buckets = make_buckets(1024, 64, 2.0)
    assert {(1024, 1024), (896, 1152), (832, 1216), (768, 1344), (1344, 768)} <= set(buckets)
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= 1024 * 1024 and max(width, height) / min(width, height) <= 2.0
    assert max(w * h for w, h in buckets) == 1024 * 1024
    assert min(w * h for w, h in buckets) >= 0.85 * 1024 * 1024  # every bucket uses most of the area
    assert make_buckets(512, 64, 1.0) == [(512, 512)]
    with pytest.raises(LoRA2Error, match="max_ratio"):
        make_buckets(512, 64, 0.5)


def test_assign_bucket_by_log_aspect_ratio() -> None:
    buckets = make_buckets(512)
    assert assign_bucket(300, 500, buckets) == (384, 640)
    assert assign_bucket(500, 300, buckets) == (640, 384)
    assert assign_bucket(256, 256, buckets) == (512, 512)
    assert assign_bucket(1000, 10, buckets) == (640, 384)  # beyond max_ratio: the widest bucket
    assert assign_bucket(550, 450, buckets) == (576, 448)  # log(1.22) is nearer log(1.29) than log(1)
    assert assign_bucket(530, 470, buckets) == (512, 512)  # log(1.13) is nearer log(1)


def test_pixels_rgba_on_white_grayscale_and_center_crop(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    pixels = fit_to_bucket(load_image(tmp_path / "a.png"), (16, 16))
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert pixels[:, :, :8].mean(dim=(1, 2)).tolist() == [1.0, 0.0, 0.0]
    assert pixels[:, :, 8:].min() == 1.0  # transparent -> white
    write_image(tmp_path / "g.png", (20, 20), mode="L")
    gray = fit_to_bucket(load_image(tmp_path / "g.png"), (20, 20))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    thirds = np.zeros((64, 192, 3), dtype=np.uint8)
    thirds[:, :64, 0], thirds[:, 64:128, 1], thirds[:, 128:, 2] = 255, 255, 255
    Image.fromarray(thirds).save(tmp_path / "t.png")
    centre = fit_to_bucket(load_image(tmp_path / "t.png"), (64, 64))  # covers, then crops the middle third
    assert centre.mean(dim=(1, 2)).tolist() == pytest.approx([0.0, 1.0, 0.0], abs=0.02)
    write_image(tmp_path / "tiny.png", (10, 7))
    assert fit_to_bucket(load_image(tmp_path / "tiny.png"), (64, 128)).shape == (3, 128, 64)  # upscaled


# --- augmentation --------------------------------------------------------------------------------------


def test_versions_clean_mirrored_and_seeded_augmentations() -> None:
    pixels = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(1))
    spec = DatasetSpec(resolution=64, flip=True, crop=True, color=True, variants=3, seed=7)
    first = list(versions(pixels, spec, "hash-a"))
    assert len(first) == spec.versions_per_image == 6
    assert torch.equal(first[0], pixels)  # version 0 is the clean image
    assert torch.equal(first[1], pixels.flip(-1))  # and its mirror
    for index in (2, 4):
        assert first[index].shape == pixels.shape and 0.0 <= first[index].min() and first[index].max() <= 1.0
        assert (first[index] - pixels).abs().mean() > 0.01  # augmented pixels differ from the clean ones
        assert torch.equal(first[index + 1], first[index].flip(-1))
    assert not torch.equal(first[2], first[4])
    again = list(versions(pixels, spec, "hash-a"))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # same seed, same pixels
    other_seed = list(versions(pixels, replace(spec, seed=8), "hash-a"))
    other_image = list(versions(pixels, spec, "hash-b"))
    assert not torch.equal(first[2], other_seed[2]) and not torch.equal(first[2], other_image[2])
    only_color = list(versions(pixels, DatasetSpec(resolution=64, color=True, variants=2), "hash-a"))
    assert len(only_color) == 2 and (only_color[1] - pixels).abs().mean() > 0.005


def test_spec_validation() -> None:
    with pytest.raises(LoRA2Error, match="variants=3 needs crop or color"):
        DatasetSpec(variants=3)
    with pytest.raises(LoRA2Error, match="resolution"):
        DatasetSpec(resolution=32)
    with pytest.raises(LoRA2Error, match="crop_min_scale"):
        DatasetSpec(crop=True, crop_min_scale=0.1)


# --- encoding and caches ---------------------------------------------------------------------------------


@needs_photos
def test_real_photos_encode_once_then_come_from_disk_and_memory(tmp_path: Path) -> None:
    items = scan_folder(PHOTOS / "dog", "a photo of {trigger}", "sks dog")
    spec = DatasetSpec(resolution=256)
    cache_dir = tmp_path / "cache"
    vae, text, memory = FakeVAE(), FakeText(), MemoryCache()
    reports: list[tuple[int, int]] = []
    data = build(items, spec, vae, text, cache_dir, memory, progress=lambda d, t: reports.append((d, t)))
    assert (vae.calls, vae.images, text.calls) == (2, 5, 1)  # batches of 4 + 1; one distinct caption
    assert reports[-1] == (6, 6) and [d for d, _ in reports] == list(range(1, 7))
    assert data.num_images == len(data) == 5 and data.bucket_summary() == {(256, 256): 5}
    assert data.items[0].latents.shape == (1, 4, 32, 32)
    assert data.items[0].conditioning["cross_attn"].shape == (1, 77, 8)
    files = sorted(p.name for p in cache_dir.iterdir())
    assert len(files) == 6 and all(name.endswith(".safetensors") and not name.startswith(".") for name in files)
    assert sum(name.startswith("latents-") for name in files) == 5

    vae2, text2 = FakeVAE(), FakeText()
    from_disk = build(items, spec, vae2, text2, cache_dir, MemoryCache())  # fresh memory: all from disk
    assert (vae2.calls, text2.calls) == (0, 0)
    assert torch.equal(from_disk.items[3].latents, data.items[3].latents)
    from_memory = build(items, spec, vae2, text2, None, memory)  # no disk: all from memory
    assert (vae2.calls, text2.calls) == (0, 0)
    assert torch.equal(from_memory.items[3].latents, data.items[3].latents)
    _, metadata = lora_file.read_safetensors(cache_dir / files[0])
    assert metadata["format"] == "lora2-dataset-cache" and '"resolution": 256' in metadata["info"]


def test_cache_invalidation_by_caption_setting_and_model(kohya: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    items = scan_folder(kohya, "a photo of {class}", "zwx")
    assert len({item.caption for item in items}) == 4
    vae, text = FakeVAE(), FakeText()
    build(items, SPEC, vae, text, cache_dir)
    assert (vae.images, text.calls) == (4, 4)

    (kohya / "1_cat" / "C.txt").write_text("a new caption", encoding="utf-8")
    vae, text = FakeVAE(), FakeText()
    build(scan_folder(kohya, "a photo of {class}", "zwx"), SPEC, vae, text, cache_dir)
    assert (vae.images, text.calls) == (0, 1)  # only the edited caption, no VAE pass

    vae, text = FakeVAE(), FakeText()
    build(items, replace(SPEC, flip=True), vae, text, cache_dir)
    assert (vae.images, text.calls) == (8, 0)  # every image again, mirrored too

    vae, text = FakeVAE(), FakeText()
    build(items, replace(SPEC, max_ratio=1.0), vae, text, cache_dir)
    assert vae.images == 2  # only the two non-square images changed bucket

    vae = FakeVAE()
    build(items, replace(SPEC, seed=5), vae, text, cache_dir)
    assert vae.images == 0  # the seed matters only when something random is on
    build(items, replace(SPEC, seed=5, color=True, variants=2), vae, text, cache_dir)
    assert vae.images == 8

    vae, text = FakeVAE(), FakeText()
    build(items, SPEC, vae, text, cache_dir, model_key="another-vae")
    assert (vae.images, text.calls) == (4, 4)

    write_image(kohya / "1_cat" / "C.JPG", (128, 128), seed=99)  # same name, new content
    vae, text = FakeVAE(), FakeText()
    build(items, SPEC, vae, text, cache_dir)
    assert (vae.images, text.calls) == (1, 0)


def test_identical_files_are_encoded_once_and_bad_cache_files_are_rewritten(tmp_path: Path) -> None:
    write_image(tmp_path / "data" / "2_a" / "x.png", (64, 64), seed=1)
    write_image(tmp_path / "data" / "3_b" / "x.png", (64, 64), seed=1)
    items = scan_folder(tmp_path / "data", None, "")
    vae = FakeVAE()
    data = build(items, DatasetSpec(resolution=64), vae, cache_dir=tmp_path / "cache")
    assert vae.images == 1 and len(data) == 5 and data.num_images == 2
    latents_file = next((tmp_path / "cache").glob("latents-*.safetensors"))
    latents_file.write_bytes(b"garbage")
    vae = FakeVAE()
    build(items, DatasetSpec(resolution=64), vae, cache_dir=tmp_path / "cache")
    assert vae.images == 1 and latents_file.stat().st_size > 100


def test_atomic_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_image(tmp_path / "data" / "x.png", (64, 64))
    items = scan_folder(tmp_path / "data", "x", "")

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(lora_file, "save_file", crash)
    with pytest.raises(LoRA2Error, match=r"cache file '.*text-[0-9a-f]{64}\.safetensors' cannot be written"):
        build(items, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_cancel_keeps_what_was_encoded(kohya: Path, tmp_path: Path) -> None:
    items = scan_folder(kohya, "a photo of {class}", "zwx")  # 4 distinct captions, 4 images
    vae = FakeVAE()
    with pytest.raises(EncodingCancelled, match="cancelled after 5 of 8"):
        build(items, vae=vae, cache_dir=tmp_path / "c", encode_batch_size=1, should_stop=lambda: vae.calls >= 1)
    vae = FakeVAE()
    build(items, vae=vae, cache_dir=tmp_path / "c")
    assert vae.images == 3


def test_encoder_contract_errors(kohya: Path) -> None:
    items = scan_folder(kohya, "a photo of {trigger}", "zwx")
    with pytest.raises(LoRA2Error, match=r"image encoder returned \[4, 32\].*latents \[B, C, h, w\]"):
        build(items, vae=lambda x: torch.zeros(4, 32))
    with pytest.raises(LoRA2Error, match=r"output 'pooled' for .* is float"):
        build(items, text=lambda caption: {"pooled": 1.0})
    with pytest.raises(LoRA2Error, match="leading batch dimension of 1"):
        build(items, text=lambda caption: {"cross_attn": torch.zeros(77, 8)})
    with pytest.raises(LoRA2Error, match="model_key is empty"):
        build(items, model_key=" ")


# --- batches -----------------------------------------------------------------------------------------------


def test_batches_share_a_bucket_and_follow_repeats(kohya: Path) -> None:
    write_image(kohya / "10_sks dog" / "c.png", (160, 96), seed=6)
    data = build(scan_folder(kohya, "a photo of {class}", "zwx"), SPEC)
    assert data.bucket_summary() == {(96, 160): 1, (128, 128): 2, (160, 96): 2}
    assert data.num_images == 5 and len(data) == 32
    assert "5 images, 32 samples per epoch" in data.describe()
    seen: Counter[str] = Counter()
    for indices in data.epoch(3, torch.Generator().manual_seed(0)):
        assert 1 <= len(indices) <= 3 and len({data.items[i].bucket for i in indices}) == 1
        seen.update(data.items[i].source.name for i in indices)
    assert seen == {"a.png": 10, "b.png": 10, "c.png": 10, "C.JPG": 1, "loose.webp": 1}  # exact per epoch

    stream = data.batches(3, torch.Generator().manual_seed(1))
    sizes: Counter[str] = Counter()
    for _ in range(200):
        batch = next(stream)
        assert batch.latents.shape[1:] in {(4, 20, 12), (4, 16, 16), (4, 12, 20)}
        assert batch.conditioning["cross_attn"].shape[0] == batch.latents.shape[0] == len(batch.captions)
        sizes.update(batch.captions)
    ratio = sizes["a photo of sks dog"] / sizes["a photo of cat"]  # "zwx on a sofa" is a.png
    assert ratio == pytest.approx(20, rel=0.15)  # two 10-repeat images (b, c) against one 1-repeat cat
    again = data.batches(3, torch.Generator().manual_seed(1))
    first, replay = next(data.batches(3, torch.Generator().manual_seed(1))), next(again)
    assert torch.equal(first.latents, replay.latents) and first.captions == replay.captions


def test_batches_pick_among_versions(tmp_path: Path) -> None:
    write_image(tmp_path / "x.png", (64, 64))
    data = build(scan_folder(tmp_path, "x", ""), DatasetSpec(resolution=64, flip=True))
    stored = data.items[0].latents
    assert stored.shape == (2, 4, 8, 8) and not torch.equal(stored[0], stored[1])
    picked = Counter()
    for batch in data.batches(1, torch.Generator().manual_seed(0)):
        picked[0 if torch.equal(batch.latents[0], stored[0]) else 1] += 1
        if picked.total() == 100:
            break
    assert 30 <= picked[0] <= 70


def test_token_lengths_repeat_to_lcm_or_zero_pad() -> None:
    short, long = torch.randn(1, 77, 8), torch.randn(1, 154, 8)
    batched = collate_conditioning([{"c": short, "p": torch.ones(1, 4)}, {"c": long, "p": torch.zeros(1, 4)}])
    assert batched["c"].shape == (2, 154, 8) and batched["p"].shape == (2, 4)
    assert torch.equal(batched["c"][0], torch.cat([short[0], short[0]]))  # repeated whole, as ComfyUI does
    assert torch.equal(batched["c"][1], long[0])
    odd = collate_conditioning([{"c": short}, {"c": torch.randn(1, 100, 8)}])  # lcm 7700 > 4×77: zero-pad
    assert odd["c"].shape == (2, 100, 8) and odd["c"][0, 77:].abs().sum() == 0
    assert math.lcm(77, 100) // 77 > 4


def test_dataset_with_mixed_caption_lengths_batches(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", (64, 64), seed=1)
    write_image(tmp_path / "b.png", (64, 64), seed=2)
    (tmp_path / "b.txt").write_text(" ".join(["word"] * 25), encoding="utf-8")  # 154 tokens
    data = build(scan_folder(tmp_path, "short", ""), DatasetSpec(resolution=64))
    batch = next(data.batches(2, torch.Generator().manual_seed(0)))
    assert batch.conditioning["cross_attn"].shape == (2, 154, 8)
    moved = batch.to("cpu", torch.float16)
    assert isinstance(moved, Batch) and moved.latents.dtype == torch.float16 and batch.latents.dtype == torch.float32


def test_dataset_rejects_conditioning_that_cannot_batch() -> None:
    def item(name: str, cond: torch.Tensor) -> CachedItem:
        return CachedItem(Path(name), name, 1, (64, 64), torch.zeros(1, 4, 8, 8), {"c": cond})

    with pytest.raises(LoRA2Error, match="only the sequence length may differ"):
        CachedDataset([item("a", torch.zeros(1, 77, 8)), item("b", torch.zeros(1, 77, 16))], DatasetSpec())
