"""ComfyUI nodes over ``lora2`` (thin declarations; each calls one core function)."""
