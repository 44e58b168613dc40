"""Every node declared alike, and every widget reaching the setting it claims.

Declarations: the ``LoRA2`` id prefix, the ``LoRA² `` display prefix and category, a description, a
tooltip on every input and output, and widget defaults equal to the config dataclasses' defaults.

Widgets: each one is set to a value no default or test uses, the node runs in ComfyUI's graph, and the
value is read back from what the node produced (the adapter's config and saved training settings, the
dataset's spec and captions). A node that drops a widget on the floor fails here. The tables below list
every widget of the Train and Dataset nodes; a new widget fails the completeness check until it is added.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from comfyui_lora2.devtools.comfy_host import ComfyHost, run_prompt
from comfyui_lora2.devtools.layout import MISSING_HOST_REASON, host_available
from comfyui_lora2.devtools.prompts import lora2_dataset, lora2_train

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON)


def schemas(comfy_host: ComfyHost) -> dict:
    return {name: comfy_host.nodes.NODE_CLASS_MAPPINGS[name].define_schema() for name in comfy_host.pack_node_names()}


def test_every_node_is_declared_alike(comfy_host: ComfyHost) -> None:
    declared = schemas(comfy_host)
    assert len(declared) >= 9
    for name, schema in declared.items():
        assert name.startswith("LoRA2") and schema.node_id == name
        assert schema.display_name.startswith("LoRA² ") and schema.category == "LoRA²", name
        assert schema.description and len(schema.description) > 20, name
        for socket in [*schema.inputs, *schema.outputs]:
            assert socket.tooltip and len(socket.tooltip) > 5, f"{name}.{socket.id} has no tooltip"


def widget_defaults(comfy_host: ComfyHost, node: str) -> dict:
    schema = comfy_host.nodes.NODE_CLASS_MAPPINGS[node].define_schema()
    return {i.id: i.default for i in schema.inputs if hasattr(i, "default")}


def test_widget_defaults_are_the_config_defaults(comfy_host: ComfyHost) -> None:
    from comfyui_lora2.lora2 import LoRA2Config
    from comfyui_lora2.lora2.dataset_spec import DatasetSpec
    from comfyui_lora2.lora2.train import TrainConfig

    lora2, train, spec = LoRA2Config(), TrainConfig(), DatasetSpec()
    train_expected = {
        "steps": train.steps,
        "batch_size": train.batch_size,
        "learning_rate": train.lr,
        "rank_learning_rate": train.nu_lr,
        "optimizer": train.optimizer,
        "init_rank": lora2.init_rank,
        "max_rank": lora2.max_rank,
        "targets": lora2.targets,
        "importance_mass": lora2.mass,
        "prior_strength": lora2.prior_strength,
        "seed": train.seed,
        "training_dtype": train.dtype,
        "gradient_checkpointing": train.gradient_checkpointing,
        "save_every": train.save_every,
        "eval_every": train.eval_every,
        "mode": "LoRA²" if lora2.adaptive else "fixed rank",
    }
    dataset_expected = {
        "resolution": spec.resolution,
        "bucketing": spec.bucketing,
        "flip": spec.flip,
        "random_crop": spec.crop,
        "color_jitter": spec.color,
        "variants": spec.variants,
        "seed": spec.seed,
    }
    train_defaults = widget_defaults(comfy_host, "LoRA2Train")
    dataset_defaults = widget_defaults(comfy_host, "LoRA2Dataset")
    assert {name: train_defaults[name] for name in train_expected} == train_expected
    assert {name: dataset_defaults[name] for name in dataset_expected} == dataset_expected


@pytest.fixture(scope="module")
def widget_subject(comfy_host: ComfyHost) -> str:
    """Three generated images, one with its own caption, in ComfyUI's input folder."""
    folder = comfy_host.base_dir / "input" / "widget_subject"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(3):
        pixels = torch.rand(72, 88, 3, generator=torch.Generator().manual_seed(index)) * 255
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{index:02d}.png")
    (folder / "00.txt").write_text("its own caption")
    return folder.name


def graph(subject: str, dataset: dict | None = None, train: dict | None = None) -> dict:
    return {
        "model": {"class_type": "TestTinyModel", "inputs": {"family": "sd15", "seed": 0}},
        "vae": {"class_type": "TestTinyVAE", "inputs": {"family": "sd15", "seed": 0}},
        "cond": {"class_type": "TestRandomConditioning", "inputs": {"family": "sd15", "seed": 1, "batch": 1}},
        "dataset": lora2_dataset(["vae", 0], ["cond", 0], folder=subject, **(dataset or {})),
        "train": lora2_train(["model", 0], ["dataset", 0], **(train or {})),
        "keep_dataset": {"class_type": "TestCapture", "inputs": {"value": ["dataset", 0], "key": "widgets-dataset"}},
        "keep_adapter": {"class_type": "TestCapture", "inputs": {"value": ["train", 1], "key": "widgets-adapter"}},
    }


TRAIN_WIDGETS = {
    "steps": 4,
    "batch_size": 2,
    "learning_rate": 2.5e-3,
    "rank_learning_rate": 0.037,
    "optimizer": "sgd",
    "init_rank": 3,
    "max_rank": 9,
    "targets": "attn+ff",
    "importance_mass": 0.77,
    "prior_strength": 3.3e-5,
    "seed": 4242,
    "training_dtype": "bfloat16",
    "gradient_checkpointing": True,
    "save_every": 2,
    "eval_every": 3,
    "checkpoint_name": "lora2/widgets",
    "mode": "fixed rank",
}
"""A value for every Train widget that no default and no other test uses."""
TRAIN_WIDGETS_ELSEWHERE = {
    "custom_targets": "test_custom_targets_reach_the_config below",
    "resume": "tests/test_nodes_train.py::test_cancel_saves_a_valid_adapter_and_resume_continues",
    "validation": "tests/test_nodes_validation.py (an optional LORA2_VALIDATION socket)",
}
TRAIN_SOCKETS = {"model", "dataset"}


def test_every_train_widget_reaches_the_config_it_claims(comfy_host: ComfyHost, widget_subject: str) -> None:
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED

    inputs = {i.id for i in comfy_host.nodes.NODE_CLASS_MAPPINGS["LoRA2Train"].define_schema().inputs}
    assert inputs == set(TRAIN_WIDGETS) | set(TRAIN_WIDGETS_ELSEWHERE) | TRAIN_SOCKETS  # a new widget: add it here

    run_prompt(graph(widget_subject, train=TRAIN_WIDGETS)).raise_for_failure()
    adapter = CAPTURED["widgets-adapter"]
    lora2, train = adapter.config, adapter.resume.train_config["train"]
    assert (lora2.targets, lora2.init_rank, lora2.max_rank, lora2.adaptive) == ("attn+ff", 3, 9, False)
    assert (lora2.mass, lora2.prior_strength, lora2.seed) == (0.77, 3.3e-5, 4242)
    assert any(".ff." in name for name in adapter.components)  # attn+ff really adapted the feed-forward layers
    assert {key: train[key] for key in ("steps", "batch_size", "lr", "nu_lr", "optimizer", "seed")} == {
        "steps": 4,
        "batch_size": 2,
        "lr": 2.5e-3,
        "nu_lr": 0.037,
        "optimizer": "sgd",
        "seed": 4242,
    }
    assert (train["dtype"], train["gradient_checkpointing"], train["save_every"]) == ("bfloat16", True, 2)
    assert train["eval_every"] == 3 and adapter.history["eval_steps"] == [0, 3, 4]
    assert "momentum_buffer" in next(iter(adapter.resume.optimizer_state["state"].values()))  # SGD really ran
    loras = comfy_host.base_dir / "models" / "loras" / "lora2"
    assert (loras / "widgets_step000002.safetensors").is_file()  # save_every and checkpoint_name


def test_custom_targets_reach_the_config(comfy_host: ComfyHost, widget_subject: str) -> None:
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED

    train = {"targets": "custom regex", "custom_targets": r"attn2\.to_k$", "steps": 1}
    run_prompt(graph(widget_subject, train=train)).raise_for_failure()
    adapter = CAPTURED["widgets-adapter"]
    assert adapter.config.targets == r"attn2\.to_k$"
    assert adapter.components and all(name.endswith("attn2.to_k") for name in adapter.components)


DATASET_WIDGETS = {
    "caption_template": "{trigger} sitting in a test",
    "trigger": "zq cat",
    "resolution": 128,
    "bucketing": False,
    "flip": True,
    "random_crop": True,
    "color_jitter": True,
    "variants": 2,
    "seed": 77,
    "cache_on_disk": False,
}
"""A value for every Dataset widget that no default and no other test uses (``folder``: the fixture's)."""
DATASET_SOCKETS = {"folder", "vae", "clip", "conditioning"}


def test_every_dataset_widget_reaches_the_dataset(comfy_host: ComfyHost, widget_subject: str) -> None:
    from comfyui_lora2.devtools.tiny_nodes import CAPTURED

    inputs = {i.id for i in comfy_host.nodes.NODE_CLASS_MAPPINGS["LoRA2Dataset"].define_schema().inputs}
    assert inputs == set(DATASET_WIDGETS) | DATASET_SOCKETS  # a new widget: add it here
    cache = comfy_host.base_dir / "models" / "lora2_cache"
    before = set(cache.glob("*")) if cache.is_dir() else set()

    run_prompt(graph(widget_subject, dataset=DATASET_WIDGETS, train={"steps": 1})).raise_for_failure()
    dataset = CAPTURED["widgets-dataset"]
    spec = dataset.spec
    assert (spec.resolution, spec.bucketing, spec.flip, spec.crop, spec.color) == (128, False, True, True, True)
    assert (spec.variants, spec.seed) == (2, 77)
    captions = sorted({item.caption for item in dataset.items})
    assert captions == ["its own caption", "zq cat sitting in a test"]
    assert {tuple(item.latents.shape[-2:]) for item in dataset.items} == {(16, 16)}  # 128 px square crops
    assert [item.latents.shape[0] for item in dataset.items] == [2 * 2] * 3  # two variants, each mirrored too
    assert (set(cache.glob("*")) if cache.is_dir() else set()) == before  # cache_on_disk off wrote nothing
