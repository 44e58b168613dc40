"""ComfyUI-LoRA²: train, inspect, prune and apply adaptive-rank LoRA adapters in ComfyUI.

ComfyUI imports this file and reads ``NODE_CLASS_MAPPINGS``; nothing else happens here. Outside
ComfyUI (tests, benchmarks, the engine used from plain Python) there is no host to register with, so
the mappings stay empty and only ``lora2`` is used.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("folder_paths") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

WEB_DIRECTORY = "./web"
"""Served at ``/extensions/<pack folder>/``: ``docs/<node id>.md`` are the nodes' help pages (ComfyUI's frontend shows
them in the node library; written by ``devtools/help_pages.py`` from the declarations)."""

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
