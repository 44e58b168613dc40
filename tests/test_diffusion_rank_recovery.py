"""bench/diffusion_rank_recovery.py: the planted teacher, the scores, ``--set``, and short runs per model.

Learned-rank quality is not asserted here: the rank mechanism is being rebuilt, and judging it is
what the benchmark itself is for.
"""

from __future__ import annotations

import json

import pytest
import torch

from comfyui_lora2.bench import diffusion_rank_recovery as bench
from comfyui_lora2.bench.image_data import batch_stream, encode, load_images, synthetic_images
from comfyui_lora2.bench.settings import parse_settings, train_config
from comfyui_lora2.bench.tiny_diffusion import MODELS, build_model, family
from comfyui_lora2.lora2 import attach
from comfyui_lora2.lora2.errors import LoRA2Error
from comfyui_lora2.lora2.train import TrainConfig, Trainer

JSON_KEYS = {"spearman", "growth_ratio_min", "zero_rank_max", "fit_vs_r64", "params_vs_r64", "ranks", "planted"}


@pytest.fixture(scope="module")
def sd15() -> torch.nn.Module:
    return build_model("sd15", 0)


def test_the_teacher_has_the_planted_ranks_and_differs_from_the_base_only_there(sd15) -> None:
    layers = bench.target_layers(sd15)
    planted = bench.draw_planted(layers, seed=3)
    teacher, deltas = bench.make_teacher(sd15, planted, seed=3)
    base_state, teacher_state = sd15.state_dict(), teacher.state_dict()
    changed = {f"{name}.weight" for name, rank in planted.items() if rank > 0}
    for key, value in base_state.items():
        if key in changed:
            difference = (teacher_state[key] - value).double()
            rank = planted[key.removesuffix(".weight")]
            assert int(torch.linalg.matrix_rank(difference, rtol=1e-6)) == rank, key
            torch.testing.assert_close(difference.float(), deltas[key.removesuffix(".weight")])
        else:
            assert torch.equal(teacher_state[key], value), key


def test_the_seeded_draw_covers_both_ends_respects_the_caps_and_repeats(sd15) -> None:
    layers = bench.target_layers(sd15)
    planted = bench.draw_planted(layers, seed=0)
    assert set(planted) == set(layers)
    assert sum(r >= 8 for r in planted.values()) >= bench.MIN_EACH_END
    assert sum(r <= 1 for r in planted.values()) >= bench.MIN_EACH_END
    assert all(rank <= bench.rank_cap(layers[name]) for name, rank in planted.items())
    assert bench.draw_planted(layers, seed=0) == planted
    assert bench.draw_planted(layers, seed=1) != planted


@pytest.mark.parametrize("strength", [1.0, 0.3])
def test_planted_spectra_scale_with_the_base_weight(sd15, strength: float) -> None:
    layer = next(iter(bench.target_layers(sd15).values()))
    delta = bench.planted_delta(layer.weight, 4, torch.Generator().manual_seed(0), strength)
    singular = torch.linalg.svdvals(delta)
    norm = torch.linalg.matrix_norm(layer.weight, ord=2) * strength
    assert torch.all(singular[:4] >= 0.5 * norm - 1e-5) and torch.all(singular[:4] <= norm + 1e-5)
    assert torch.all(singular[4:] < 1e-5)


def test_visible_planting_lies_where_the_data_and_the_output_can_see_it(sd15) -> None:
    """V inside the leading input directions, U inside the leading output-sensitivity ones, so the
    update moves the layer's real inputs more than a randomly placed one of the same spectrum."""
    fam = family("sd15")
    data = load_images(fam, 0)
    layers = bench.target_layers(sd15)
    names = list(layers)[:6]
    visible = bench.visible_directions(fam, sd15, data, names, seed=0)
    evaluation_inputs = bench.build_eval_set(fam, sd15, sd15, data, seed=0).layer_inputs
    gains = []
    for name in names:
        seen, rank = visible[name], 4
        weight = layers[name].weight
        assert seen.inputs.shape == (weight.shape[1], weight.shape[1])
        assert seen.outputs.shape == (weight.shape[0], weight.shape[0])
        delta = bench.planted_delta(weight, rank, torch.Generator().manual_seed(1), 0.3, seen)
        assert int(torch.linalg.matrix_rank(delta.double(), rtol=1e-6)) == rank
        u, _, vh = torch.linalg.svd(delta)
        lead_in, lead_out = seen.inputs[:, : 2 * rank], seen.outputs[:, : 2 * rank]
        torch.testing.assert_close(lead_in @ (lead_in.T @ vh[:rank].T), vh[:rank].T, atol=1e-4, rtol=0)
        torch.testing.assert_close(lead_out @ (lead_out.T @ u[:, :rank]), u[:, :rank], atol=1e-4, rtol=0)
        anywhere = bench.planted_delta(weight, rank, torch.Generator().manual_seed(1), 0.3)
        h = evaluation_inputs[name]
        gains.append(float((h @ delta.T).norm() / (h @ anywhere.T).norm()))
    assert min(gains) > 1.0, gains


def _synthetic_visible(side: int, scales: list[float], seed: int = 0) -> bench.Visible:
    """Random orthonormal input and output directions with the given input eigenvalues (then ~0)."""
    generator = torch.Generator().manual_seed(seed)
    inputs, _ = torch.linalg.qr(torch.randn(side, side, generator=generator))
    outputs, _ = torch.linalg.qr(torch.randn(side, side, generator=generator))
    scale = torch.tensor(scales + [1e-6] * (side - len(scales)))
    return bench.Visible(inputs, outputs, scale, torch.ones(side))


def test_the_visible_input_rank_counts_directions_above_the_floor() -> None:
    visible = _synthetic_visible(16, [1.0, 0.5, 0.06, 0.02, 0.011, 0.009])
    assert visible.floor == bench.VISIBLE_FLOOR == 0.05  # the benchmark's documented default
    assert visible.input_rank() == 3
    assert visible.input_rank(floor=1e-2) == 5
    visible.floor = 1e-2  # what --visible-floor sets
    assert visible.input_rank() == 5
    assert bench.Visible(visible.inputs, visible.outputs).input_rank() == 16  # no spectrum: every direction


def test_plants_are_cut_to_the_visible_input_rank_and_drawn_inside_it() -> None:
    """A rank-5 plant on a layer whose data excites only 6 input directions: V lies inside those 6 (not the
    leading 2·5 = 10), and a rank-8 plant there is cut to 6 and reported."""
    side = 16
    visible = _synthetic_visible(side, [1.0, 0.8, 0.6, 0.4, 0.2, 0.1])
    assert visible.input_rank() == 6
    planted, cut = bench.cap_to_visible({"narrow": 8, "small": 5, "none": 0}, {"narrow": visible, "small": visible})
    assert planted == {"narrow": 6, "small": 5, "none": 0} and cut == {"narrow": 8}
    weight = torch.randn(side, side, generator=torch.Generator().manual_seed(1))
    for whiten in (False, True):
        delta = bench.planted_delta(weight, 5, torch.Generator().manual_seed(2), 0.3, visible, whiten=whiten)
        assert int(torch.linalg.matrix_rank(delta.double(), rtol=1e-6)) == 5
        seen = visible.inputs[:, :6]
        rows = delta @ (seen @ seen.T)  # ΔW restricted to the visible inputs: all of it
        torch.testing.assert_close(rows, delta, atol=1e-5 * float(delta.abs().max()), rtol=0)


def test_explicit_planted_ranks_and_their_errors(sd15) -> None:
    layers = bench.target_layers(sd15)
    first, second = list(layers)[:2]
    planted = bench.parse_planted(f"{first}=8, {second}=2", layers)
    assert planted[first] == 8 and planted[second] == 2
    assert sum(planted.values()) == 10 and len(planted) == len(layers)
    with pytest.raises(LoRA2Error, match="--planted"):
        bench.parse_planted("no.such.layer=3", layers)
    with pytest.raises(LoRA2Error, match=r"--planted.*integer"):
        bench.parse_planted(f"{first}=many", layers)
    with pytest.raises(LoRA2Error, match=r"--planted.*between 0 and 32"):
        bench.parse_planted(f"{first}=33", layers)


def test_scores_on_a_hand_made_case() -> None:
    planted = {"a": 0, "b": 1, "c": 8, "d": 16, "e": 32, "f": 4}
    ranks = {"a": 2, "b": 3, "c": 10, "d": 12, "e": 40, "f": 4}
    assert bench.growth_ratio_min(planted, ranks) == pytest.approx(12 / 16)
    assert bench.zero_rank_max(planted, ranks) == 3
    assert bench.rank_spearman(planted, ranks) == pytest.approx(1.0)
    assert bench.growth_ratio_min({"a": 4}, {"a": 4}) is None and bench.zero_rank_max({"a": 4}, {"a": 4}) is None
    summary = bench.scores(planted, ranks, fit=0.2, fit_r64=0.1, params=25, params_r64=100)
    assert summary["fit_vs_r64"] == pytest.approx(2.0) and summary["params_vs_r64"] == pytest.approx(0.25)
    assert set(summary) == JSON_KEYS
    assert bench.rank_spearman({"a": 0, "b": 8}, {"a": 4, "b": 2}) == pytest.approx(-1.0)


def test_set_reaches_both_configs() -> None:
    overrides = parse_settings(["lora2.prior_strength=0.123", "lora2.adaptive=true", "train.optimizer=sgd"])
    methods = bench.methods_for("attn", seed=5, overrides=overrides, fixed=(4,))
    lora2, r64, r4 = (m.config for m in methods)
    assert lora2.prior_strength == 0.123 and lora2.seed == 5 and lora2.targets == "attn"
    assert r64.prior_strength != 0.123 and not r64.adaptive and r64.init_rank == r64.max_rank == 64
    assert r4.init_rank == 4 and [m.name for m in methods] == ["lora2", "lora_r64", "lora_r4"]
    config = train_config(overrides.train, steps=7)
    assert config.optimizer == "sgd" and config.steps == 7 and config.lr == TrainConfig().lr


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("lora2.no_such_field=1", "no field 'no_such_field'"),
        ("prior_strength=1", "lora2.FIELD=VALUE"),
        ("train.steps=5", "--steps"),
        ("lora2.init_rank=0", "init_rank"),
    ],
)
def test_bad_set_items_name_the_flag(item: str, message: str) -> None:
    with pytest.raises(LoRA2Error, match=message):
        overrides = parse_settings([item])
        bench.methods_for("attn", 0, overrides, ())


def test_bad_cli_input_is_an_argparse_error(capsys) -> None:
    for argv in (["--set", "lora2.bogus=1"], ["--fixed", "4,x"], ["--steps", "0"], ["--model", "sd3"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
    assert "--set" in capsys.readouterr().err


def test_the_residual_loss_is_the_student_teacher_gap(sd15) -> None:
    """Through the ordinary Trainer, the loss is ‖student − teacher‖² (the student starts at the base)."""
    fam = family("sd15")
    layers = bench.target_layers(sd15)
    teacher, _ = bench.make_teacher(sd15, bench.draw_planted(layers, 0), 0)
    student = build_model("sd15", 0)
    handle = attach(student, bench.methods_for("attn", 0, parse_settings([]), ())[0].config)
    images = load_images(fam, 0)
    batch = next(batch_stream(images, fam, 2, 0))
    rule = bench.ZeroTarget(fam.rule())
    denoiser = bench.residual_denoiser(fam.denoiser(student), fam.denoiser(teacher))
    trainer = Trainer(denoiser, rule, iter([batch]), handle, train_config(steps=1, dtype="float32"))
    generator = torch.Generator().manual_seed(0)
    loss = trainer._loss(batch, generator)
    generator = torch.Generator().manual_seed(0)  # the same draws as Trainer._loss: noise, then levels
    noise = torch.randn(batch.latents.shape, generator=generator)
    prepared = fam.rule().prepare(batch.latents, noise, generator)
    with torch.no_grad():
        gap = fam.denoiser(sd15)(prepared.model_input, prepared.timestep, batch.conditioning)
        gap = gap - fam.denoiser(teacher)(prepared.model_input, prepared.timestep, batch.conditioning)
    assert float(loss.detach()) == pytest.approx(float(gap.pow(2).mean()), rel=1e-5)
    assert float(loss.detach()) > 0


def test_the_latent_encoder_is_deterministic_with_unit_scale() -> None:
    images = synthetic_images(6, seed=0)
    for name in MODELS:
        fam = family(name)
        latents = encode(images, fam)
        assert latents.shape == (6, *fam.latent_shape())
        assert torch.equal(latents, encode(images, fam))
        assert latents.std().item() == pytest.approx(1.0, rel=1e-4)


def test_synthetic_images_stand_in_without_the_photos(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LORA2_DREAMBOOTH_DIR", str(tmp_path / "absent"))
    images = load_images(family("sd15"), seed=0)
    assert images.source == "synthetic" and len(images.subjects) == len(images.latents) > 0


@pytest.mark.slow
@pytest.mark.parametrize(("model", "data"), [("sd15", "targets"), ("sdxl", "samples"), ("flux", "targets")])
def test_a_three_step_run_prints_the_json_line(model: str, data: str, capsys) -> None:
    argv = ["--model", model, "--data", data, "--steps", "3", "--set", "lora2.prior_strength=0.125"]
    results = bench.main([*argv, "--visible-floor", "0.5"])
    captured = capsys.readouterr()
    last = captured.out.strip().splitlines()[-1]
    line = json.loads(last)
    assert JSON_KEYS <= set(line)
    assert set(line["ranks"]) == set(line["planted"]) == set(bench.target_layers(build_model(model, 0)))
    assert line["settings"]["lora2"] == {"prior_strength": 0.125}
    assert results["methods"]["lora_r64"]["params"] > 0 and line["steps"] == 3
    assert all(value >= 0 for value in (line["fit_vs_r64"], line["params_vs_r64"]))
    # a floor of half the strongest eigenvalue leaves few visible directions: the wide plants are cut, and said
    assert line["visible_floor"] == 0.5 and line["planted_cut"]
    assert all(line["planted"][name] < asked for name, asked in line["planted_cut"].items())
    assert "visible input directions" in captured.err
