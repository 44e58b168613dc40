"""What a CLI run reads and writes: the settings that are files and folders, not training choices.

A dataclass like the config dataclasses, so its flags and TOML keys come from the same derivation
(:mod:`cli.flags`) and the same precedence applies.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..lora2.errors import LoRA2Error


@dataclass
class RunOptions:
    """Inputs and outputs of one training run."""

    model: str = ""
    """A diffusers folder (SD1.5 or SDXL) or a single .safetensors checkpoint."""
    model_config: str = ""
    """For a single-file checkpoint: a local diffusers folder with its configs and tokenizers (no hub access)."""
    data: str = ""
    """Folder of images with optional same-name .txt captions (kohya 'N_name' repeat folders too)."""
    output: str = ""
    """Output folder: the adapter, its .lora2state, the heatmap PNG, checkpoints/ and samples/."""
    name: str = "lora2"
    """File name of the adapter in the output folder (<name>.safetensors)."""
    caption_template: str = "a photo of {trigger}"
    """Caption of images without a .txt file; {trigger} is replaced by the trigger word."""
    trigger: str = "sks dog"
    """The word(s) that will call up the subject."""
    resume: str = ""
    """A .lora2state (or its .safetensors) to continue; its settings override the flags (see the run's log)."""
    overwrite: bool = False
    """Replace an existing <name>.safetensors instead of refusing."""
    cache: bool = True
    """Keep encoded latents and captions in <output>/.lora2_cache (re-runs encode nothing)."""
    device: str = "auto"
    """torch device (auto: the accelerator accelerate or torch sees, else cpu)."""
    model_dtype: str = "auto"
    """Storage dtype of the frozen model: float32, bfloat16, float16 (auto: bfloat16 on GPU, float32 on CPU)."""
    validate: bool = True
    """Draw validation grids (samples/step_NNNNNN.png) while training."""
    validate_prompts: tuple[str, ...] = ()
    """Validation prompts, comma-separated (default: the caption template with the trigger)."""
    heatmap_width: int = 1024
    """Width in pixels of <name>_heatmap.png."""

    def check(self) -> None:
        for name in ("model", "data", "output"):
            if not getattr(self, name).strip():
                raise LoRA2Error(f"--{name} is required (or '{name} = ...' in the --config file)")
        if self.model_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise LoRA2Error(f"--model-dtype must be auto, float32, bfloat16 or float16, got {self.model_dtype!r}")

    def prompts(self) -> list[str]:
        """The validation prompts: the given ones, else the default caption."""
        if self.validate_prompts:
            return list(self.validate_prompts)
        return [self.caption_template.replace("{trigger}", self.trigger.strip())]
