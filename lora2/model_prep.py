"""Preparing a frozen model for training adapters on it: pure torch, whichever host loaded the model.

Two things stand between a model a host loaded for inference and backpropagating through it: the
host may have created its weights as inference tensors, and it may update residuals in place. Both are
fixed here without touching the model's code, so they are testable on CPU without a host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

NORM_CLASS_SUFFIXES = ("LayerNorm", "RMSNorm")
"""Class-name endings of the normalisation layers :func:`inplace_safe_norms` protects (torch's, ComfyUI's
and diffusers' own classes all end this way)."""


def make_trainable(module: torch.nn.Module) -> None:
    """Freeze ``module`` and turn inference tensors among its weights into ordinary ones.

    ComfyUI's executor runs every node under ``torch.inference_mode()``, so a model loaded by a loader
    node holds inference tensors, which autograd refuses to save for backward (and the adapters'
    gradients flow through every frozen layer above them). Values are unchanged; only tensors that
    are inference tensors are copied, once.
    """
    module.requires_grad_(False)
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if param is not None and param.is_inference():
                owner._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
        for name, buffer in list(owner._buffers.items()):
            if buffer is not None and buffer.is_inference():
                owner._buffers[name] = buffer.clone()


@contextlib.contextmanager
def inplace_safe_norms(module: torch.nn.Module) -> Iterator[None]:
    """Let autograd survive in-place residual updates while training.

    ComfyUI's DiT blocks (Flux, SD3, ...) write ``x += gate * f(norm(x))`` in place to save memory at
    inference. The norm has saved ``x`` for its backward pass, so once the adapters make ``x`` require
    grad, the in-place update breaks the backward. Inside this context every LayerNorm/RMSNorm gets a
    private copy of its input (only when it requires grad), which is all those blocks need.
    """

    def copy_input(_module, args):
        if args and torch.is_tensor(args[0]) and args[0].requires_grad:
            return (args[0].clone(), *args[1:])
        return None

    hooks = [
        m.register_forward_pre_hook(copy_input)
        for m in module.modules()
        if type(m).__name__.endswith(NORM_CLASS_SUFFIXES)
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def ordinary_tensors(value: Any) -> Any:
    """``value`` (tensors in dicts, lists, tuples) with every inference tensor replaced by an ordinary copy.

    A resume state read under the host's ``inference_mode`` holds inference tensors; the optimizer's
    in-place updates of its loaded moments and step counts would refuse them.
    """
    if torch.is_tensor(value):
        return value.clone() if value.is_inference() else value
    if isinstance(value, dict):
        return {key: ordinary_tensors(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(ordinary_tensors(item) for item in value)
    return value
