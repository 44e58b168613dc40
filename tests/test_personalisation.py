"""bench/personalisation.py: the held-out split, a base that never saw the subject, a deterministic
held-out loss, and the JSON line of a seconds-scale run.

Runs on a tiny photo folder written here (3 subjects of seeded synthetic images saved as PNGs), so the
DreamBooth path is exercised without /work/shared; LoRA²'s scores are not asserted (the benchmark
itself judges them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from comfyui_lora2.bench import image_data
from comfyui_lora2.bench import personalisation as bench
from comfyui_lora2.bench.tiny_diffusion import build_model, family
from comfyui_lora2.lora2.errors import LoRA2Error

SUBJECTS = {"can": 4, "cat": 4, "dog": 5}
TINY = {"steps": 2, "base_steps": 2, "fixed": (4,)}


def write_photos(root: Path) -> None:
    """``root/<subject>/NN.png`` from seeded synthetic images (different per subject)."""
    for offset, (name, count) in enumerate(SUBJECTS.items()):
        folder = root / name
        folder.mkdir(parents=True)
        pixels = ((image_data.synthetic_images(count, seed=offset, size=64) + 1) * 127.5).round().byte()
        for k, image in enumerate(pixels):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{k:02d}.png")


@pytest.fixture
def photos(monkeypatch, tmp_path) -> Path:
    root = tmp_path / "photos"
    write_photos(root)
    monkeypatch.setenv("LORA2_DREAMBOOTH_DIR", str(root))
    monkeypatch.setenv("LORA2_BENCH_CACHE", str(tmp_path / "cache"))
    return root


def test_the_split_never_overlaps_covers_every_photo_and_is_seeded(photos) -> None:
    images = image_data.load_images(family("sd15"))
    split = bench.split_subject(images, "dog", seed=0)
    assert not set(split.train_names) & set(split.test_names)
    assert sorted(split.train_names + split.test_names) == [f"{k:02d}.png" for k in range(5)]
    assert len(split.test_names) == bench.TEST_IMAGES
    for train in split.train.latents:
        assert not any(torch.equal(train, test) for test in split.test.latents)
    assert set(split.train.subjects.tolist()) == set(split.test.subjects.tolist()) == {images.names.index("dog")}
    assert bench.split_subject(images, "dog", seed=0).test_names == split.test_names
    assert len({tuple(bench.split_subject(images, "dog", seed=s).test_names) for s in range(6)}) > 1
    with pytest.raises(LoRA2Error, match="--test-images 5"):
        bench.split_subject(images, "dog", seed=0, test_images=5)


def test_the_pretrained_base_never_sees_the_held_out_subject(photos, monkeypatch) -> None:
    fam = family("sd15")
    images = image_data.load_images(fam)
    seen: list[image_data.ImageSet] = []
    monkeypatch.setattr(image_data, "pretrain", lambda model, fam, trained_on, seed, steps: seen.append(trained_on))
    image_data.base_model("sd15", fam, 0, "pretrained", images, log=lambda _: None, exclude=("dog",), steps=1)
    dog = images.names.index("dog")
    assert dog not in seen[0].subjects.tolist()
    assert len(seen[0].subjects) == len(images.subjects) - SUBJECTS["dog"]
    keys = {
        "all": image_data.pretraining_key("sd15", 0, images),
        "no dog": image_data.pretraining_key("sd15", 0, images, exclude=("dog",)),
        "no cat": image_data.pretraining_key("sd15", 0, images, exclude=("cat",)),
    }
    assert len(set(keys.values())) == 3
    assert image_data.pretraining_key("sd15", 0, images, exclude=()) == keys["all"]
    one_step = image_data.pretraining_key("sd15", 0, images, exclude=("dog",), steps=1)
    assert one_step not in keys.values()
    assert [p.name for p in image_data.cache_dir().iterdir()] == [f"sd15_{one_step}.pt"]
    with pytest.raises(LoRA2Error, match=r"hold out.*'bird'"):
        image_data.pretraining_key("sd15", 0, images, exclude=("bird",))


@pytest.mark.parametrize("model", ["sd15", "flux"])
def test_the_loss_targets_are_the_rules_own(model: str) -> None:
    """At the timesteps ``prepare`` drew, the fixed-noise inputs and targets are exactly its own."""
    fam = family(model)
    rule = fam.rule()
    x0 = torch.randn(4, *fam.latent_shape())
    noise = torch.randn_like(x0)
    prepared = rule.prepare(x0, noise, torch.Generator().manual_seed(0))
    t = prepared.timestep if model == "sd15" else prepared.timestep / rule.timestep_scale
    torch.testing.assert_close(bench.noised(rule, x0, noise, t), prepared.model_input)
    torch.testing.assert_close(bench.rule_target(rule, x0, noise, t), prepared.target)


def test_the_held_out_loss_is_deterministic_and_spread_over_the_schedule(photos) -> None:
    fam = family("sd15")
    images = image_data.load_images(fam)
    split = bench.split_subject(images, "dog", seed=0)
    model = build_model("sd15", 0)
    first, second = bench.build_loss_set(fam, split.test, 0), bench.build_loss_set(fam, split.test, 0)
    torch.testing.assert_close(first.inputs, second.inputs, rtol=0, atol=0)
    assert bench.loss_on(model, fam, first) == bench.loss_on(model, fam, second)
    levels = first.timesteps[: bench.EVAL_LEVELS]
    assert levels.tolist() == torch.linspace(0, 999, bench.EVAL_LEVELS).round().long().tolist()
    assert first.inputs.shape[0] == bench.TEST_IMAGES * bench.EVAL_LEVELS
    runs = [bench.run("sd15", "dog", seed=0, log=lambda _: None, **TINY) for _ in range(2)]
    assert runs[0]["base"] == runs[1]["base"]
    assert [m["heldout"] for m in runs[0]["methods"].values()] == [m["heldout"] for m in runs[1]["methods"].values()]


def test_a_tiny_run_prints_the_table_and_the_json_line(photos, capsys) -> None:
    bench.main(["--steps", "2", "--base-steps", "2", "--fixed", "4", "--subject", "dog", "--seed", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    methods = {"lora2", "lora_r4", "lora_r16"}
    assert set(record["heldout"]) == {"base", *methods} and set(record["params"]) == methods
    assert all(isinstance(v, float) and v > 0 for v in record["heldout"].values())
    assert record["lora2_vs_r16_loss"] == record["heldout"]["lora2"] / record["heldout"]["lora_r16"]
    assert record["lora2_vs_r16_params"] == record["params"]["lora2"] / record["params"]["lora_r16"]
    assert record["params"]["lora_r16"] == 4 * record["params"]["lora_r4"]
    assert isinstance(record["rank_std"], float) and set(record["bars"]) == {
        "rank_std_above_0.5",
        "heldout_no_worse_than_r16_at_no_more_size",
    }
    assert (record["subject"], record["seed"], record["images"], record["note"]) == ("dog", 1, "dreambooth", None)
    assert set(record["split"]) == {"train", "test"} and len(record["split"]["test"]) == bench.TEST_IMAGES
    assert any(line.startswith("lora_r16") for line in lines[:-1])


def test_without_the_photos_synthetic_images_stand_in_and_the_output_says_so(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LORA2_DREAMBOOTH_DIR", str(tmp_path / "absent"))
    monkeypatch.setenv("LORA2_BENCH_CACHE", str(tmp_path / "cache"))
    results = bench.run("sd15", "dog", seed=0, log=lambda _: None, **TINY)
    assert results["images"] == "synthetic" and results["subject"] == "synthetic7"
    assert "synthetic" in results["note"] and "'dog'" in results["note"]
    assert "NOTE: shared photos absent" in bench.format_table(results)


def test_rank_spread_and_unknown_subjects(photos) -> None:
    assert bench.rank_spread({"a": 2, "b": 4}) == (3.0, 1.0)
    with pytest.raises(LoRA2Error, match="--subject 'bird'"):
        bench.resolve_subject(image_data.load_images(family("sd15")), "bird")
