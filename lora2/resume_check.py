"""Can this saved training state continue under these settings? Checked before anything is built.

A ``.lora2state`` holds one optimizer's state: AdamW's moments (``exp_avg``, ``exp_avg_sq``) and its
hyper-parameters (``betas``, ``eps``) per group. ``torch.optim.Optimizer.load_state_dict`` copies the
saved groups over the new optimizer's without asking whether they belong to it, so resuming an AdamW
state with SGD fails only at the first step, with ``KeyError: 'momentum'`` from inside torch (and a
state saved by SGD under Adam fails the same way). The check here reads which optimizer wrote the state
and refuses a different one with a message that says what to pick.
"""

from __future__ import annotations

from typing import Any

from .adapter import ResumeState
from .errors import LoRA2Error

GROUP_KEYS: dict[str, tuple[str, ...]] = {
    "adamw": ("betas", "eps"),
    "adam": ("betas", "eps"),
    "sgd": ("momentum", "dampening", "nesterov"),
    "prodigy": ("betas", "d", "d0"),
    "adamw8bit": ("betas", "eps"),
}
"""Hyper-parameters each optimizer's ``step`` reads from every param group (a state without them was
written by another optimizer)."""


def saved_optimizer(resume: ResumeState) -> str | None:
    """The optimizer name the run was trained with, as its train config recorded it (None if unknown)."""
    train = resume.train_config.get("train") if isinstance(resume.train_config, dict) else None
    name = train.get("optimizer") if isinstance(train, dict) else None
    return name if isinstance(name, str) else None


def _groups(resume: ResumeState) -> list[dict[str, Any]]:
    state = resume.optimizer_state
    groups = state.get("param_groups") if isinstance(state, dict) else None
    return [g for g in groups if isinstance(g, dict)] if isinstance(groups, list) else []


def check_resume_optimizer(resume: ResumeState, optimizer: str, source: str) -> None:
    """Raise :class:`LoRA2Error` when ``resume`` (read from ``source``) was not written by ``optimizer``."""
    saved = saved_optimizer(resume)
    if saved is not None and saved != optimizer:
        raise LoRA2Error(
            f"'{source}' was trained with optimizer '{saved}', but this run uses '{optimizer}': their states "
            f"do not mix. Set optimizer to '{saved}' to continue that run, or set resume to 'none' to start anew"
        )
    needed = GROUP_KEYS.get(optimizer, ())
    for group in _groups(resume):
        missing = [key for key in needed if key not in group]
        if missing:
            raise LoRA2Error(
                f"'{source}' holds optimizer state without {missing[0]!r}, so another optimizer than "
                f"'{optimizer}' wrote it. Choose the optimizer it was trained with, or set resume to 'none'"
            )
