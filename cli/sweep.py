"""``lora2-train sweep``: subjects × methods × seeds as a queue, one process per device under ``accelerate``.

Run it plainly (one process on one device) or as ``accelerate launch [--num_processes N] -m
comfyui_lora2.cli sweep ...``: each process loads the model once onto its own device
(``accelerate.PartialState``), takes its share of the job list (:func:`sweep_plan.shard`), trains each
unfinished job through the same run as ``lora2-train`` (:func:`cli.train_command.train`), evaluates it
when evaluation models are present, and publishes it atomically. There is no barrier between the
processes (a long job on one GPU would time the others out): every process rewrites the table from
what is finished when its own share is done, so the last one to finish writes the full table.

Output folder::

    jobs/<subject>__<method>__seed<k>/   one finished job (the lora2-train output folder, plus eval in run.json)
    jobs/.partial/                        jobs being trained (a killed job's folder is cleared on restart)
    jobs.log                              start / done / failed lines of every process
    summary.md, summary.json              the table (per subject and method, means over seeds)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..lora2.errors import LoRA2Error
from . import sweep_plan, sweep_table
from .flags import GROUPS, Configs, Group, add_config_flags, build_configs, dataclass_kwargs, merge, read_toml
from .sweep_plan import DEFAULT_METHODS, Job, Subject

log = logging.getLogger("LoRA²")


@dataclass
class SweepConfig:
    """What the sweep varies, and how finished adapters are evaluated."""

    subjects: tuple[str, ...] = ()
    """Subjects as NAME=FOLDER (in --config also [[subjects]] tables with name, data, trigger, caption_template)."""
    methods: tuple[str, ...] = DEFAULT_METHODS
    """lora2 and/or rN (fixed-rank LoRA at rank N through the same code path)."""
    seeds: tuple[int, ...] = (0,)
    """Training seeds; every subject and method is trained once per seed."""
    eval_models: str = "models/lora2_eval"
    """Folder with dino-vits16/ and clip-vit-b32/ (Hugging Face format); absent: no DINO / CLIP columns."""
    eval_images: int = 4
    """Images generated per evaluation prompt."""
    eval_prompts: tuple[str, ...] = ()
    """Evaluation prompts ({trigger} is replaced); default: the subject's caption template."""
    eval_steps: int = 25
    eval_size: int = 512
    eval_cfg: float = 5.0
    eval_seed: int = 0


SWEEP_GROUPS: tuple[Group, ...] = (*GROUPS, Group("sweep", SweepConfig))


def parse(argv: Sequence[str]) -> tuple[Configs, SweepConfig, list[Subject], bool]:
    """Command line (and --config) -> base configs, sweep settings, subjects, and whether --validate was set."""
    cli = argparse.ArgumentParser(prog="lora2-train sweep", description=__doc__.split("\n\n")[0])
    cli.add_argument("--config", type=Path, help="TOML file of flag values and [[subjects]] (flags given here win)")
    flags = add_config_flags(cli, SWEEP_GROUPS)
    args = cli.parse_args(list(argv), namespace=argparse.Namespace())
    config = vars(args).pop("config", None)
    toml_values = read_toml(config) if config is not None else {}
    tables = (
        toml_values.pop("subjects", None)
        if isinstance(toml_values.get("subjects"), list) and all(isinstance(t, dict) for t in toml_values["subjects"])
        else None
    )
    values = merge(args, toml_values, flags, f"config file '{config}'")
    sweep = SweepConfig(**dataclass_kwargs(values, flags).get(SweepConfig, {}))
    values = {"data": "-", **values}  # each job sets its subject's folder
    if "validate" not in values:
        values["validate"] = False  # validation grids cost sampling time in every job: opt in for sweeps
    configs = build_configs(values, [f for f in flags if f.cls is not SweepConfig])
    subjects = [sweep_plan.parse_subject(text) for text in sweep.subjects]
    subjects += [sweep_plan.subject_from_table(t, f"config file '{config}'") for t in tables or []]
    return configs, sweep, subjects, bool(values["validate"])


def job_configs(base: Configs, job: Job, folder: Path) -> Configs:
    """The run of one job: the base settings with its subject's data, its method's adapter and its seed."""
    subject = job.subject
    options = dataclasses.replace(
        base.options,
        data=str(subject.data),
        output=str(folder),
        name=job.name,
        trigger=subject.trigger if subject.trigger is not None else base.options.trigger,
        caption_template=subject.caption_template or base.options.caption_template,
        resume="",
        overwrite=False,
    )
    lora2 = sweep_plan.method_config(job.method, dataclasses.replace(base.lora2, seed=job.seed))
    return Configs(options, lora2, dataclasses.replace(base.train, seed=job.seed), base.dataset, base.validation)


def load_eval_models(sweep: SweepConfig, device) -> Any:
    """DINO and CLIP when both folders are complete, else None (the table leaves their columns out)."""
    from ..lora2.evaluate import EvalModels
    from ..lora2.evaluate_models import CLIP, DINO, missing_files

    root = Path(sweep.eval_models).expanduser()
    dino, clip = root / DINO.folder_name, root / CLIP.folder_name
    if missing_files(dino, DINO) or missing_files(clip, CLIP):
        log.info("LoRA² sweep: no complete evaluation models in '%s'; DINO / CLIP columns left out", root)
        return None
    return EvalModels.load(dino, clip, device)


def evaluate_job(model, adapter, configs: Configs, sweep: SweepConfig, eval_models) -> dict[str, float]:
    """DINO / CLIP-I / CLIP-T of images generated with the finished adapter against the subject's photos."""
    from ..lora2.evaluate import evaluate
    from .models import generate, merged

    trigger = configs.options.trigger.strip()
    prompts = [p.replace("{trigger}", trigger) for p in sweep.eval_prompts] or configs.options.prompts()
    with merged(model, adapter):
        images, labels = generate(
            model, prompts, sweep.eval_images, sweep.eval_steps, sweep.eval_size, sweep.eval_cfg, sweep.eval_seed
        )
    result = evaluate(images, Path(configs.options.data), labels, eval_models)
    return {key: stats["mean"] for key, stats in result.summary().items()}


def run_job(root: Path, job: Job, base: Configs, sweep: SweepConfig, model, eval_models, process: int, stop) -> str:
    """Train, evaluate and publish one job; returns ``done``, ``cancelled`` or ``failed``."""
    from .train_command import train, write_json

    partial = sweep_plan.fresh_partial(root, job)
    configs = job_configs(base, job, partial)
    sweep_plan.record(root, "start", job, process)
    try:
        summary, adapter = train(
            configs, model=model, should_stop=stop, progress=process == 0, cache=root / ".lora2_cache"
        )
        if summary["status"] == "cancelled":
            sweep_plan.record(root, "cancelled", job, process)
            return "cancelled"
        summary.update(job=job.name, subject=job.subject.name, method=job.method, seed=job.seed, process=process)
        if eval_models is not None:
            summary["eval"] = evaluate_job(model, adapter, configs, sweep, eval_models)
        write_json(partial / "run.json", summary)
    except LoRA2Error as error:
        log.error("LoRA² sweep: job %s failed: %s", job.name, error)
        sweep_plan.record(root, "failed", job, process)
        return "failed"
    sweep_plan.publish(root, job, partial)
    sweep_plan.record(root, "done", job, process)
    return "done"


def write_table(root: Path, jobs: list[Job]) -> str:
    from .train_command import write_json

    table = sweep_table.rows(root, jobs)
    text = sweep_table.markdown(table)
    from ..lora2.paths import atomic_write

    atomic_write(root / "summary.md", lambda temporary: temporary.write_text(text, encoding="utf-8"))
    write_json(root / "summary.json", {"rows": table, "jobs": len(jobs)})
    return text


def wants_cpu(device: str) -> bool:
    """Whether the processes run on CPU: asked for, or no accelerator here.

    ``accelerate.PartialState`` must be told (``cpu=True``), else processes started by ``accelerate launch
    --multi_gpu`` or ``torchrun`` on a machine without GPUs each believe they are alone.
    """
    if device != "auto":
        return torch.device(device).type == "cpu"
    return not torch.accelerator.is_available()


def main(argv: Sequence[str]) -> int:
    from accelerate import PartialState

    from .models import load_model
    from .train_command import EXIT_CANCELLED, StopFlag, ctrl_c_stops, model_dtype, pick_device

    base, sweep, subjects, _ = parse(argv)
    if not base.options.output.strip() or not base.options.model.strip():
        raise LoRA2Error("a sweep needs --model and --output")
    root = Path(base.options.output).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    jobs = sweep_plan.plan(subjects, list(sweep.methods), list(sweep.seeds))
    state = PartialState(cpu=wants_cpu(base.options.device))
    mine = sweep_plan.shard(jobs, state.process_index, state.num_processes)
    todo = [job for job in mine if not sweep_plan.is_done(root, job)]
    log.info(
        "LoRA² sweep: %d jobs; process %d of %d takes %d, %d already done",
        len(jobs),
        state.process_index,
        state.num_processes,
        len(mine),
        len(mine) - len(todo),
    )
    outcomes: list[str] = []
    if todo:
        device = state.device if base.options.device == "auto" else pick_device(base.options.device)
        config = Path(base.options.model_config).expanduser() if base.options.model_config else None
        model = load_model(
            Path(base.options.model).expanduser(), config, device, model_dtype(base.options.model_dtype, device)
        )
        eval_models = load_eval_models(sweep, device)
        with ctrl_c_stops(StopFlag()) as stop:
            for job in todo:
                outcomes.append(run_job(root, job, base, sweep, model, eval_models, state.process_index, stop))
                if outcomes[-1] == "cancelled":
                    break
    text = write_table(root, jobs)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if all(sweep_plan.is_done(root, job) for job in jobs):
        print(text, end="")
    if "cancelled" in outcomes:
        return EXIT_CANCELLED
    return 1 if "failed" in outcomes else 0
