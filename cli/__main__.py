"""``python -m comfyui_lora2.cli``: the same as ``lora2-train``."""

from . import main

raise SystemExit(main())
