"""Issue 10: damaged LoRA files are clear LoRA2Errors naming file and key; writes lose and mix up nothing."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import save_file

from comfyui_lora2.lora2 import LoRA2Error
from comfyui_lora2.lora2.adapter import Adapter, Component, ResumeState
from comfyui_lora2.lora2.lora_file import load_adapter, save_adapter, state_path, write_safetensors_atomic
from comfyui_lora2.lora2.paths import TEMP_PREFIX, remove_orphan_temporaries
from comfyui_lora2.lora2.resume_check import check_resume_optimizer


def _pair(**extra) -> dict[str, torch.Tensor]:
    tensors = {
        "k.lora_up.weight": torch.randn(6, 2),
        "k.lora_down.weight": torch.randn(2, 5),
        "k.alpha": torch.tensor(2.0),
    }
    tensors.update(extra)
    return tensors


def _write(tmp_path, tensors, metadata=None):
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("tensors", "metadata", "message"),
    [
        (_pair(**{"k.alpha": torch.ones(2)}), None, r"'k\.alpha' must hold one number"),
        (_pair(), {"lora2": "{not json"}, r"'lora2' metadata is not valid JSON"),
        (_pair(), {"lora2": json.dumps({"modules": ["k"]})}, r"field 'modules' must map"),
        (_pair(), {"lora2": json.dumps({"nu": {"k": "x"}})}, r"field 'nu' must map"),
        (_pair(), {"lora2": json.dumps({"history": {"loss": "x"}})}, r"'loss' must be a list"),
        (_pair(), {"lora2": json.dumps([1])}, r"must be a JSON object"),
        (_pair(**{"k.lora_up.weight": torch.full((6, 2), float("nan"))}), None, r"'k\.lora_up\.weight' holds NaN"),
        (_pair(**{"k.lora_up.weight": torch.zeros(6, 0), "k.lora_down.weight": torch.zeros(0, 5)}), None, "rank 0"),
        (_pair(**{"k.lora_up.weight": torch.zeros(6)}), None, r"'k\.lora_up\.weight' \(6,\).*2-D"),
        (_pair(**{"k.lora_up.weight": torch.zeros(6, 2, dtype=torch.int32)}), None, "floating point"),
    ],
)
def test_damaged_files_raise_lora2error_naming_file_and_key(tmp_path, tensors, metadata, message) -> None:
    path = _write(tmp_path, tensors, metadata)
    with pytest.raises(LoRA2Error, match=message) as error:
        load_adapter(path)
    assert "x.safetensors" in str(error.value)


def test_bad_ss_field_is_warned_and_ignored(tmp_path, caplog) -> None:
    path = _write(tmp_path, _pair(), {"ss_steps": "many", "ss_base_model_version": "SD15"})
    with caplog.at_level("WARNING"):
        adapter = load_adapter(path)
    assert adapter.steps == 0 and adapter.base_model == "SD15" and "ss_steps" in caplog.text


def _adapter(resume: bool = True, seed: int = 0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    state = ResumeState({"w": torch.zeros(1)}, None, torch.Generator().get_state(), {"train": {"optimizer": "adamw"}})
    component = Component(torch.randn(4, 2, generator=g), torch.randn(2, 3, generator=g))
    return Adapter({"m.a": component}, resume=state if resume else None)


def test_resave_without_state_removes_the_stale_state(tmp_path) -> None:
    path = tmp_path / "run.safetensors"
    save_adapter(path, _adapter(resume=True))
    assert load_adapter(path).resume is not None
    save_adapter(path, _adapter(resume=False, seed=1))
    assert not state_path(path).exists() and load_adapter(path).resume is None


def test_a_state_from_another_write_is_not_attached(tmp_path, caplog) -> None:
    path = tmp_path / "run.safetensors"
    save_adapter(path, _adapter(resume=True))
    kept = state_path(path).read_bytes()
    save_adapter(path, _adapter(resume=True, seed=1))
    state_path(path).write_bytes(kept)  # as if a crash left the old state beside the new file
    with caplog.at_level("WARNING"):
        assert load_adapter(path).resume is None
    assert "not written with" in caplog.text


def test_written_files_follow_the_umask_and_long_names_fit(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / ("n" * 240 + ".safetensors")  # 252 bytes: the temporary name must not add to it
        write_safetensors_atomic(path, {"t": torch.zeros(2)}, {})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    with pytest.raises(LoRA2Error, match="file systems allow 255"):
        write_safetensors_atomic(tmp_path / ("n" * 250 + ".safetensors"), {"t": torch.zeros(2)}, {})
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_orphan_temporaries_are_removed_live_ones_kept(tmp_path) -> None:
    dead = tmp_path / "sub" / f"{TEMP_PREFIX}999999999-{'0' * 16}.tmp"
    legacy = tmp_path / ".old.safetensors.abcd1234.tmp"
    live = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-{'1' * 16}.tmp"
    fresh = tmp_path / f"{TEMP_PREFIX}999999999-{'2' * 16}.tmp"
    other = tmp_path / "mine.tmp"
    dead.parent.mkdir()
    for path in (dead, legacy, live, fresh, other):
        path.write_bytes(b"x" * 100)
    old = time.time() - 3600
    for path in (dead, legacy, live, other):
        os.utime(path, (old, old))
    removed = remove_orphan_temporaries([tmp_path])
    assert sorted(removed) == sorted([dead, legacy])
    assert live.exists() and fresh.exists() and other.exists()


def test_resuming_with_another_optimizer_is_a_clear_error() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    adamw = torch.optim.AdamW(params)
    params[0].grad = torch.ones(3)
    adamw.step()
    state = ResumeState({}, adamw.state_dict(), torch.Generator().get_state(), {"train": {"optimizer": "adamw"}})
    with pytest.raises(LoRA2Error, match=r"trained with optimizer 'adamw'.*Set optimizer to 'adamw'"):
        check_resume_optimizer(state, "sgd", "run.lora2state")
    check_resume_optimizer(state, "adamw", "run.lora2state")
    legacy = ResumeState({}, adamw.state_dict(), torch.Generator().get_state(), {})  # no recorded name
    with pytest.raises(LoRA2Error, match="without 'momentum'"):
        check_resume_optimizer(legacy, "sgd", "run.lora2state")
    # what the check prevents: torch's own error at the first step
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sgd.load_state_dict(adamw.state_dict())
    with pytest.raises(KeyError, match="momentum"):
        sgd.step()
