"""DINO, CLIP-I and CLIP-T (``lora2/evaluate.py``) on tiny random ViT and CLIP models saved to disk.

The models are random, so the numbers mean nothing about images; what is checked is the plumbing the
real models go through: local folders, processors, CLS / projected embeddings, the pairing of images
with real photos and prompts, and the statistics, against direct computations with the same models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfyui_lora2.devtools.pictures import pictures, save_photos
from comfyui_lora2.devtools.tiny_eval_models import save_tiny_eval_models
from comfyui_lora2.lora2.errors import LoRA2Error
from comfyui_lora2.lora2.evaluate import EvalModels, evaluate, expand_prompts, images_from_tensor
from comfyui_lora2.lora2.evaluate_draw import render_table
from comfyui_lora2.lora2.evaluate_models import CLIP, DINO, resolve_model_folder


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_tiny_eval_models(tmp_path_factory.mktemp("lora2_eval"))


@pytest.fixture(scope="module")
def models(model_folders: tuple[Path, Path]) -> EvalModels:
    return EvalModels.load(*model_folders)


def test_identical_images_score_one(models: EvalModels, tmp_path: Path) -> None:
    subject = pictures(1, seed=1)
    real = save_photos(tmp_path / "real", subject)
    result = evaluate(subject.repeat(3, 1, 1, 1), real, "a photo of sks dog", models)
    assert result.real_names == ["photo_0.png"]
    assert result.dino == pytest.approx([1.0] * 3, abs=1e-5)
    assert result.clip_i == pytest.approx([1.0] * 3, abs=1e-5)
    assert result.summary()["dino"]["std"] == pytest.approx(0.0, abs=1e-6)


def test_other_and_shuffled_images_score_lower(models: EvalModels, tmp_path: Path) -> None:
    subject = pictures(1, seed=1)
    real = save_photos(tmp_path / "real", subject)
    generator = torch.Generator().manual_seed(5)
    flat = subject.reshape(1, -1, 3)
    shuffled = flat[:, torch.randperm(flat.shape[1], generator=generator)].reshape(subject.shape)
    generated = torch.cat([subject, shuffled, pictures(1, seed=2)])
    result = evaluate(generated, real, "a photo of sks dog", models)
    for values in (result.dino, result.clip_i):
        assert values[0] == pytest.approx(1.0, abs=1e-5)
        assert max(values[1:]) < 0.99, values


def test_prompt_changes_clip_t_only(models: EvalModels, tmp_path: Path) -> None:
    generated = pictures(2, seed=3)
    real = save_photos(tmp_path / "real", pictures(2, seed=4))
    dog = evaluate(generated, real, "a photo of a dog", models)
    car = evaluate(generated, real, "a red car parked on a wet street", models)
    assert dog.dino == car.dino and dog.clip_i == car.clip_i
    assert all(abs(a - b) > 1e-3 for a, b in zip(dog.clip_t, car.clip_t, strict=True)), (dog.clip_t, car.clip_t)
    per_image = evaluate(generated, real, "a photo of a dog\na red car parked on a wet street", models)
    assert per_image.clip_t == pytest.approx([dog.clip_t[0], car.clip_t[1]], abs=1e-6)


def _by_hand(model_folders: tuple[Path, Path], generated: list[Image.Image], real: list[Image.Image], prompts):
    """DINO, CLIP-I, CLIP-T per generated image from a separate load, CLIPModel's forward and pair loops."""
    from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTModel

    dino_dir, clip_dir = model_folders
    vit = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False, local_files_only=True).eval()
    vit_processor = AutoImageProcessor.from_pretrained(dino_dir, local_files_only=True)
    clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    clip_processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    with torch.no_grad():
        cls = [
            vit(**vit_processor(images=[im], return_tensors="pt")).last_hidden_state[0, 0] for im in [*generated, *real]
        ]
        inputs = clip_processor(text=prompts, images=generated + real, return_tensors="pt", padding=True)
        out = clip(**inputs)  # forward: image_embeds / text_embeds, already normalised, through another path
    n = len(generated)
    dino = [sum(F.cosine_similarity(cls[i], cls[n + j], dim=0) for j in range(len(real))) / len(real) for i in range(n)]
    image = out.image_embeds
    clip_i = [sum(float(image[i] @ image[n + j]) for j in range(len(real))) / len(real) for i in range(n)]
    clip_t = [float(image[i] @ out.text_embeds[i]) for i in range(n)]
    return [float(v) for v in dino], clip_i, clip_t


def test_matches_a_direct_computation(models: EvalModels, model_folders: tuple[Path, Path]) -> None:
    generated = images_from_tensor(pictures(3, seed=6))
    real = images_from_tensor(pictures(2, seed=7, size=(56, 36)))
    prompts = ["a photo of sks dog", "sks dog on the beach", "a watercolor painting of sks dog"]
    result = evaluate(generated, real, prompts, models, batch_size=2)
    dino, clip_i, clip_t = _by_hand(model_folders, generated, real, prompts)
    assert result.dino == pytest.approx(dino, abs=1e-5)
    assert result.clip_i == pytest.approx(clip_i, abs=1e-5)
    assert result.clip_t == pytest.approx(clip_t, abs=1e-5)
    assert len(set(np.round(result.dino, 4))) == 3  # the images really differ: the check is not 1 == 1


def test_clip_t_is_torchmetrics_clip_score_divided_by_100(models: EvalModels, model_folders: tuple[Path, Path]) -> None:
    multimodal = pytest.importorskip("torchmetrics.functional.multimodal")
    from transformers import CLIPModel, CLIPProcessor

    clip_dir = model_folders[1]
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)

    class Features(torch.nn.Module):
        """``CLIPModel`` whose features are tensors, as torchmetrics expects (transformers 5 returns outputs)."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = model
            self.config = model.config  # torchmetrics reads the text context length from it

        def get_image_features(self, *args, **kwargs) -> torch.Tensor:
            out = self.inner.get_image_features(*args, **kwargs)
            return out if torch.is_tensor(out) else out.pooler_output

        def get_text_features(self, *args, **kwargs) -> torch.Tensor:
            out = self.inner.get_text_features(*args, **kwargs)
            return out if torch.is_tensor(out) else out.pooler_output

    generated = pictures(4, seed=8)
    prompts = ["a photo of sks dog", "sks dog in the snow", "a cube", "two dogs playing"]
    ours = evaluate(generated, images_from_tensor(pictures(1, seed=9)), prompts, models).clip_t
    uint8 = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images_from_tensor(generated)]
    with torch.no_grad():
        theirs = [
            float(multimodal.clip_score(image, prompt, lambda: (Features(), processor)))
            for image, prompt in zip(uint8, prompts, strict=True)
        ]
    assert any(t > 1.0 for t in theirs), theirs  # some positive scores, or the clamp would hide everything
    assert theirs == pytest.approx([100 * max(c, 0.0) for c in ours], abs=1e-3)


def test_batching_does_not_change_the_numbers(models: EvalModels, tmp_path: Path) -> None:
    generated = pictures(5, seed=10)
    real = save_photos(tmp_path / "real", pictures(3, seed=11))
    prompts = [f"prompt number {i}" for i in range(5)]
    one = evaluate(generated, real, prompts, models, batch_size=1)
    many = evaluate(generated, real, prompts, models, batch_size=16)
    for key in ("dino", "clip_i", "clip_t"):
        assert one.values(key) == pytest.approx(many.values(key), abs=1e-5)


def test_images_are_quantised_like_save_image() -> None:
    image = torch.tensor([[[[0.0, 0.5, 1.0], [0.999, 1.2, -0.1]]]])
    (pil,) = images_from_tensor(image)
    assert np.asarray(pil).tolist() == [[[0, 127, 255], [254, 255, 0]]]
    with pytest.raises(LoRA2Error, match=r"IMAGE batch \[N, H, W, 3\]"):
        images_from_tensor(torch.zeros(3, 8, 8))


def test_prompts_one_per_image_or_one_for_all() -> None:
    assert expand_prompts("a dog", 3) == ["a dog"] * 3
    assert expand_prompts("a  dog\n\n  a cat \n", 2) == ["a dog", "a cat"]
    with pytest.raises(LoRA2Error, match="prompts has 2 lines for 3 generated images"):
        expand_prompts("a\nb", 3)
    with pytest.raises(LoRA2Error, match="prompts is empty"):
        expand_prompts(" \n ", 3)


def test_missing_folder_names_it_and_what_to_put_there(model_folders: tuple[Path, Path], tmp_path: Path) -> None:
    clip_dir = model_folders[1]
    absent = tmp_path / "models" / "lora2_eval" / "dino-vits16"
    with pytest.raises(LoRA2Error) as error:
        EvalModels.load(absent, clip_dir)
    message = str(error.value)
    assert str(absent) in message and "does not exist" in message
    assert "facebook/dino-vits16" in message and "hf download facebook/dino-vits16" in message
    assert "config.json" in message and "preprocessor_config.json" in message


def test_incomplete_or_wrong_folders_are_named(model_folders: tuple[Path, Path], tmp_path: Path) -> None:
    dino_dir, clip_dir = model_folders
    partial = tmp_path / "clip-partial"
    shutil.copytree(clip_dir, partial)
    (partial / "model.safetensors").unlink()
    for name in ("tokenizer.json", "vocab.json"):
        (partial / name).unlink(missing_ok=True)
    with pytest.raises(LoRA2Error) as error:
        EvalModels.load(dino_dir, partial)
    message = str(error.value)
    assert str(partial) in message and "openai/clip-vit-base-patch32" in message
    assert "missing model.safetensors or pytorch_model.bin" in message and "tokenizer.json or vocab.json" in message
    with pytest.raises(LoRA2Error, match="holds a 'clip' model, not 'vit'"):
        EvalModels.load(clip_dir, clip_dir)


def test_models_load_with_local_files_only(model_folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    seen: list[tuple[str, object]] = []
    for name in ("ViTModel", "AutoImageProcessor", "CLIPModel", "CLIPProcessor"):
        cls = getattr(transformers, name)
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, _name=name, **kwargs):
            seen.append((_name, kwargs.get("local_files_only")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    EvalModels.load(*model_folders)
    assert {name for name, _ in seen} == {"AutoImageProcessor", "CLIPModel", "CLIPProcessor", "ViTModel"}
    assert all(flag is True for _, flag in seen), seen


def test_model_folder_field() -> None:
    root = Path("/models/lora2_eval")
    assert resolve_model_folder("", root, DINO) == root / "dino-vits16"
    assert resolve_model_folder(" my-clip ", root, CLIP) == root / "my-clip"
    assert resolve_model_folder("/elsewhere/clip", root, CLIP) == Path("/elsewhere/clip")


def test_table_text_json_and_image(models: EvalModels, tmp_path: Path) -> None:
    real = save_photos(tmp_path / "real", pictures(2, seed=12))
    result = evaluate(pictures(3, seed=13), real, "a photo of sks dog", models)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["num_generated"] == 3 and data["num_real"] == 2
    assert data["real_photos"] == ["photo_0.png", "photo_1.png"]
    assert [row["dino"] for row in data["per_image"]] == result.dino
    for key in ("dino", "clip_i", "clip_t"):
        assert data["summary"][key]["mean"] == pytest.approx(np.mean(result.values(key)))
        assert data["summary"][key]["std"] == pytest.approx(np.std(result.values(key)))
    assert data["models"]["dino"].endswith("dino-vits16")
    text = result.to_text()
    assert "DINO" in text and "CLIP-I" in text and "CLIP-T" in text
    assert f"{result.clip_t[2]:7.4f}" in text.splitlines()[5] and "mean" in text
    image = render_table(result)
    taller = render_table(evaluate(pictures(6, seed=13), real, "a photo of sks dog", models))
    assert image.mode == "RGB" and taller.height > image.height
    assert np.asarray(image).std() > 10  # something is drawn
