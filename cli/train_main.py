"""The ``lora2-train`` command line for one run: flags (and ``--config``) -> :func:`cli.train_command.train`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .flags import Configs, add_config_flags, build_configs, merge, read_toml

DESCRIPTION = (
    "Train a LoRA² (adaptive-rank) or fixed-rank LoRA on a folder of images with captions, from a local "
    "SD1.5/SDXL diffusers folder or single-file checkpoint. Ctrl-C stops after the current step and writes a "
    "checkpoint. Every flag can also be set in --config run.toml (keys: the flag names with underscores)."
)


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="lora2-train", description=DESCRIPTION)
    result.add_argument("--config", type=Path, help="TOML file of flag values (flags given here win)")
    return result


def parse(argv: Sequence[str]) -> Configs:
    """Command line -> validated configs (defaults < --config file < flags)."""
    cli = parser()
    flags = add_config_flags(cli)
    args = cli.parse_args(list(argv), namespace=argparse.Namespace())
    config = vars(args).pop("config", None)
    toml_values = read_toml(config) if config is not None else {}
    values = merge(args, toml_values, flags, f"config file '{config}'")
    return build_configs(values, flags)


def main(argv: Sequence[str]) -> int:
    from ..lora2.dataset import EncodingCancelled
    from .train_command import EXIT_CANCELLED, StopFlag, ctrl_c_stops, train

    configs = parse(argv)
    try:
        with ctrl_c_stops(StopFlag()) as stop:
            summary, _ = train(configs, should_stop=stop)
    except EncodingCancelled as cancelled:
        print(f"Cancelled: {cancelled}")
        return EXIT_CANCELLED
    if summary["status"] == "cancelled":
        print(
            f"Cancelled at step {summary['steps']}; checkpoint {summary['checkpoint']}. Continue with: "
            f"lora2-train ... --resume '{summary['checkpoint']}'"
        )
        return EXIT_CANCELLED
    print(
        f"Trained {summary['steps']} steps: {summary['components']} components, mean rank {summary['mean_rank']:.2f}, "
        f"{summary['adapter_mb']:.2f} MB -> {Path(configs.options.output) / summary['adapter']}"
    )
    return 0
