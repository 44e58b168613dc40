"""ComfyUI-LoRA²: train, inspect, prune and apply adaptive-rank LoRA adapters in ComfyUI.

ComfyUI imports this file and reads ``NODE_CLASS_MAPPINGS``; nothing else happens here.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
