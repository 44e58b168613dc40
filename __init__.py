"""ComfyUI-LoRA²: train, inspect, prune and apply adaptive-rank LoRA adapters in ComfyUI.

ComfyUI imports this file and calls ``comfy_entrypoint`` (the V3 registration: a ``ComfyExtension``
whose node list is ``nodes.NODES``; there is no ``NODE_CLASS_MAPPINGS``, one style only); nothing else
happens here. Outside ComfyUI (tests, benchmarks, the engine used from plain Python) there is no host to
register with, so there is no entry point and only ``lora2`` is used.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("folder_paths") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
else:
    __all__ = ["WEB_DIRECTORY"]

WEB_DIRECTORY = "./web"
"""Served at ``/extensions/<pack folder>/``: ``docs/<node id>.md`` are the nodes' help pages (ComfyUI's frontend shows
them in the node library; written by ``devtools/help_pages.py`` from the declarations)."""
