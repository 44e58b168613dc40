"""lora2/heatmap*.py: name parsing, the rank table, and the rendered heatmap (colours, legend, panels)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from comfyui_lora2.lora2 import LoRA2Error
from comfyui_lora2.lora2.adapter import Adapter, Component
from comfyui_lora2.lora2.heatmap import build_rank_table, cell_colour, draw_heatmap, layout, render_heatmap
from comfyui_lora2.lora2.heatmap_draw import EMPTY, displayable, luminance, palette_colour, text_colour
from comfyui_lora2.lora2.lora_keys import default_key
from comfyui_lora2.lora2.train import History

ATTN = [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
ATTN_COLUMNS = [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("q", "k", "v", "out")]


def unet_names(spec: list[tuple[str, int]], ff: bool = False, proj: bool = False) -> list[str]:
    """ComfyUI module names of the attention layers of the given ``(spatial transformer, depth)`` list."""
    names = []
    for base, depth in spec:
        for t in range(depth):
            names += [f"{base}.transformer_blocks.{t}.{layer}" for layer in ATTN]
            if ff:
                names += [f"{base}.transformer_blocks.{t}.ff.net.0.proj", f"{base}.transformer_blocks.{t}.ff.net.2"]
        if proj:
            names += [f"{base}.proj_in", f"{base}.proj_out"]
    return names


SD15 = [(f"input_blocks.{i}.1", 1) for i in (1, 2, 4, 5, 7, 8)] + [("middle_block.1", 1)]
SD15 += [(f"output_blocks.{i}.1", 1) for i in range(3, 12)]
SDXL = [("input_blocks.4.1", 2), ("input_blocks.5.1", 2), ("input_blocks.7.1", 10), ("input_blocks.8.1", 10)]
SDXL += [("middle_block.1", 10)] + [(f"output_blocks.{i}.1", 10) for i in (0, 1, 2)]
SDXL += [(f"output_blocks.{i}.1", 2) for i in (3, 4, 5)]
SD15_ROWS = [f"in{i}.t0" for i in (1, 2, 4, 5, 7, 8)] + ["mid.t0"] + [f"out{i}.t0" for i in range(3, 12)]


def flux_names() -> list[str]:
    names = []
    for n in range(19):
        for s in ("img", "txt"):
            names += [f"double_blocks.{n}.{s}_attn.{p}" for p in ("qkv", "proj")]
            names += [f"double_blocks.{n}.{s}_mlp.{i}" for i in (0, 2)] + [f"double_blocks.{n}.{s}_mod.lin"]
    for n in range(38):
        names += [f"single_blocks.{n}.linear1", f"single_blocks.{n}.linear2", f"single_blocks.{n}.modulation.lin"]
    return names


def adapter_of(names: list[str], rank_of=lambda i: 1 + i % 6, size: int = 8) -> Adapter:
    """Tiny components (``size``×``size``) with chosen ranks."""
    components = {}
    for i, name in enumerate(names):
        r = rank_of(i)
        components[name] = Component(torch.randn(size, r), torch.randn(r, size))
    return Adapter(components=components, base_model="Test")


def planted(sigmas: list[float], size: int = 12) -> Component:
    u = torch.linalg.qr(torch.randn(size, len(sigmas), dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(size, len(sigmas), dtype=torch.float64))[0]
    return Component(up=(u * torch.tensor(sigmas, dtype=torch.float64)).float(), down=v.T.float().contiguous())


# ----------------------------------------------------------------------------- layout
def test_sd15_table_has_blocks_in_model_order_and_attention_columns() -> None:
    names = unet_names(SD15)
    table = build_rank_table(adapter_of(names), energy=False)
    assert table.rows == SD15_ROWS  # out10 after out9: indices sort as numbers
    assert table.columns == ATTN_COLUMNS
    for i, name in enumerate(names):
        cell = layout(names).cells[name]
        assert table.cells[cell] == 1 + i % 6 and table.components[cell] == name
    assert table.row_groups == ["in"] * 6 + ["mid"] + ["out"] * 9


def test_sdxl_table_has_70_transformer_rows_and_ff_proj_columns() -> None:
    table = build_rank_table(adapter_of(unet_names(SDXL, ff=True, proj=True)), energy=False)
    assert len(table.rows) == 70
    assert table.rows[:6] == ["in4.t0", "in4.t1", "in5.t0", "in5.t1", "in7.t0", "in7.t1"]
    assert table.rows[24:26] == ["mid.t0", "mid.t1"] and table.rows[34] == "out0.t0" and table.rows[-1] == "out5.t1"
    assert table.columns == [*ATTN_COLUMNS, "ff.in", "ff.out", "proj_in", "proj_out"]
    proj_rows = [row for row in table.rows if (row, "proj_in") in table.cells]
    assert proj_rows == [row for row in table.rows if row.endswith(".t0")]  # a spatial transformer's first block
    assert len(table.cells) == 70 * 10 + 11 * 2


def test_flux_table_has_double_then_single_rows() -> None:
    table = build_rank_table(adapter_of(flux_names()), energy=False)
    assert table.rows == [f"double{n}" for n in range(19)] + [f"single{n}" for n in range(38)]
    streams = [f"{s}.{p}" for s in ("img", "txt") for p in ("qkv", "proj", "mlp0", "mlp2", "mod")]
    assert table.columns == [*streams, "linear1", "linear2", "mod"]
    assert ("single3", "img.qkv") not in table.cells and ("double3", "linear1") not in table.cells


@pytest.mark.parametrize(
    "names",
    [
        unet_names(SD15, ff=True, proj=True),
        unet_names(SDXL[:3]),
        flux_names()[:40],
        [f"down_blocks.1.attentions.{a}.transformer_blocks.0.{layer}" for a in (0, 1) for layer in ATTN]
        + [
            f"up_blocks.2.attentions.{a}.transformer_blocks.{t}.{layer}"
            for a in (0, 2)
            for t in (0, 1)
            for layer in ATTN
        ]
        + [f"mid_block.attentions.0.transformer_blocks.0.{layer}" for layer in ATTN],
        [
            f"joint_blocks.{n}.{s}.{p}"
            for n in (0, 1)
            for s in ("x_block", "context_block")
            for p in ("attn.qkv", "mlp.fc1")
        ],
    ],
    ids=["sd15", "sdxl", "flux", "diffusers-unet", "sd3"],
)
def test_kohya_keys_parse_to_the_same_table_as_module_names(names: list[str]) -> None:
    expected = layout(names)
    for spelling in (default_key, lambda n: "diffusion_model." + n, lambda n: "lora_unet_diffusion_model_" + n):
        keys = [spelling(n).replace(".", "_") if spelling(n).startswith("lora_") else spelling(n) for n in names]
        got = layout(keys)
        assert (got.rows, got.columns) == (expected.rows, expected.columns)
        assert [got.cells[k] for k in keys] == [expected.cells[n] for n in names]
    assert "other" not in expected.rows


def test_diffusers_unet_and_flux_labels() -> None:
    names = [
        "down_blocks.1.resnets.0.conv1",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.resnets.1.time_emb_proj",
        "down_blocks.1.attentions.1.proj_in",
        "down_blocks.1.downsamplers.0.conv",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2",
    ]
    placed = layout(names)
    assert placed.rows == ["down1.r0", "down1.a0.t0", "down1.r1", "down1.a1.t0", "down1.down", "mid.a0.t0", "up0.a2.t0"]
    assert placed.cells[names[0]] == ("down1.r0", "res.in") and placed.cells[names[2]] == ("down1.r1", "res.emb")
    flux = [
        "lora_transformer_transformer_blocks_0_attn_add_q_proj",
        "lora_transformer_single_transformer_blocks_0_attn_to_q",
    ]
    assert layout(flux).cells == {flux[0]: ("double0", "ctx.q"), flux[1]: ("single0", "attn.q")}
    sd3 = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.net.0.proj"]  # no single blocks: not Flux
    assert layout(sd3).rows == ["block0", "block1"] and layout(sd3).columns == ["ff.in", "attn.q"]


def test_text_encoders_get_their_own_rows_after_the_model_and_unknown_names_never_crash() -> None:
    names = [
        "lora_te2_text_model_encoder_layers_0_mlp_fc1",
        "lora_te1_text_model_encoder_layers_1_self_attn_q_proj",
        "lora_te1_text_model_encoder_layers_0_self_attn_out_proj",
        "clip_l.transformer.text_model.encoder.layers.2.self_attn.k_proj",
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q",
        "lora_te1_something_else",
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # same cell as the line above
        "blocks.3.attn.to_v",
        "blocks.10.fc",
        "time_embed.0",
        "weird",
        "",
        "....",
        "lora_unet_",
        "output_blocks.x.1.transformer_blocks.0.attn1.to_q",
    ]
    placed = layout(names)
    assert len(set(placed.cells.values())) == len(names)  # every name has its own cell
    model_rows = ["in4.t0", "blocks.3", "blocks.10", "output_blocks.x.1", "other"]  # known, numbered, the rest
    assert placed.rows == [*model_rows, "clip_l.l2", "te1.l0", "te1.l1", "te1.other", "te2.l0"]
    assert placed.cells[names[1]] == ("te1.l1", "attn1.q") and placed.cells[names[2]] == ("te1.l0", "attn1.out")
    assert placed.cells[names[0]] == ("te2.l0", "ff.in") and placed.cells[names[4]] == ("te2.l0", "attn1.q")
    assert placed.cells[names[7]] == ("other", names[7])
    assert placed.cells["blocks.3.attn.to_v"] == ("blocks.3", "attn.to_v")
    assert placed.cells["time_embed.0"] == ("other", "time_embed.0")
    assert build_rank_table(adapter_of([n for n in names if n])).rows  # builds and draws without errors
    render_heatmap(build_rank_table(adapter_of([n for n in names if n])), width=512)


# ----------------------------------------------------------------------------- table contents
def test_energy_ranks_on_synthetic_spectra() -> None:
    adapter = Adapter(
        components={
            "blocks.0.fc": planted([math.sqrt(50), math.sqrt(30), math.sqrt(15), math.sqrt(5)]),
            "blocks.1.fc": planted([10.0, 0.1, 0.1]),
            "blocks.2.fc": planted([1.0] * 8),
        }
    )
    table = build_rank_table(adapter)
    assert [table.energy90[(f"blocks.{i}", "fc")] for i in range(3)] == [3, 1, 8]
    assert [table.energy99[(f"blocks.{i}", "fc")] for i in range(3)] == [4, 1, 8]
    assert [table.cells[(f"blocks.{i}", "fc")] for i in range(3)] == [4, 3, 8]


def test_to_dict_and_to_text() -> None:
    names = [*unet_names(SD15[:2]), "input_blocks.1.1.proj_in"]
    adapter = adapter_of(names)
    table = build_rank_table(adapter)
    data = json.loads(json.dumps(table.to_dict()))
    assert data["rows"] == ["in1.t0", "in2.t0"] and data["columns"] == [*ATTN_COLUMNS, "proj_in"]
    assert len(data["cells"]) == len(names)
    first = data["cells"][0]
    assert first["row"] == "in1.t0" and first["column"] == "attn1.q" and first["component"] == names[0]
    assert first["rank"] == 1 and first["energy90"] == 1 and first["energy99"] == 1
    ranks = [c.rank for c in adapter.components.values()]
    assert data["totals"] == {
        "components": len(names),
        "parameters": adapter.num_parameters(),
        "megabytes_fp16": pytest.approx(adapter.num_parameters() * 2 / 1e6),
        "mean_rank": pytest.approx(sum(ranks) / len(ranks), abs=1e-4),
        "max_rank": max(ranks),
    }
    lines = table.to_text().splitlines()
    assert lines[0] == table.summary() and "mean rank" in lines[0] and "MB (fp16)" in lines[0]
    assert lines[1].split() == ["rank", *ATTN_COLUMNS, "proj_in"]
    assert lines[2].split() == ["in1.t0", "1", "2", "3", "4", "5", "6", "1", "2", "5"]  # proj_in: name 16
    assert lines[3].split()[-1] == "."  # in2.t0 has no proj_in
    assert len({len(line) for line in lines[1:]}) == 1  # aligned
    assert table.to_text("energy99").splitlines()[1].startswith("energy99")
    with pytest.raises(LoRA2Error, match="energy90"):
        table.to_text("size")


# ----------------------------------------------------------------------------- rendering
def test_cell_colours_follow_the_ranks_and_the_palette_is_monotonic() -> None:
    names = [*unet_names(SD15), "input_blocks.1.1.proj_in"]
    table = build_rank_table(adapter_of(names, rank_of=lambda i: 1 + (i * 7) % 23, size=24), energy=False)
    heatmap = draw_heatmap(table, title="LoRA² test", width=1024)
    pixels = heatmap.image.load()
    vmin, vmax = table.min_rank, table.max_rank
    assert (vmin, vmax) == (1, 23)
    assert set(heatmap.cells) == set(table.cells)
    for cell, (x0, y0, x1, y1) in heatmap.cells.items():
        expected = cell_colour(table.cells[cell], vmin, vmax)
        for x, y in ((x0 + 1, y0 + 1), (x1 - 2, y1 - 2), (x0 + 1, y1 - 2)):  # corners: away from the number
            assert pixels[x, y] == expected, cell
        inside = {pixels[x, (y0 + y1) // 2] for x in range(x0, x1)}
        assert text_colour(expected) in inside or len(inside) > 1  # the number is drawn
    for x0, y0, x1, y1 in heatmap.empty_cells.values():
        assert pixels[x0 + 1, y0 + 1] == EMPTY and len({pixels[x, (y0 + y1) // 2] for x in range(x0, x1)}) == 1
    assert len(heatmap.empty_cells) == len(table.rows) - 1
    lightness = [luminance(cell_colour(r, vmin, vmax)) for r in range(vmin, vmax + 1)]
    assert all(a < b for a, b in itertools.pairwise(lightness))
    fine = [luminance(palette_colour(t / 200)) for t in range(201)]
    assert all(a <= b for a, b in itertools.pairwise(fine))
    assert cell_colour(5, 5, 5) == palette_colour(0.5) and cell_colour(99, 1, 10) == palette_colour(1.0)
    assert text_colour(palette_colour(0.0)) == (255, 255, 255) and text_colour(palette_colour(1.0)) == (0, 0, 0)


def test_legend_size_and_history_panel() -> None:
    table = build_rank_table(adapter_of(unet_names(SD15)), energy=False)
    plain = draw_heatmap(table, width=1024)
    assert plain.image.size[0] == 1024 and plain.charts is None
    x0, y0, x1, y1 = plain.legend
    pixels = plain.image.load()
    assert pixels[(x0 + x1) // 2, y0] == cell_colour(table.max_rank, table.min_rank, table.max_rank)
    assert pixels[(x0 + x1) // 2, y1 - 1] == cell_colour(table.min_rank, table.min_rank, table.max_rank)
    assert plain.legend[0] >= plain.grid[2]  # right of the grid
    history = History(components=list(range(3)), loss=[0.2 / (s + 1) for s in range(50)])
    history.ranks = [[2, 2 + s // 10, 3] for s in range(50)]
    with_history = draw_heatmap(table, history=history, width=1024)
    assert with_history.image.size[0] == 1024 and with_history.image.size[1] > plain.image.size[1]
    assert with_history.charts is not None and all(box[1] > plain.grid[3] for box in with_history.charts)
    as_dict = render_heatmap(table, history=history.to_dict(), width=1024)
    assert as_dict.size == with_history.image.size
    assert render_heatmap(table, history={"loss": [], "ranks": []}).size == plain.image.size  # nothing to chart
    for width in (320, 640, 1600):
        assert render_heatmap(table, history=history, width=width).size[0] == width
    with pytest.raises(LoRA2Error, match="'loss' and 'ranks'"):
        render_heatmap(table, history={"loss": [1.0]})
    with pytest.raises(LoRA2Error, match="width"):
        render_heatmap(table, width=100)


def test_big_tables_stay_readable_and_empty_tables_render() -> None:
    sdxl = draw_heatmap(build_rank_table(adapter_of(unet_names(SDXL, ff=True)), energy=False), width=1024)
    cell_h = {y1 - y0 for _, y0, _, y1 in sdxl.cells.values()}
    assert min(cell_h) >= 14 and sdxl.number_size is not None and sdxl.number_size >= 10
    flux = draw_heatmap(build_rank_table(adapter_of(flux_names()), energy=False), width=1024)
    assert flux.number_size is not None and flux.number_size >= 10
    empty = render_heatmap(build_rank_table(Adapter(components={})), title="nothing", width=512)
    assert empty.size[0] == 512
    assert displayable("LoRA² — λ") == "LoRA2 - lambda"


def test_history_chart_on_its_own() -> None:
    from comfyui_lora2.lora2.heatmap_charts import render_history

    history = {"components": ["a", "b"], "loss": [0.5, 0.4, 0.3, 0.2], "ranks": [[2, 2], [3, 2], [4, 3], [4, 4]]}
    image = render_history(history, width=800, height=300)
    assert image.size == (800, 300)
    assert len(set(image.getdata())) > 10  # lines, ticks and labels were drawn
    with pytest.raises(LoRA2Error, match="no recorded steps"):
        render_history({"components": [], "loss": [], "ranks": []})
