"""A cheap, stable identity for models and tensors: which VAE and text encoder a cached dataset was built with."""

from __future__ import annotations

import hashlib

import torch


def fingerprint(*objects) -> str:
    """A cheap identity for models (VAE, CLIP): a hash over a strided sample of every parameter.

    Hashing whole weights would cost seconds for a T5 encoder; 64 numbers per tensor plus shapes tell
    two different models apart in practice and keep re-runs instant.
    """
    digest = hashlib.sha256()
    for obj in objects:
        if torch.is_tensor(obj):
            obj = {"tensor": obj}
        if isinstance(obj, dict):
            for name, tensor in sorted(obj.items()):
                digest.update(name.encode() + str(tuple(tensor.shape)).encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
            continue
        module = _module_of(obj)
        if module is None:
            digest.update(type(obj).__name__.encode())
            continue
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
            digest.update(name.encode() + str(tuple(tensor.shape)).encode() + sample.numpy().tobytes())
    return digest.hexdigest()[:16]


MODULE_PATHS = ("first_stage_model", "cond_stage_model", "patcher.model", "model")
"""Attributes under which model wrappers keep their ``torch.nn.Module`` (ComfyUI's VAE and CLIP objects,
a ModelPatcher, diffusers-style wrappers); read by name, so the core needs no host import."""


def _module_of(obj) -> torch.nn.Module | None:
    for path in MODULE_PATHS:
        current = obj
        for part in path.split("."):
            current = getattr(current, part, None)
        if isinstance(current, torch.nn.Module):
            return current
    return obj if isinstance(obj, torch.nn.Module) else None
