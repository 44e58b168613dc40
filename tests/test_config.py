"""lora2/config.py: validation with messages that name the field, and the JSON round trip."""

from __future__ import annotations

import pytest

from comfyui_lora2.lora2 import LoRA2Config, LoRA2Error


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mass": 1.0}, "importance mass"),
        ({"init_rank": 0}, "init_rank must be at least 1"),
        ({"init_rank": 80, "max_rank": 64}, "larger than max_rank"),
        ({"init_rank": 1}, "smallest adaptive width"),
        ({"margin": -1}, "margin"),
        ({"resize_every": 0}, "resize_every"),
        ({"prior_std": 0.0}, "prior_std must be positive"),
        ({"prior_strength": -1.0}, "prior_strength"),
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"module_types": ("linear", "conv3d")}, "conv3d"),
    ],
)
def test_invalid_settings_are_refused_by_name(fields: dict, message: str) -> None:
    with pytest.raises(LoRA2Error, match=message):
        LoRA2Config(**fields)


def test_fixed_rank_may_start_at_one() -> None:
    assert LoRA2Config(init_rank=1, adaptive=False).init_rank == 1


def test_json_round_trip_and_unknown_fields() -> None:
    config = LoRA2Config(targets="attn+ff", init_rank=8, max_rank=32, exclude="time", module_types=["linear"])
    assert LoRA2Config.from_dict(config.to_dict()) == config
    assert '"init_rank": 8' in config.to_json()
    with pytest.raises(LoRA2Error, match="unknown LoRA² config fields \\['rank'\\]"):
        LoRA2Config.from_dict({"rank": 4})
