"""lora2-train's flags, config file and sweep plan (cli/flags.py, cli/sweep_plan.py); no model, no ComfyUI.

* Every field of every config dataclass is a flag, and with no flags each dataclass keeps its defaults.
* Precedence: dataclass default < ``--config`` TOML < command-line flag; bad keys and values are named.
* The sweep's job list is fixed and its static split gives every job to exactly one process.
* The CLI never imports ComfyUI (it runs on machines without it) and its entry point resolves.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from comfyui_lora2.cli import main
from comfyui_lora2.cli.flags import GROUPS, RENAMES
from comfyui_lora2.cli.options import RunOptions
from comfyui_lora2.cli.sweep import SweepConfig
from comfyui_lora2.cli.sweep import parse as parse_sweep
from comfyui_lora2.cli.sweep_plan import Subject, method_config, parse_subject, plan, shard
from comfyui_lora2.cli.train_main import parse
from comfyui_lora2.devtools.import_rules import host_imports
from comfyui_lora2.lora2 import LoRA2Config, LoRA2Error
from comfyui_lora2.lora2.dataset_spec import DatasetSpec
from comfyui_lora2.lora2.train import TrainConfig
from comfyui_lora2.lora2.validation import ValidationConfig

REQUIRED = ["--model", "m", "--data", "d", "--output", "o"]
CONFIG_CLASSES = (RunOptions, TrainConfig, LoRA2Config, DatasetSpec, ValidationConfig)


def option_strings() -> set[str]:
    from comfyui_lora2.cli.flags import add_config_flags
    from comfyui_lora2.cli.train_main import parser

    cli = parser()
    add_config_flags(cli)
    return {option for action in cli._actions for option in action.option_strings}


def test_every_config_field_is_a_flag() -> None:
    options = option_strings()
    skipped = {(group.cls, name) for group in GROUPS for name in group.skip}
    assert {group.cls for group in GROUPS} == set(CONFIG_CLASSES)
    # the only fields without a flag: the one --seed sets both seeds; ComfyUI's sampler names and output folder
    assert skipped == {(LoRA2Config, "seed"), *((ValidationConfig, n) for n in ("sampler", "scheduler", "run_name"))}
    for cls in CONFIG_CLASSES:
        prefix = "validate_" if cls is ValidationConfig else ""
        for f in dataclasses.fields(cls):
            if (cls, f.name) in skipped:
                continue
            dest = RENAMES.get((cls, f.name), prefix + f.name)
            assert "--" + dest.replace("_", "-") in options, f"{cls.__name__}.{f.name} has no flag"


def test_no_flags_keep_every_dataclass_default() -> None:
    configs = parse(REQUIRED)
    assert configs.train == TrainConfig()
    assert configs.lora2 == LoRA2Config()
    assert configs.dataset == DatasetSpec()
    assert configs.validation == ValidationConfig()
    assert dataclasses.replace(configs.options, model="", data="", output="") == RunOptions()


def config_file(tmp_path: Path, text: str, name: str = "run.toml") -> str:
    """``text`` written to ``tmp_path/name`` as UTF-8; its path, for ``--config``."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_toml_sits_between_defaults_and_flags(tmp_path: Path) -> None:
    config = config_file(
        tmp_path,
        'model = "from-toml"\ndata = "d"\noutput = "o"\nsteps = 7\ninit_rank = 8\nlr = 1\nflip = true\n'
        'validate_prompts = ["a, b", "c"]\nmodule_types = ["linear"]\nadapter_dtype = "bfloat16"\nseed = 3\n',
    )
    configs = parse(["--config", config, "--steps", "9", "--no-flip", "--augment-seed", "5"])
    assert configs.options.model == "from-toml"
    assert (configs.train.steps, configs.lora2.init_rank, configs.train.lr) == (9, 8, 1.0)
    assert configs.dataset.flip is False and configs.dataset.seed == 5
    assert configs.options.validate_prompts == ("a, b", "c")
    assert configs.lora2.module_types == ("linear",) and configs.lora2.dtype == "bfloat16"
    assert configs.train.seed == configs.lora2.seed == 3  # one seed, as the node's widget
    assert configs.train.dtype == TrainConfig().dtype  # --adapter-dtype is not the compute dtype


@pytest.mark.parametrize(
    ("text", "named"),
    [("stepz = 3\n", "stepz"), ('steps = "3"\n', "steps"), ("lr = true\n", "lr"), ("steps = [\n", "not valid TOML")],
)
def test_bad_config_files_are_named(tmp_path: Path, text: str, named: str) -> None:
    config = config_file(tmp_path, text)
    with pytest.raises(LoRA2Error, match=named):
        parse(["--config", config, *REQUIRED])


def test_bad_values_are_a_lora2error_and_exit_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(LoRA2Error, match="init_rank"):
        parse([*REQUIRED, "--init-rank", "0"])
    assert main(["--steps", "5"]) == 2  # no --model
    assert "--model is required" in capsys.readouterr().err


def test_methods_are_lora2_and_fixed_ranks_on_one_code_path() -> None:
    base = LoRA2Config(max_rank=64)
    assert method_config("lora2", base).adaptive
    fixed = method_config("r128", base)
    assert (fixed.adaptive, fixed.init_rank, fixed.max_rank) == (False, 128, 128)
    assert method_config("r4", base).max_rank == 64
    with pytest.raises(LoRA2Error, match="rN"):
        method_config("rank4", base)


def test_static_split_gives_every_job_to_exactly_one_process() -> None:
    subjects = [Subject("a", Path("a")), Subject("b", Path("b"))]
    jobs = plan(subjects, ["lora2", "r4", "r16", "r64", "r128"], [0, 1])
    assert len({job.name for job in jobs}) == len(jobs) == 20
    assert [job.index for job in jobs] == list(range(20))
    for processes in (1, 2, 3, 7):
        shares = [shard(jobs, i, processes) for i in range(processes)]
        taken = [job.index for share in shares for job in share]
        assert sorted(taken) == list(range(20))
        assert all(job.index % processes == i for i, share in enumerate(shares) for job in share)


def test_sweep_subjects_from_flags_and_toml_tables(tmp_path: Path) -> None:
    config = config_file(
        tmp_path,
        'model = "m"\noutput = "o"\nmethods = ["lora2", "r16"]\nseeds = [0, 1]\n'
        '[[subjects]]\nname = "cat"\ndata = "cats"\ntrigger = "zwx cat"\n',
        "sweep.toml",
    )
    base, sweep, subjects, validate = parse_sweep(["--config", config, "--subjects", "dog=dogs"])
    assert [s.name for s in subjects] == ["dog", "cat"] and subjects[1].trigger == "zwx cat"
    assert sweep == SweepConfig(subjects=("dog=dogs",), methods=("lora2", "r16"), seeds=(0, 1))
    assert validate is False and base.options.validate is False  # sweeps opt in to validation grids
    with pytest.raises(LoRA2Error, match="NAME=FOLDER"):
        parse_subject("dogs")
    with pytest.raises(LoRA2Error, match="differ"):
        plan([Subject("a", Path("x")), Subject("a", Path("y"))], ["lora2"], [0])


def test_cli_never_imports_comfyui() -> None:
    import comfyui_lora2.cli as cli

    for path in Path(cli.__file__).parent.glob("*.py"):
        assert not host_imports(path), f"{path.name} imports {host_imports(path)}"
    code = (
        "import sys, runpy; sys.argv = ['lora2-train', '--help'];"
        "import comfyui_lora2.cli.train_command, comfyui_lora2.cli.sweep, comfyui_lora2.cli.models;"
        "assert not any(m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths') for m in sys.modules), sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    result = subprocess.run(
        [sys.executable, "-m", "comfyui_lora2.cli", "sweep", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--methods" in result.stdout


def test_entry_point_is_the_cli_main() -> None:
    import importlib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    module, _, attribute = pyproject["project"]["scripts"]["lora2-train"].partition(":")
    assert getattr(importlib.import_module(module), attribute) is main
    assert "comfyui_lora2.cli" in pyproject["tool"]["setuptools"]["packages"]
