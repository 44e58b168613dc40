"""The speed and memory shortcuts of issue 13 compute what the plain code computed.

* ``AdaptiveLoRA.scale`` caches ``alpha·p``: the cache must follow every change of ν and of the width,
  and stay out of the way when ν is being learned (then ``p`` must be in the graph).
* ``make_optimizer`` takes the fused kernel where it can, and the foreach one where it cannot.
* Loading a float16 LoRA keeps its factors in float16 (no float32 copies), with the same ΔW.
* ``LinearUpdate`` (a linear component's update as one node that recomputes its hidden activation)
  gives the unfused ops' output and gradients to the bit, with and without autocast.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from comfyui_lora2.devtools.saved_tensors import saved_storages
from comfyui_lora2.lora2 import rank as R
from comfyui_lora2.lora2.adapter import Adapter, Component
from comfyui_lora2.lora2.growth import GradientSketch
from comfyui_lora2.lora2.layers import AdaptiveLoRA
from comfyui_lora2.lora2.lora_file import load_adapter, save_adapter
from comfyui_lora2.lora2.train import make_optimizer


def component(adaptive: bool = True) -> AdaptiveLoRA:
    c = AdaptiveLoRA(
        nn.Linear(12, 10),
        width=6,
        nu=R.nu_for_rate(0.3),
        alpha=4.0,
        adaptive=adaptive,
        dtype=torch.float32,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(1),
    )
    with torch.no_grad():
        c.up.normal_(0.0, 0.2)
    return c


def uncached(c: AdaptiveLoRA, x: torch.Tensor) -> torch.Tensor:
    """The forward written out with ``p`` computed afresh."""
    p = c.alpha * c.importance()
    return torch.nn.functional.linear(torch.nn.functional.linear(x, c.down[: c.width]) * p, c.up[:, : c.width])


@pytest.mark.parametrize("adaptive", [True, False])
def test_cached_scale_follows_nu_and_width_changes(adaptive: bool) -> None:
    c = component(adaptive)
    c.nu.requires_grad_(False)  # ν follows the width (the evidence rule): the cached path
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert torch.equal(c(x), uncached(c, x))
        c.nu.fill_(R.nu_for_rate(0.9))  # in place, as rank control and optimizers change ν
        assert torch.equal(c(x), uncached(c, x))
        c.set_width(4, reallocate=False)
        assert torch.equal(c(x), uncached(c, x))
        c.nu.data = torch.tensor(R.nu_for_rate(0.05))  # replaced, as load_state_dict does
        assert torch.equal(c(x), uncached(c, x))
        c.set_width(8, reallocate=True)
        assert torch.equal(c(x), uncached(c, x))


def test_cached_scale_is_reused_between_changes() -> None:
    c = component()
    c.nu.requires_grad_(False)
    first = c.scale(torch.float32)
    assert c.scale(torch.float32) is first
    assert c.scale(torch.bfloat16) is not first  # one per compute dtype
    c.nu.add_(0.1)
    assert c.scale(torch.float32) is not first


def test_learned_nu_keeps_its_gradient() -> None:
    """With ν learned (rank_control='gradient') p stays in the graph: no stale cache, ν gets a gradient."""
    c = component()
    x = torch.randn(3, 12)
    with torch.no_grad():
        c(x)  # an evaluation fills the cache first
    c(x).pow(2).sum().backward()
    assert c.nu.grad is not None and float(c.nu.grad.abs()) > 0


def test_fused_optimizer_where_the_parameters_allow_it(monkeypatch) -> None:
    cpu = nn.Parameter(torch.randn(4, 3))
    assert make_optimizer("adamw", [{"params": [cpu], "lr": 1e-2}]).defaults["fused"] is True

    class NoFusedKernel(torch.optim.Adam):  # what torch raises for a device without the fused kernel
        def __init__(self, params, fused=None, **kwargs):
            if fused:
                raise RuntimeError(
                    "`fused=True` requires all the params to be floating point Tensors of supported devices"
                )
            super().__init__(params, fused=fused, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", NoFusedKernel)
    fallback = make_optimizer("adam", [{"params": [cpu], "lr": 1e-2}])
    assert not fallback.defaults["fused"] and fallback.defaults["foreach"] is True


def test_fused_step_matches_the_reference_step() -> None:
    """Same algorithm, another kernel: a few AdamW steps land where torch's reference loop lands."""
    torch.manual_seed(0)
    start = torch.randn(5, 4)
    fused, plain = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    opt_fused = make_optimizer("adamw", [{"params": [fused], "lr": 1e-2}])
    opt_plain = torch.optim.AdamW([plain], lr=1e-2, weight_decay=0.0, foreach=False)
    for step in range(5):
        grad = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        fused.grad, plain.grad = grad.clone(), grad.clone()
        opt_fused.step()
        opt_plain.step()
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)


def test_float16_file_loads_without_float32_copies(tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    components = {
        "proj": Component(up=torch.randn(10, 4, generator=generator), down=torch.randn(4, 12, generator=generator)),
        "conv": Component(
            up=torch.randn(6, 3, 1, 1, generator=generator), down=torch.randn(3, 5, 3, 3, generator=generator)
        ),
    }
    path = tmp_path / "half.safetensors"
    save_adapter(path, Adapter(components), dtype=torch.float16)
    loaded = load_adapter(path)
    for name, original in components.items():
        got = loaded.components[name]
        assert got.up.dtype == torch.float16 and got.down.dtype == torch.float16, name
        torch.testing.assert_close(got.delta(), original.delta(), rtol=5e-3, atol=5e-3)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.fc_out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the block ends in an adapted layer: the first thing its backward reaches is that component
        return self.fc_out(x + torch.tanh(self.fc(x)))


def sketch_after_one_step(checkpointing: bool) -> dict[str, torch.Tensor]:
    from comfyui_lora2.lora2 import attach
    from comfyui_lora2.lora2.checkpointing import checkpointed

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).requires_grad_(False)
    handle = attach(model, targets=r"fc", init_rank=2, max_rank=4)
    with torch.no_grad():
        for c in handle.components.values():
            c.up.normal_(0.0, 0.1)
    blocks = list(model) if checkpointing else []
    with checkpointed(blocks):
        model(torch.randn(5, 8)).pow(2).sum().backward()
    return {name: c.sketch.state_dict() for name, c in handle.components.items()}


def test_checkpointed_blocks_feed_the_sketch_exactly_once() -> None:
    """Recomputation saves what the first pass saved, and the sketch still takes one gradient per step."""
    plain, checkpointed_run = sketch_after_one_step(False), sketch_after_one_step(True)
    for name, state in plain.items():
        assert int(state["count"]) == 1 == int(checkpointed_run[name]["count"]), name
        for key, value in state.items():
            torch.testing.assert_close(checkpointed_run[name][key], value, msg=f"{name}.{key}")


def unfolded_rows(c: AdaptiveLoRA, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The convolution's ``G = δᵀx`` as rows, the way the sketch was fed before: ``im2col`` of the input."""
    padding = c.conv_kwargs["padding"]
    if c.padding_mode != "zeros":
        x, padding = torch.nn.functional.pad(x, c._reversed_padding, mode=c.padding_mode), 0
    patches = torch.nn.functional.unfold(
        x, c.kernel_size, dilation=c.conv_kwargs["dilation"], padding=padding, stride=c.conv_kwargs["stride"]
    )
    rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return rows, grad.flatten(2).transpose(1, 2).reshape(-1, c.out_features)


@pytest.mark.parametrize(
    "conv",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "padding": 1, "stride": 2},
        {"kernel_size": 3, "padding": 2, "dilation": 2},
        {"kernel_size": (3, 1), "padding": (1, 0), "stride": (2, 1)},
        {"kernel_size": 1},
        {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
        {"kernel_size": 3, "padding": 1, "padding_mode": "circular"},
    ],
)
def test_convolution_sketch_equals_the_unfolded_one(conv: dict) -> None:
    """``observe_conv`` (a convolution and its weight gradient) computes what ``im2col`` + matmuls did."""
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 5, **conv)
    kwargs = {"width": 2, "nu": 0.0, "alpha": 4.0, "adaptive": True, "dtype": torch.float32}
    made = [
        AdaptiveLoRA(layer, **kwargs, device=torch.device("cpu"), generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    up = torch.randn(5, 2)  # a span to project out, so that the projections are exercised too
    for c in made:
        c.sketch = GradientSketch(c.fan_in, c.out_features, 3, 0.9, torch.Generator().manual_seed(4))
        c.sketch.set_spans(c.down[: c.width].flatten(1), up)
    ours, reference = made
    for _ in range(3):
        x = torch.randn(2, 6, 9, 11)
        grad = torch.randn_like(layer(x))
        ours._observe(x, grad)
        reference.sketch.observe(*unfolded_rows(reference, x, grad))
    for key, value in reference.sketch.state_dict().items():
        mine = ours.sketch.state_dict()[key]
        scale = float(value.abs().max().clamp(min=1.0))
        torch.testing.assert_close(mine, value, atol=1e-5 * scale, rtol=1e-5, msg=key)


def fit_at_max_rank(observe_everything: bool, steps: int, monkeypatch) -> tuple[list, dict]:
    """Two components starting at ``max_rank``: ``to_q`` without need (it shrinks), ``to_v`` above it."""
    from comfyui_lora2.lora2 import LoRA2Config, attach
    from comfyui_lora2.lora2.attach import LoRA2Handle

    if observe_everything:  # the schedule before: every sketch fed every step

        def everything(self) -> None:
            for control in self._controls.values():
                control.component.observe_token = self.step_count

        monkeypatch.setattr(LoRA2Handle, "_schedule_observations", everything)
    torch.manual_seed(0)
    model = nn.ModuleDict({"to_q": nn.Linear(16, 16, bias=False), "to_v": nn.Linear(16, 16, bias=False)})
    model.requires_grad_(False)
    handle = attach(model, LoRA2Config(targets="attn", init_rank=4, max_rank=4))
    optimizer = torch.optim.Adam(handle.param_groups(3e-3))
    generator = torch.Generator().manual_seed(5)
    target = torch.randn(16, 16, generator=generator) * 0.3  # full rank: to_v needs more than 4
    history, counts = [], {"to_q": [], "to_v": []}
    for _ in range(steps):
        x = torch.randn(32, 16, generator=generator)
        with handle.disabled(), torch.no_grad():
            base_q, base_v = model["to_q"](x), model["to_v"](x)
        loss = (model["to_q"](x) - base_q).pow(2).mean() + (model["to_v"](x) - base_v - x @ target.T).pow(2).mean()
        (loss + handle.regularizer()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        handle.step(optimizer)
        history.append(handle.ranks())
        for name, c in handle.components.items():
            counts[name].append(c.sketch.count)
    return history, counts


def test_no_sketch_work_at_max_rank_and_the_same_widths(monkeypatch) -> None:
    """At ``max_rank`` nothing can grow, so the sketch is not fed; it is again once a shrink makes room."""
    history, counts = fit_at_max_rank(False, 120, monkeypatch)
    shrunk = next(i for i, ranks in enumerate(history) if ranks["to_q"] < 4)
    assert history[-1]["to_v"] == 4 and set(counts["to_v"]) == {0}  # never fed at its ceiling
    assert set(counts["to_q"][:shrunk]) == {0}
    assert counts["to_q"][-1] > 0  # fed again after the shrink
    with monkeypatch.context() as patch:
        always, always_counts = fit_at_max_rank(True, 120, patch)
    assert always_counts["to_v"][-1] > 0  # the old schedule did feed it
    assert always == history


def test_batched_fold_equals_folding_each_sketch_alone(monkeypatch) -> None:
    """``fold_pending`` stacks sketches of one shape into one update: spans of different widths (and
    none) are zero-padded, counts differ per member, and every number comes out as a lone fold's."""
    from comfyui_lora2.lora2 import growth

    def sketches() -> list[GradientSketch]:
        made = []
        for index, (n_in, n_out, span) in enumerate([(12, 10, 3), (12, 10, 1), (12, 10, 0), (8, 6, 2)]):
            sketch = GradientSketch(n_in, n_out, 3, 0.9, torch.Generator().manual_seed(index))
            if span:
                spans = torch.Generator().manual_seed(10 + index)
                sketch.set_spans(torch.randn(span, n_in, generator=spans), torch.randn(n_out, span, generator=spans))
            made.append(sketch)
        ahead = torch.Generator().manual_seed(4)
        made[1].observe(torch.randn(5, 12, generator=ahead), torch.randn(5, 10, generator=ahead))  # a count ahead
        made[1].flush()
        return made

    alone, batched = sketches(), sketches()
    folds: list[int] = []
    fold_group = growth._fold_group
    monkeypatch.setattr(growth, "_fold_group", lambda group: (folds.append(len(group)), fold_group(group)))
    data = torch.Generator().manual_seed(3)
    for _ in range(25):
        for a, b in zip(alone, batched, strict=True):
            x = torch.randn(7, a.v.shape[0], generator=data)
            delta = x @ torch.ones(a.v.shape[0], a.u.shape[0]) * 0.1 + torch.randn(7, a.u.shape[0], generator=data)
            a.observe(x, delta)
            a.flush()
            b.observe(x, delta)
        folds.clear()
        growth.fold_pending(batched)
        assert sorted(folds) == [1, 3]  # one update per shape, not one per sketch
    for a, b in zip(alone, batched, strict=True):
        assert a.count == b.count
        for name in ("u", "v", "a", "b", "b_energy", "s_mean", "s_sum", "s_square_sum", "peak"):
            # Round-off relative to the array's own scale: a sum over 25 steps of values ~ 100 differs
            # by ~3e-5 in an element near zero between the batched and the lone kernels on some CPUs
            # (AVX-512 EPYC); a real mistake in the stacking moves it by the values' own size.
            expected = getattr(a, name)
            scale = float(expected.abs().max()) + 1.0
            torch.testing.assert_close(getattr(b, name), expected, atol=1e-6 * scale, rtol=1e-5, msg=name)
        torch.testing.assert_close(b.z_scores(), a.z_scores(), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- LinearUpdate
def unfused_update(x, down, up, scale, width, _component=None):
    """The linear component's update as separate autograd ops (what ``LinearUpdate`` replaces), with
    ``AdaptiveLoRA.forward``'s casts of the factors to the input's dtype."""
    down, up = down[:width].to(x.dtype), up[:, :width].to(x.dtype)
    return torch.nn.functional.linear(torch.nn.functional.linear(x, down) * scale, up)


DTYPE_MODES = {
    "float32": (torch.float32, None),
    "autocast-bf16, float32 input": (torch.float32, torch.bfloat16),
    "autocast-bf16, bf16 input": (torch.bfloat16, torch.bfloat16),
    "bf16 input, float32 factors": (torch.bfloat16, None),
    "fp16 input under bf16 autocast": (torch.float16, torch.bfloat16),
}


@pytest.mark.parametrize("shape", [(1, 64, 40), (2, 7, 24), (3, 40), (2, 9, 3, 16)])
@pytest.mark.parametrize("capacity,width", [(8, 8), (8, 5), (16, 3), (3, 3), (12, 1)])
@pytest.mark.parametrize("strided_input", [False, True])
@pytest.mark.parametrize("mode", list(DTYPE_MODES))
def test_linear_update_matches_the_unfused_ops_to_the_bit(shape, capacity, width, strided_input, mode) -> None:
    """Output and all three gradients equal autograd's for the unfused ops, bit for bit, with and
    without autocast: the products, casts and layouts are the same, so a seeded run learns exactly what
    it learned before."""
    from comfyui_lora2.lora2.linear_update import LinearUpdate

    x_dtype, autocast = DTYPE_MODES[mode]
    gen = torch.Generator().manual_seed(capacity * 10 + width)
    x0 = torch.randn(*shape, generator=gen)
    if strided_input:  # a transposed view, as an attention output often is
        x0 = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2)
    x0 = x0.to(x_dtype)
    down0 = torch.randn(capacity, shape[-1], generator=gen) * 0.2
    up0 = torch.randn(11, capacity, generator=gen) * 0.2
    scale = (torch.rand(width, generator=gen) + 0.5).to(x_dtype)
    results = []
    for update in (unfused_update, LinearUpdate.apply):
        x, down, up = (t.clone().requires_grad_(True) for t in (x0, down0, up0))
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = update(x, down, up, scale, width, None)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
        out.backward(grad)
        results.append((out.detach(), x.grad, down.grad, up.grad))
    for name, ours, theirs in zip(("out", "x", "down", "up"), results[1], results[0], strict=True):
        assert ours.dtype == theirs.dtype, name
        assert torch.equal(ours, theirs), name


def saved_bytes(c: AdaptiveLoRA, x: torch.Tensor) -> int:
    """Bytes of the activations one forward saves for the backward (parameters and ``p`` excluded)."""
    with saved_storages([c.down, c.up, c.scale(x.dtype)]) as storages:
        c(x)
    return sum(storages.values())


def test_a_linear_component_saves_only_its_input(monkeypatch) -> None:
    """The hidden activation (tokens × width) is recomputed in the backward, not kept from the forward."""
    c = component()
    c.nu.requires_grad_(False)  # as under evidence rank control: p is fixed between decisions
    x = torch.randn(2, 50, 12, requires_grad=True)
    assert saved_bytes(c, x) == x.numel() * x.element_size()
    monkeypatch.setattr(AdaptiveLoRA, "_fused_linear", lambda self, x, scale: False)
    hidden = 2 * 50 * c.width * 4
    assert saved_bytes(c, x) == x.numel() * x.element_size() + hidden  # what the unfused ops kept


class Attention(nn.Module):
    """q, k and v from one input, as in a transformer block: three adapters share ``x``'s gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        weights = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
        return self.to_out(weights @ v) + x


def trained_attention(fused: bool, monkeypatch) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    from comfyui_lora2.lora2 import attach

    if not fused:
        monkeypatch.setattr(AdaptiveLoRA, "_fused_linear", lambda self, x, scale: False)
    torch.manual_seed(0)
    model = nn.Sequential(Attention(), Attention()).requires_grad_(False)
    handle = attach(model, targets=r"to_", init_rank=2, max_rank=6, decide_every=4, growth_z=2.0, growth_alignment=0.5)
    optimizer = make_optimizer("adamw", handle.param_groups(lr=3e-2))
    data = torch.Generator().manual_seed(1)
    for _ in range(40):
        x = torch.randn(2, 9, 16, generator=data, requires_grad=True)
        (model(x) - x.flip(-1)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        handle.step(optimizer)
    monkeypatch.undo()
    factors = {}
    for name, c in handle.components.items():
        factors[f"{name}.down"], factors[f"{name}.up"] = c.down.detach().clone(), c.up.detach().clone()
    return factors, handle.ranks()


def test_training_with_linear_update_is_the_unfused_training_to_the_bit(monkeypatch) -> None:
    """Forty steps with rank decisions and the gradient sketch: same widths, same factors, bit for bit
    (the order in which autograd sums ``x``'s gradients from q, k, v and their adapters is unchanged)."""
    fused_factors, fused_ranks = trained_attention(True, monkeypatch)
    plain_factors, plain_ranks = trained_attention(False, monkeypatch)
    assert fused_ranks == plain_ranks
    assert fused_factors.keys() == plain_factors.keys()
    for name, value in fused_factors.items():
        assert torch.equal(value, plain_factors[name]), name


def test_a_linear_component_under_autocast_saves_the_cast_input_only() -> None:
    """Under bfloat16 autocast the saved input is the bfloat16 cast autocast's own linear would save
    (half of float32 ``x``), and no hidden activation; the unfused ops kept the cast hidden activation too."""
    c = component()
    c.nu.requires_grad_(False)
    x = torch.randn(4, 30, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = c(x)
        assert saved_bytes(c, x) == x.numel() * 2
    assert out.dtype == torch.bfloat16
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "LinearUpdateBackward"


def test_a_linear_component_on_the_meta_device_keeps_the_unfused_ops() -> None:
    """Shape-only passes on ``meta`` tensors still work (autocast has no ``meta`` device to switch off)."""
    c = component().to("meta")
    c.nu.requires_grad_(False)
    out = c(torch.empty(3, 12, device="meta", requires_grad=True))
    assert out.shape == (3, 10) and out.device.type == "meta"
    assert type(out.grad_fn).__name__ != "LinearUpdateBackward"
