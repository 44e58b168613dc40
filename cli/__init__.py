"""``lora2-train``: LoRA² from the command line, and many-subject sweeps on ``accelerate``.

Why a package at the pack root, beside ``nodes/``, and not inside ``lora2/``: the CLI is a front-end
like the nodes (it supplies a model, encoders, progress and Cancel to the one training run in
:mod:`lora2.run`), and it brings front-end dependencies (diffusers pipelines, tqdm, accelerate) the
core does not need. ``lora2/`` stays the engine both front-ends share; neither front-end imports the
other, and this package never imports ComfyUI (``tests/test_cli.py`` checks both).

Commands::

    lora2-train --model MODEL --data FOLDER --output OUT [flags]     one run (see --help)
    lora2-train sweep --subjects a=FOLDER ... --output OUT [flags]   subjects × methods × seeds
    accelerate launch [--num_processes N] -m comfyui_lora2.cli sweep ...   one process per device
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from ..lora2.errors import LoRA2Error


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lora2-train`` and ``python -m comfyui_lora2.cli``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args and args[0] == "sweep":
            from .sweep import main as sweep_main

            return sweep_main(args[1:])
        from .train_main import main as train_main

        return train_main(args[1:] if args and args[0] == "train" else args)
    except LoRA2Error as error:
        print(f"LoRA2Error: {error}", file=sys.stderr)
        return 2


__all__ = ["main"]
