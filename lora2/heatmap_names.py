"""Where a LoRA component goes in the rank heatmap: component name -> (row = block, column = layer type).

Names arrive in several spellings for the same layer, and all of them must land in the same cell:

- ComfyUI module names (what LoRA² trains on): SD1.5/SDXL ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``,
  Flux ``double_blocks.3.img_attn.qkv`` / ``single_blocks.7.linear1``, SD3 ``joint_blocks.2.x_block.attn.qkv``,
  optionally behind ``diffusion_model.`` / ``model.diffusion_model.``.
- diffusers names: ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``, ``mid_block``, ``up_blocks``,
  Flux's ``transformer_blocks.N`` / ``single_transformer_blocks.N`` (optionally behind ``unet.``/``transformer.``).
- kohya keys from LoRA files, where every dot became an underscore (``lora_unet_input_blocks_4_1_...``,
  ``lora_transformer_single_transformer_blocks_0_attn_to_q``, ``lora_te1_text_model_encoder_layers_0_...``).
  Underscores inside module names (``to_q``, ``transformer_blocks``) make that ambiguous, so
  :func:`kohya_to_path` re-joins the pieces greedily against a vocabulary of known multi-word names.

Rows (labels short enough for an axis): UNet ``in4.t0`` / ``mid.t0`` / ``out3.t1`` (transformer block t of
input/middle/output block i), ``in1.res`` (ResBlock; ``mid.res`` and ``mid.res2``), ``in3.down``, ``out2.up``;
diffusers ``down1.a0.t0``, ``down1.r0``, ``mid.a0.t0``, ``up2.a1.t0``; Flux ``double0`` .. ``single37``
(diffusers Flux gets the same labels when the adapter has single blocks, else ``block{n}``); SD3 ``joint{n}``;
text encoders ``te1.l0`` (layer 0), after every model row. Columns: ``attn1.q attn1.k attn1.v attn1.out
attn2.* ff.in ff.out proj_in proj_out res.* conv`` (UNet; ``proj_in``/``proj_out`` of a spatial transformer
sit in its first block's row), ``img.qkv img.proj img.mlp0 img.mlp2 img.mod txt.* linear1 linear2 mod``
(Flux), ``x.qkv x.proj x.fc1 x.fc2 x.mod ctx.*`` (SD3); text-encoder self-attention and MLP reuse
``attn1.*`` and ``ff.*``.

Fallback, so that no name can break the heatmap: a name of another model whose path has a numeric part
(``blocks.3.attn.to_v``) gets the row ``blocks.3`` (everything up to that number) and the column
``attn.to_v`` (the rest); anything else goes to the row ``other`` (``te1.other`` inside a text encoder)
with its whole path as the column; so do model-level layers outside the blocks (``time_embed.0``,
``img_in``, ``final_layer.linear``).
"""

from __future__ import annotations

from dataclasses import dataclass

Order = tuple[int, str, tuple[int, ...]]
"""Row sort key: (section, group, indices). Sections: 0 known model blocks, 1 numbered fallback rows,
2 the model's ``other`` row, 3 text encoders."""


@dataclass(frozen=True)
class Place:
    """The cell of one component: row label, column label, how rows sort, and the row's group."""

    row: str
    column: str
    order: Order
    group: str
    """Rows of one group (``in``, ``mid``, ``out``, ``double``, ``te1`` ...) are drawn together."""


COLUMN_ORDER: tuple[str, ...] = (
    *(f"attn{i}.{p}" for i in (1, 2) for p in ("q", "k", "v", "out")),
    *("ff.in", "ff.gate", "ff.out", "proj_in", "proj_out", "res.in", "res.out", "res.emb", "res.skip", "conv"),
    *(f"{s}.{p}" for s in ("img", "txt") for p in ("qkv", "proj", "mlp0", "mlp2", "mod")),
    *("linear1", "linear2", "mod"),
    *(f"attn.{p}" for p in ("q", "k", "v", "out")),
    *(f"ctx.{p}" for p in ("q", "k", "v", "out", "ff.in", "ff.out", "mod")),
    "proj_mlp",
    *(f"{s}.{p}" for s in ("x", "ctx") for p in ("qkv", "proj", "qkv2", "proj2", "fc1", "fc2", "mod")),
)
"""Known columns in display order; columns not listed here follow, sorted."""

VOCABULARY: frozenset[str] = frozenset(
    """model diffusion_model base_model input_blocks middle_block output_blocks transformer_blocks
    in_layers out_layers emb_layers skip_connection proj_in proj_out to_q to_k to_v to_out down_blocks mid_block
    up_blocks time_emb_proj conv_shortcut double_blocks single_blocks img_attn txt_attn img_mlp txt_mlp img_mod
    txt_mod single_transformer_blocks add_q_proj add_k_proj add_v_proj to_add_out ff_context norm1_context
    proj_mlp joint_blocks x_block context_block adaLN_modulation text_model self_attn q_proj k_proj v_proj
    out_proj wi_0 wi_1 final_layer time_embed label_emb text_encoder text_encoder_2 text_encoder_3 img_in txt_in
    time_in vector_in guidance_in in_layer out_layer x_embedder context_embedder t_embedder y_embedder conv_in
    conv_out time_embedding linear_1 linear_2 norm_out pos_embed time_text_embed timestep_embedder
    text_embedder guidance_embedder clip_l clip_g""".split()
)
"""Module names containing underscores, for re-joining kohya keys (longest match wins)."""

KOHYA_PREFIXES: tuple[tuple[str, str | None], ...] = (
    ("lora_unet_", None),
    ("lora_transformer_", None),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te3_", "te3"),
    ("lora_te_", "te"),
    ("lora_", None),
)
"""kohya key prefix -> text encoder it names (None: the diffusion model)."""

ENCODER_HEADS = {
    "text_encoder": "te1",
    "text_encoder_2": "te2",
    "text_encoder_3": "te3",
    "clip_l": "clip_l",
    "clip_g": "clip_g",
    "t5xxl": "t5xxl",
}
MODEL_LEVEL = frozenset(
    """time_embed label_emb out conv_in conv_out conv_norm_out time_embedding add_embedding img_in txt_in time_in
    vector_in guidance_in final_layer x_embedder context_embedder t_embedder y_embedder norm_out proj_out
    time_text_embed pos_embed""".split()
)
"""Model-level layers outside the blocks (embeddings, first/last layers): they go to the row ``other``."""
TRANSFORMER_HEADS = frozenset(
    {"double_blocks", "single_blocks", "joint_blocks", "transformer_blocks", "single_transformer_blocks"}
)
MODEL_HEADS = frozenset({"model", "diffusion_model", "base_model", "unet", "transformer"})

TRANSFORMER_COLUMNS = {
    "to_q": "{attn}.q",
    "to_k": "{attn}.k",
    "to_v": "{attn}.v",
    "to_out.0": "{attn}.out",
    "to_out": "{attn}.out",
    "add_q_proj": "ctx.q",
    "add_k_proj": "ctx.k",
    "add_v_proj": "ctx.v",
    "to_add_out": "ctx.out",
}
"""Attention projections, keyed by the path after the attention module (``attn1``, ``attn``)."""
BLOCK_COLUMNS = {
    "ff.net.0.proj": "ff.in",
    "ff.net.2": "ff.out",
    "ff_context.net.0.proj": "ctx.ff.in",
    "ff_context.net.2": "ctx.ff.out",
    "norm1.linear": "mod",
    "norm.linear": "mod",
    "norm1_context.linear": "ctx.mod",
}
RESNET_COLUMNS = {
    "in_layers": "res.in",
    "out_layers": "res.out",
    "emb_layers": "res.emb",
    "skip_connection": "res.skip",
    "conv1": "res.in",
    "conv2": "res.out",
    "time_emb_proj": "res.emb",
    "conv_shortcut": "res.skip",
}
FLUX_COLUMNS = {"qkv": "qkv", "proj": "proj", "0": "mlp0", "2": "mlp2", "lin": "mod"}
MMDIT_COLUMNS = {
    "attn.qkv": "qkv",
    "attn.proj": "proj",
    "attn2.qkv": "qkv2",
    "attn2.proj": "proj2",
    "mlp.fc1": "fc1",
    "mlp.fc2": "fc2",
    "adaLN_modulation.1": "mod",
}
ENCODER_COLUMNS = {
    "self_attn.q_proj": "attn1.q",
    "self_attn.k_proj": "attn1.k",
    "self_attn.v_proj": "attn1.v",
    "self_attn.out_proj": "attn1.out",
    "mlp.fc1": "ff.in",
    "mlp.fc2": "ff.out",
    "SelfAttention.q": "attn1.q",
    "SelfAttention.k": "attn1.k",
    "SelfAttention.v": "attn1.v",
    "SelfAttention.o": "attn1.out",
    "DenseReluDense.wi": "ff.in",
    "DenseReluDense.wi_0": "ff.in",
    "DenseReluDense.wi_1": "ff.gate",
    "DenseReluDense.wo": "ff.out",
}


def kohya_to_path(key: str) -> list[str]:
    """``input_blocks_4_1_transformer_blocks_0_attn1_to_q`` -> ``[input_blocks, 4, 1, transformer_blocks, ...]``."""
    parts = key.split("_")
    tokens: list[str] = []
    i = 0
    while i < len(parts):
        for span in (3, 2):
            if i + span <= len(parts) and "_".join(parts[i : i + span]) in VOCABULARY:
                tokens.append("_".join(parts[i : i + span]))
                i += span
                break
        else:
            tokens.append(parts[i])
            i += 1
    return [t for t in tokens if t]


def split_name(name: str) -> tuple[str | None, list[str]]:
    """``(text encoder or None, module path tokens)`` for any of the supported spellings."""
    if "." not in name and name.startswith("lora_"):
        prefix, encoder = next((p, e) for p, e in KOHYA_PREFIXES if name.startswith(p))
        tokens = kohya_to_path(name[len(prefix) :])
    else:
        encoder, tokens = None, [t for t in name.split(".") if t]
    while tokens and encoder is None and tokens[0] in ENCODER_HEADS:
        encoder, tokens = ENCODER_HEADS[tokens[0]], tokens[1:]
    heads = MODEL_HEADS | {"text_model", "encoder"} if encoder else MODEL_HEADS
    while len(tokens) > 1 and tokens[0] in heads:
        tokens = tokens[1:]
    return encoder, tokens


def _int(token: str) -> int | None:
    return int(token) if token.isdigit() else None


def _transformer_column(rest: list[str]) -> str:
    """Column of a layer inside a transformer block: ``attn1.to_q`` -> ``attn1.q``, ``ff.net.2`` -> ``ff.out``."""
    joined = ".".join(rest)
    if joined in BLOCK_COLUMNS:
        return BLOCK_COLUMNS[joined]
    if len(rest) >= 2 and rest[0].startswith("attn") and ".".join(rest[1:]) in TRANSFORMER_COLUMNS:
        return TRANSFORMER_COLUMNS[".".join(rest[1:])].format(attn=rest[0])
    return joined


UNET_STAGES = {
    "input_blocks": ("in", 0),
    "middle_block": ("mid", 1),
    "output_blocks": ("out", 2),
    "down_blocks": ("down", 0),
    "mid_block": ("mid", 1),
    "up_blocks": ("up", 2),
}
"""UNet block heads (ComfyUI and diffusers) -> (row label prefix, stage: in < mid < out)."""


def _unet_block(tokens: list[str]) -> tuple[str, str, int, int, int] | None:
    """``(block label, group, stage, block index, position after the block)``; the middle block has no index."""
    prefix, stage = UNET_STAGES[tokens[0]]
    if stage == 1:
        return prefix, prefix, stage, 0, 1
    index = _int(tokens[1]) if len(tokens) > 1 else None
    return None if index is None else (f"{prefix}{index}", prefix, stage, index, 2)


def _unet(tokens: list[str]) -> Place | None:
    """ComfyUI (LDM) UNet: input_blocks.i.j..., middle_block.j..., output_blocks.i.j..."""
    found = _unet_block(tokens)
    j = _int(tokens[found[4]]) if found and len(tokens) > found[4] else None
    if found is None or j is None:
        return None
    block, group, stage, index, at = found
    rest = tokens[at + 1 :]
    order: Order = (0, "unet", (stage, index, j, 0))
    if len(rest) >= 3 and rest[0] == "transformer_blocks" and _int(rest[1]) is not None:
        t = int(rest[1])
        return Place(f"{block}.t{t}", _transformer_column(rest[2:]), (0, "unet", (stage, index, j, t)), group)
    if rest and rest[0] in ("proj_in", "proj_out", "norm"):
        return Place(f"{block}.t0", rest[0], order, group)
    if rest and rest[0] in RESNET_COLUMNS:
        return Place(f"{block}.res" + ("" if j == 0 else str(j)), RESNET_COLUMNS[rest[0]], order, group)
    if rest in (["op"], ["conv"]) or not rest:
        label = {"op": f"{block}.down", "conv": f"{block}.up"}.get(rest[0] if rest else "", block)
        return Place(label, "conv", order, group)
    return Place(f"{block}.m{j}", ".".join(rest), order, group)


def _diffusers_unet(tokens: list[str]) -> Place | None:
    """diffusers UNet: down_blocks.b.{resnets,attentions,downsamplers}.n..., mid_block..., up_blocks.b..."""
    found = _unet_block(tokens)
    if found is None or len(tokens) < found[4] + 3 or _int(tokens[found[4] + 1]) is None:
        return None
    block, group, stage, index, at = found
    kind, n, rest = tokens[at], int(tokens[at + 1]), tokens[at + 2 :]
    if kind == "attentions":  # diffusers interleaves resnets[n], attentions[n]
        t = _int(rest[1]) if len(rest) >= 3 and rest[0] == "transformer_blocks" else None
        column = _transformer_column(rest[2:]) if t is not None else ".".join(rest)
        return Place(f"{block}.a{n}.t{t or 0}", column, (0, "unet", (stage, index, n, 1, t or 0)), group)
    if kind == "resnets":
        column = RESNET_COLUMNS.get(rest[0], ".".join(rest))
        return Place(f"{block}.r{n}", column, (0, "unet", (stage, index, n, 0, 0)), group)
    if kind in ("downsamplers", "upsamplers"):
        label = f"{block}.{'down' if kind == 'downsamplers' else 'up'}"
        column = "conv" if rest == ["conv"] else ".".join(rest)
        return Place(label, column, (0, "unet", (stage, index, 1 << 10, 0, n)), group)
    return None


def _flux(tokens: list[str], double_label: str) -> Place | None:
    """Flux (ComfyUI double/single blocks, diffusers transformer blocks) and SD3 MMDiT joint blocks."""
    head, n = tokens[0], _int(tokens[1]) if len(tokens) > 2 else None
    if n is None:
        return None
    rest = tokens[2:]
    if head == "double_blocks":
        stream = rest[0].split("_", 1)[0]
        column = ".".join(rest)
        if stream in ("img", "txt") and len(rest) > 1:
            column = f"{stream}.{FLUX_COLUMNS.get(rest[1], rest[1])}"
        return Place(f"double{n}", column, (0, "flux", (0, n)), "double")
    if head == "single_blocks":
        column = "mod" if rest == ["modulation", "lin"] else ".".join(rest)
        return Place(f"single{n}", column, (0, "flux", (1, n)), "single")
    if head == "joint_blocks":
        stream = {"x_block": "x", "context_block": "ctx"}.get(rest[0])
        column = MMDIT_COLUMNS.get(".".join(rest[1:])) if stream else None
        return Place(f"joint{n}", f"{stream}.{column}" if column else ".".join(rest), (0, "mmdit", (n,)), "joint")
    if head == "single_transformer_blocks":
        return Place(f"single{n}", _transformer_column(rest), (0, "flux", (1, n)), "single")
    if head == "transformer_blocks":
        return Place(f"{double_label}{n}", _transformer_column(rest), (0, "flux", (0, n)), double_label)
    return None


def _encoder(encoder: str, tokens: list[str]) -> Place:
    """Text encoders: CLIP ``layers.n.self_attn.q_proj`` and T5 ``block.n.layer.m.SelfAttention.q``."""
    if len(tokens) >= 3 and tokens[0] in ("layers", "block") and _int(tokens[1]) is not None:
        n, rest = int(tokens[1]), tokens[2:]
        if rest[0] == "layer" and len(rest) > 2:
            rest = rest[2:]
        column = ENCODER_COLUMNS.get(".".join(rest), ".".join(rest))
        return Place(f"{encoder}.l{n}", column, (3, encoder, (n,)), encoder)
    return Place(f"{encoder}.other", ".".join(tokens), (3, encoder, (1 << 30,)), encoder)


def _fallback(tokens: list[str], name: str) -> Place:
    if tokens[0] not in MODEL_LEVEL:
        for k, token in enumerate(tokens[:-1]):
            if token.isdigit():
                prefix = ".".join(tokens[:k])
                label = f"{prefix}.{token}" if prefix else token
                return Place(label, ".".join(tokens[k + 1 :]), (1, prefix, (int(token),)), prefix or "blocks")
    return Place("other", ".".join(tokens) or name, (2, "", ()), "other")


def place(name: str, double_label: str = "double") -> Place:
    """The heatmap cell of the component ``name`` (never raises; see the module docstring for the rules).

    ``double_label`` names diffusers' top-level ``transformer_blocks``: ``double`` for Flux, ``block``
    for models without single blocks (SD3, PixArt); :func:`lora2.heatmap_layout.layout` picks it.
    """
    encoder, tokens = split_name(name)
    if not tokens:
        return Place("other", name, (2, "", ()), "other")
    if encoder is not None:
        return _encoder(encoder, tokens)
    found = None
    if tokens[0] in ("input_blocks", "middle_block", "output_blocks"):
        found = _unet(tokens)
    elif tokens[0] in UNET_STAGES:
        found = _diffusers_unet(tokens)
    elif tokens[0] in TRANSFORMER_HEADS:
        found = _flux(tokens, double_label)
    return found or _fallback(tokens, name)
