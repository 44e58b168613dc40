"""ComfyUI's progress bar and Cancel, as the plain callbacks ``lora2`` takes (``on_progress``, ``should_stop``)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import comfy.model_management
import comfy.utils

log = logging.getLogger("LoRA²")


def raise_cancelled() -> None:
    """End this node as ComfyUI's Cancel does: the rest of the graph is skipped and nothing is cached."""
    raise comfy.model_management.InterruptProcessingException()


def interrupted() -> bool:
    """True once the user pressed Cancel (ComfyUI's global interrupt flag)."""
    return comfy.model_management.processing_interrupted()


class Progress:
    """ComfyUI's progress bar on the node, plus a console line every ``every`` steps."""

    def __init__(self, total: int, every: int = 10) -> None:
        self.bar = comfy.utils.ProgressBar(total)
        self.every = max(1, every)

    def __call__(self, report) -> None:
        if interrupted():
            return  # the host's progress hook would raise; the trainer stops cleanly after this step
        self.bar.update_absolute(report.step, report.total_steps)
        if report.step % self.every == 0 or report.step == report.total_steps:
            log.info(
                "LoRA² step %d/%d  loss %.4f  total rank %d  adapter %.2f MB  %.1fs",
                report.step,
                report.total_steps,
                report.loss,
                report.total_rank,
                report.adapter_megabytes,
                report.seconds,
            )


def progress_callback(total: int) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback drawing ComfyUI's progress bar on the running node."""
    bar = comfy.utils.ProgressBar(max(1, total))
    return lambda done, of: bar.update_absolute(done, of)
