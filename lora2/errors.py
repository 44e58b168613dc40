"""The one exception type the engine raises for bad input.

Every message names the offending field (or file) and says what to do, because the person reading
it is usually looking at a ComfyUI node, not at a traceback.
"""

from __future__ import annotations


class LoRA2Error(ValueError):
    """Bad configuration or input for the LoRA² engine; the message says what to change."""
