"""The example workflows (``example_workflows/*.json``) against the real ComfyUI server and its validator.

The UI files are what ComfyUI's frontend wrote (``devtools/build_workflows.py`` builds them in the real
web UI); these checks make sure they still fit the node definitions the server publishes: every node
type exists, every link joins an output and an input of the same type, every widget list has the
length the frontend expects, the API-format twins in ``example_workflows/api/`` are the same graphs and pass
ComfyUI's own ``validate_prompt``, and the template browser lists each workflow with its thumbnail.
When a node's inputs change, these fail: rebuild with ``.venv/bin/python -m comfyui_lora2.devtools.build_workflows``.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from comfyui_lora2.devtools.comfy_server import ComfyServer
from comfyui_lora2.devtools.layout import MISSING_HOST_REASON, PACK_LINK_NAME, host_available

pytest_plugins = ["support.fixtures"]

REPO = Path(__file__).resolve().parents[1]
UI_DIR = REPO / "example_workflows"
API_DIR = REPO / "example_workflows" / "api"
NAMES = ("lora2_train_and_inspect", "lora2_inspect_any_lora", "lora2_apply", "lora2_validate_and_evaluate")
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar sits above its pos
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SUBJECT_LORA = "lora2/my_subject.safetensors"

# What each workflow promises (titles the docs and tests refer to).
TITLES = {
    "lora2_train_and_inspect": {
        "Load Checkpoint": "CheckpointLoaderSimple",
        "Subject images": "LoRA2Dataset",
        "Validation prompts": "LoRA2Validation",
        "Train LoRA²": "LoRA2Train",
        "Rank heatmap": "LoRA2Heatmap",
        "Prune": "LoRA2Prune",
        "Save pruned": "LoRA2Save",
        "Save adapter": "LoRA2Save",
        "Prompt": "CLIPTextEncode",
        "Negative": "CLIPTextEncode",
        "Empty latent": "EmptyLatentImage",
        "Sample without adapter": "KSampler",
        "Sample with adapter": "KSampler",
        "Preview without adapter": "PreviewImage",
        "Preview with adapter": "PreviewImage",
    },
    "lora2_inspect_any_lora": {
        "Load LoRA file": "LoRA2Load",
        "Rank heatmap": "LoRA2Heatmap",
        "Prune to budget": "LoRA2Prune",
        "Save pruned": "LoRA2Save",
        "Heatmap after pruning": "LoRA2Heatmap",
    },
    "lora2_apply": {
        "Load Checkpoint": "CheckpointLoaderSimple",
        "LoRA² adapter": "LoRA2Load",
        "Apply LoRA²": "LoRA2Apply",
        "Stock LoRA loader": "LoraLoaderModelOnly",
        "Sample with LoRA² Apply": "KSampler",
        "Sample with stock loader": "KSampler",
        "Prompt": "CLIPTextEncode",
        "Negative": "CLIPTextEncode",
        "Empty latent": "EmptyLatentImage",
    },
    "lora2_validate_and_evaluate": {
        "Load Checkpoint": "CheckpointLoaderSimple",
        "Subject images": "LoRA2Dataset",
        "Validation prompts": "LoRA2Validation",
        "Train LoRA²": "LoRA2Train",
        "Rank heatmap": "LoRA2Heatmap",
        "DreamBooth prompts (object)": "LoRA2Validation",
        "Sample the DreamBooth prompts": "LoRA2SamplePrompts",
        "Samples": "PreviewImage",
        "Evaluate: DINO, CLIP-I, CLIP-T": "LoRA2Evaluate",
        "Metrics table": "SaveImage",
    },
}
GROUPS = {
    "lora2_train_and_inspect": {"1 Data", "2 Train", "3 Inspect & prune", "4 Compare"},
    "lora2_validate_and_evaluate": {"1 Train, with validation samples", "2 Evaluate as DreamBooth does"},
}
DREAMBOOTH_PROMPTS = REPO.parent / "shared" / "data" / "dreambooth_256" / "prompts_and_classes.txt"

pytestmark = pytest.mark.skipif(not host_available(), reason=MISSING_HOST_REASON)


def ui_workflow(name: str) -> dict[str, Any]:
    return json.loads((UI_DIR / f"{name}.json").read_text())


def api_workflow(name: str) -> dict[str, Any]:
    return json.loads((API_DIR / f"{name}.json").read_text())


def title_of(node: dict[str, Any], info: dict[str, Any]) -> str:
    """A node's title; the frontend leaves it out of the file when it is the node's display name."""
    if "title" in node:
        return node["title"]
    return info.get(node["type"], {}).get("display_name") or node["type"]


def by_title(api: dict[str, Any], title: str) -> dict[str, Any]:
    (node,) = [n for n in api.values() if n.get("_meta", {}).get("title") == title]
    return node


@pytest.fixture(scope="module")
def object_info(comfy_server: ComfyServer) -> dict[str, Any]:
    return comfy_server.object_info()


def input_spec(info: dict[str, Any], node_type: str, name: str) -> tuple[str, dict[str, Any]]:
    """``(type, options)`` of one input from ``/object_info``; a list of choices is a COMBO."""
    inputs = info[node_type]["input"]
    for section in ("required", "optional"):
        if name in inputs.get(section, {}):
            spec = inputs[section][name]
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            return kind, (spec[1] if len(spec) > 1 else {})
    raise KeyError(f"{node_type} has no input {name!r} in /object_info")


def types_match(output_type: str, input_type: str) -> bool:
    """The frontend's rule: equal, ``*`` on either side, or a shared member of comma-separated unions."""
    if "*" in (output_type, input_type) or output_type == input_type:
        return True
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


def expected_widget_count(info: dict[str, Any], node_type: str) -> int:
    """How many ``widgets_values`` the frontend writes for a node: one per widget input, two for seeds
    (``control_after_generate``: explicit option, or an INT named seed/noise_seed)."""
    order = info[node_type].get("input_order", {})
    count = 0
    for section in ("required", "optional"):
        for name in order.get(section, []):
            kind, options = input_spec(info, node_type, name)
            if kind not in WIDGET_TYPES or options.get("forceInput"):
                continue
            count += 1
            control = options.get("control_after_generate")
            if control or (control is None and kind == "INT" and name in ("seed", "noise_seed")):
                count += 1
    return count


# --- the UI files --------------------------------------------------------------------------------


def test_every_expected_workflow_is_there() -> None:
    assert sorted(p.stem for p in UI_DIR.glob("*.json")) == sorted(NAMES)
    assert sorted(p.stem for p in API_DIR.glob("*.json")) == sorted(NAMES)
    assert not (UI_DIR / ".gitkeep").exists()


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_a_consistent_litegraph_file(name: str) -> None:
    workflow = ui_workflow(name)
    assert workflow["version"] == 0.4 and workflow["id"] != "00000000-0000-0000-0000-000000000000"
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]) and workflow["last_node_id"] >= max(nodes)
    links = {link[0]: link for link in workflow["links"]}
    assert len(links) == len(workflow["links"]) and workflow["last_link_id"] >= max(links, default=0)
    for link_id, origin, origin_slot, target, target_slot, _type in workflow["links"]:
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"], (name, link_id)
        assert nodes[target]["inputs"][target_slot]["link"] == link_id, (name, link_id)
    for node in nodes.values():
        for slot in node.get("inputs", []):
            assert slot["link"] is None or slot["link"] in links, (name, node["id"], slot)
        for slot in node.get("outputs", []):
            assert all(link in links for link in slot.get("links") or []), (name, node["id"], slot)


@pytest.mark.parametrize("name", NAMES)
def test_titles_groups_and_notes(name: str, object_info: dict[str, Any]) -> None:
    workflow = ui_workflow(name)
    titles: dict[str, list[str]] = {}
    for node in workflow["nodes"]:
        titles.setdefault(title_of(node, object_info), []).append(node["type"])
    for title, node_type in TITLES[name].items():
        assert titles.get(title) == [node_type], f"{name}: expected one {node_type} titled {title!r}"
    notes = [n for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes and all(len(n["widgets_values"][0]) > 40 for n in notes), f"{name}: notes need text"
    assert {g["title"] for g in workflow["groups"]} >= GROUPS.get(name, set())


@pytest.mark.parametrize("name", NAMES)
def test_layout_has_no_overlapping_nodes(name: str) -> None:
    boxes = []
    for node in ui_workflow(name)["nodes"]:
        (x, y), (w, h) = node["pos"], node["size"]
        boxes.append((node.get("title", node["type"]), x, y - TITLE_HEIGHT, x + w, y + h))
    for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[i + 1 :]:
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"{name}: {a!r} overlaps {b!r}"


@pytest.mark.parametrize("name", NAMES)
def test_node_types_exist_on_the_server(name: str, object_info: dict[str, Any]) -> None:
    unknown = {n["type"] for n in ui_workflow(name)["nodes"]} - set(object_info) - FRONTEND_ONLY
    assert not unknown, f"{name}: node types the server does not have: {unknown}"


@pytest.mark.parametrize("name", NAMES)
def test_links_join_outputs_and_inputs_of_matching_types(name: str, object_info: dict[str, Any]) -> None:
    workflow = ui_workflow(name)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for link_id, origin, origin_slot, target, target_slot, link_type in workflow["links"]:
        source, sink = nodes[origin], nodes[target]
        output_type = object_info[source["type"]]["output"][origin_slot]
        input_name = sink["inputs"][target_slot]["name"]
        input_type, _ = input_spec(object_info, sink["type"], input_name)
        where = f"{name} link {link_id}: {source['type']}[{origin_slot}] -> {sink['type']}.{input_name}"
        assert types_match(output_type, input_type), f"{where}: {output_type} into {input_type}"
        assert types_match(link_type, output_type), f"{where}: link says {link_type}, output is {output_type}"


@pytest.mark.parametrize("name", NAMES)
def test_widget_values_fit_the_node_definitions(name: str, object_info: dict[str, Any]) -> None:
    for node in ui_workflow(name)["nodes"]:
        values = node.get("widgets_values", [])
        if node["type"] in FRONTEND_ONLY:
            assert len(values) <= 1, (name, node["type"], values)
            continue
        expected = expected_widget_count(object_info, node["type"])
        assert len(values) == expected, (
            f"{name}: {node.get('title')} ({node['type']}) has {len(values)} widget values, the server's definition "
            f"gives {expected}; rebuild with devtools/build_workflows.py"
        )


# --- the API twins --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_is_the_same_graph(name: str, object_info: dict[str, Any]) -> None:
    workflow, api = ui_workflow(name), api_workflow(name)
    executable = {str(n["id"]): n for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY}
    assert {n["type"] for n in executable.values()} == {n["class_type"] for n in api.values()}
    assert set(executable) == set(api)
    for node_id, node in executable.items():
        assert api[node_id]["class_type"] == node["type"]
        assert api[node_id]["_meta"]["title"] == title_of(node, object_info)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for _, origin, origin_slot, target, target_slot, _ in workflow["links"]:
        input_name = nodes[target]["inputs"][target_slot]["name"]
        assert api[str(target)]["inputs"][input_name] == [str(origin), origin_slot]


def test_defaults_are_for_a_real_sd15_user() -> None:
    train = api_workflow("lora2_train_and_inspect")
    assert by_title(train, "Load Checkpoint")["inputs"]["ckpt_name"] == CHECKPOINT
    dataset = by_title(train, "Subject images")["inputs"]
    assert (dataset["folder"], dataset["trigger"], dataset["resolution"]) == ("lora2_subject", "sks toy", 512)
    assert dataset["caption_template"] == "a photo of {trigger}"
    assert by_title(train, "Train LoRA²")["inputs"]["steps"] == 500
    assert by_title(train, "Prune")["inputs"]["policy"] == "importance mass"
    assert by_title(train, "Prune")["inputs"]["value"] == 0.9
    assert by_title(train, "Save adapter")["inputs"]["filename"] == "lora2/my_subject"
    assert by_title(train, "Save pruned")["inputs"]["filename"] == "lora2/my_subject_pruned"
    assert by_title(train, "Prompt")["inputs"]["text"] == "a photo of sks toy on the beach"
    latent = by_title(train, "Empty latent")["inputs"]
    assert (latent["width"], latent["height"]) == (512, 512)
    without, with_adapter = by_title(train, "Sample without adapter"), by_title(train, "Sample with adapter")
    assert without["inputs"]["seed"] == with_adapter["inputs"]["seed"] and without["inputs"]["steps"] == 20
    assert train[without["inputs"]["model"][0]]["class_type"] == "CheckpointLoaderSimple"
    assert train[with_adapter["inputs"]["model"][0]]["class_type"] == "LoRA2Train"

    validation = by_title(train, "Validation prompts")["inputs"]
    assert (validation["validate_every"], validation["width"], validation["steps"]) == (100, 512, 20)
    assert by_title(train, "Train LoRA²")["inputs"]["validation"][0] == next(
        i for i, n in train.items() if n["_meta"]["title"] == "Validation prompts"
    )

    inspect = api_workflow("lora2_inspect_any_lora")
    assert by_title(inspect, "Load LoRA file")["inputs"]["lora_name"] == SUBJECT_LORA
    budget = by_title(inspect, "Prune to budget")["inputs"]
    assert (budget["policy"], budget["value"]) == ("budget (MB)", 10)
    assert by_title(inspect, "Save pruned")["inputs"]["filename"] == "lora2/my_subject_10mb"

    apply = api_workflow("lora2_apply")
    assert by_title(apply, "LoRA² adapter")["inputs"]["lora_name"] == SUBJECT_LORA
    assert by_title(apply, "Stock LoRA loader")["inputs"]["lora_name"] == SUBJECT_LORA
    assert by_title(apply, "Apply LoRA²")["inputs"]["strength"] == 1.0
    seeds = {by_title(apply, t)["inputs"]["seed"] for t in ("Sample with LoRA² Apply", "Sample with stock loader")}
    assert len(seeds) == 1


@pytest.fixture
def model_files(comfy_host, tmp_path: Path) -> Iterator[None]:
    """Empty files under the names the workflows use, in extra model folders added only for one test.

    Validation only checks that a chosen file is listed; nothing is loaded. The shared in-process base
    is left as it was.
    """
    folder_paths = comfy_host.folder_paths
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / CHECKPOINT).write_bytes(b"")
    (tmp_path / "loras" / "lora2").mkdir(parents=True)
    (tmp_path / "loras" / SUBJECT_LORA).write_bytes(b"")
    added = [("checkpoints", str(tmp_path / "checkpoints")), ("loras", str(tmp_path / "loras"))]
    for kind, path in added:
        folder_paths.add_model_folder_path(kind, path)
    folder_paths.filename_list_cache.clear()
    try:
        yield
    finally:
        for kind, path in added:
            folder_paths.folder_names_and_paths[kind][0].remove(path)
        folder_paths.filename_list_cache.clear()


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_passes_comfyui_validation(name: str, comfy_host, model_files) -> None:
    valid, error, outputs, node_errors = asyncio.run(
        comfy_host.execution.validate_prompt(str(uuid.uuid4()), api_workflow(name), None)
    )
    assert valid, f"{name}: {error}; {json.dumps(node_errors)[:3000]}"
    assert not node_errors
    output_nodes = {n["class_type"] for i, n in api_workflow(name).items() if i in set(outputs)}
    assert output_nodes <= {"PreviewImage", "SaveImage", "LoRA2Save", "LoRA2Heatmap", "LoRA2Evaluate"} and output_nodes


# --- the template browser ------------------------------------------------------------------------


def test_template_browser_lists_the_workflows(comfy_server: ComfyServer) -> None:
    templates = comfy_server.get_json("/workflow_templates")
    assert sorted(templates.get(PACK_LINK_NAME, [])) == sorted(NAMES), templates
    for name in NAMES:
        served = json.loads(comfy_server.get(f"/api/workflow_templates/{PACK_LINK_NAME}/{name}.json"))
        assert served == ui_workflow(name)
        thumbnail = comfy_server.get(f"/api/workflow_templates/{PACK_LINK_NAME}/{name}.jpg")
        assert thumbnail == (UI_DIR / f"{name}.jpg").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_thumbnail_is_a_real_jpeg(name: str) -> None:
    data = (UI_DIR / f"{name}.jpg").read_bytes()
    assert data[:3] == b"\xff\xd8\xff" and 10_000 < len(data) < 200_000, len(data)
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "JPEG" and image.size == (1280, 720)
    # not a blank canvas: a graph has many distinct colours
    assert len(image.convert("RGB").resize((160, 90)).getcolors(maxcolors=1 << 16) or []) > 500


def dreambooth_prompt_lists(unique: str, object_class: str, live_class: str) -> tuple[list[str], list[str]]:
    """The 25 object and 25 live-subject prompts of the DreamBooth dataset file, formatted as its code does."""
    text = DREAMBOOTH_PROMPTS.read_text()
    objects, live = text.split("Object Prompts")[1].split("Live Subject Prompts")
    pattern = re.compile(r"'(a .*?)'\.format")
    return (
        [p.format(unique, object_class) for p in pattern.findall(objects)],
        [p.format(unique, live_class) for p in pattern.findall(live)],
    )


def test_evaluation_workflow_samples_the_dreambooth_prompts() -> None:
    api = api_workflow("lora2_validate_and_evaluate")
    prompts = by_title(api, "DreamBooth prompts (object)")["inputs"]["prompts"].splitlines()
    assert len(prompts) == 25 and all("sks toy" in p for p in prompts)
    notes = {n.get("title"): n for n in ui_workflow("lora2_validate_and_evaluate")["nodes"] if n["type"] == "Note"}
    live = notes["DreamBooth prompts (live subject)"]["widgets_values"][0].splitlines()
    assert len(live) == 25 and all("sks dog" in p for p in live)
    if DREAMBOOTH_PROMPTS.is_file():  # ../shared is there in CI, not on a user's machine
        assert (prompts, live) == dreambooth_prompt_lists("sks", "toy", "dog")
    sample, evaluate = by_title(api, "Sample the DreamBooth prompts"), by_title(api, "Evaluate: DINO, CLIP-I, CLIP-T")
    assert api[sample["inputs"]["model"][0]]["class_type"] == "LoRA2Train"
    assert evaluate["inputs"]["images"][0] == evaluate["inputs"]["prompts"][0]  # images and prompts, one node
    assert api[evaluate["inputs"]["images"][0]] is sample
    assert evaluate["inputs"]["real_folder"] == by_title(api, "Subject images")["inputs"]["folder"]
