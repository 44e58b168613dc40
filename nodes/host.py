"""The one module of the nodes that speaks ComfyUI's internals.

It turns ComfyUI objects into the plain callables ``lora2`` takes: a MODEL's ``model_sampling`` into a
noise rule, its ``BaseModel`` into a denoiser, VAE/CLIP into encoders, CONDITIONING into tensors, an
adapter into ModelPatcher patches, and it owns file locations under ``models/loras``, progress and
Cancel. Everything else in ``nodes/`` is declarations that call into ``lora2`` through here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import comfy.lora
import comfy.model_management
import comfy.model_sampling
import comfy.utils
import folder_paths
import torch
from comfy.weight_adapter.lora import LoRAAdapter

from ..lora2.adapter import Adapter
from ..lora2.errors import LoRA2Error
from ..lora2.lora_file import file_factors, is_foreign_key
from ..lora2.noise import DenoisedRule

log = logging.getLogger("LoRA²")


# ----------------------------------------------------------------------------- the model
def base_model(model) -> torch.nn.Module:
    """The ``BaseModel`` inside a MODEL (a ModelPatcher)."""
    if not hasattr(model, "model") or not hasattr(model.model, "diffusion_model"):
        raise LoRA2Error("the 'model' input is not a ComfyUI diffusion MODEL (expected a ModelPatcher)")
    return model.model


def model_family(model) -> str:
    """ComfyUI's name for the model family, e.g. ``SD15``, ``SDXL``, ``Flux``, ``SD3``."""
    return type(base_model(model).model_config).__name__


def parameterisation(model_sampling) -> tuple[str, float]:
    """``(kind, sigma_data)`` of a ``model_sampling`` object, for :func:`lora2.noise.native_weight`."""
    ms = comfy.model_sampling
    if isinstance(model_sampling, ms.CONST):
        return "flow", 1.0
    if isinstance(model_sampling, ms.X0):
        return "x0", 1.0
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v", float(getattr(model_sampling, "sigma_data", 1.0))
    if isinstance(model_sampling, ms.EPS):
        return "eps", 1.0
    raise LoRA2Error(f"LoRA² cannot train models with {type(model_sampling).__name__} sampling yet")


def noise_rule(model) -> DenoisedRule:
    """Noise levels, forward process and loss weighting from the model's own ``model_sampling``."""
    sampling = base_model(model).model_sampling
    kind, sigma_data = parameterisation(sampling)

    def sample_sigma(u: torch.Tensor) -> torch.Tensor:
        # percent 0 is the start of sampling (σ_max); the discrete schedules return a huge sentinel there
        u = u.clamp(1e-3, 1.0 - 1e-3)
        return torch.tensor([float(sampling.percent_to_sigma(float(p))) for p in u], dtype=torch.float32)

    def noise_scaling(sigma: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return sampling.noise_scaling(sigma, noise, x0)

    return DenoisedRule(sample_sigma, noise_scaling, kind, sigma_data)


def make_denoiser(model) -> Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    """``(x, σ, conditioning) -> x0`` through ComfyUI's own ``extra_conds`` and ``apply_model``.

    Going through ``extra_conds`` is what makes one code path serve every family: SDXL's size-and-pool
    vector, Flux's guidance and pooled text, SD3's pooled output are all built by the model class.
    """
    base = base_model(model)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = dict(conditioning)
        if torch.is_tensor(kwargs.get("guidance")):  # Flux reads one guidance value for the batch
            kwargs["guidance"] = float(kwargs["guidance"].flatten()[0])
        height, width = x.shape[-2] * 8, x.shape[-1] * 8
        conds = base.extra_conds(noise=x, device=x.device, width=width, height=height, **kwargs)
        processed = {key: cond.process_cond(batch_size=x.shape[0], area=None).cond for key, cond in conds.items()}
        return base.apply_model(x, sigma, **processed)

    return denoise


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
    """Let autograd survive ComfyUI's in-place residual updates while training.

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
        if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def process_latents(model, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents to the model's latent space (ComfyUI's samplers do the same before sampling)."""
    return base_model(model).process_latent_in(latents)


def conditioning_to_dict(conditioning: list) -> dict[str, torch.Tensor]:
    """CONDITIONING ``[[cross_attn, {pooled_output: ..., ...}], ...]`` (first entry) to tensors by name."""
    if not conditioning:
        raise LoRA2Error("the conditioning input is empty; connect a CLIP Text Encode node")
    cross_attn, extras = conditioning[0][0], conditioning[0][1]
    result = {"cross_attn": cross_attn}
    for key, value in extras.items():
        if torch.is_tensor(value):
            result[key] = value
        elif isinstance(value, (int, float)) and key == "guidance":
            result[key] = torch.tensor([float(value)])
    return result


def clip_text_encoder(clip) -> Callable[[str], dict[str, torch.Tensor]]:
    def encode(caption: str) -> dict[str, torch.Tensor]:
        tokens = clip.tokenize(caption)
        return conditioning_to_dict(clip.encode_from_tokens_scheduled(tokens))

    return encode


def vae_image_encoder(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    def encode(images: torch.Tensor) -> torch.Tensor:
        pixels = images.permute(0, 2, 3, 1).contiguous()  # ComfyUI IMAGE is [B, H, W, C] in [0, 1]
        return vae.encode(pixels[..., :3]).float().cpu()

    return encode


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


def _module_of(obj) -> torch.nn.Module | None:
    for path in ("first_stage_model", "cond_stage_model", "patcher.model", "model"):
        current = obj
        for part in path.split("."):
            current = getattr(current, part, None)
        if isinstance(current, torch.nn.Module):
            return current
    return obj if isinstance(obj, torch.nn.Module) else None


# ----------------------------------------------------------------------------- adapters on models
def weight_key(component: str) -> str:
    return f"diffusion_model.{component}.weight"


TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te1_", "te2_", "lora_te1", "lora_te2", "clip_")


def patch_targets(model, names) -> tuple[dict[str, object], list[str]]:
    """Where each component goes in ``model``: our module names directly, any other spelling (kohya,
    diffusers, PEFT, ComfyUI-native) through ComfyUI's own LoRA key map. Returns targets and leftovers."""
    weights = set(base_model(model).state_dict())
    key_map = None
    targets, unresolved = {}, []
    for name in names:
        if weight_key(name) in weights:
            targets[name] = weight_key(name)
            continue
        key_map = key_map if key_map is not None else lora_key_map(model)
        if name in key_map:
            targets[name] = key_map[name]
        else:
            unresolved.append(name)
    return targets, unresolved


def apply_adapter(model, adapter: Adapter, strength: float):
    """A clone of ``model`` with the adapter as LoRA patches (merged into the weights when loaded).

    The patches are the same ``LoRAAdapter`` objects ComfyUI's own LoRA loader builds from a file
    LoRA² Save writes (same factors, same alpha), so Apply and the stock loader change a model identically. Text-encoder
    components of foreign files are skipped: this applies to the MODEL only.
    """
    clone = model.clone()
    if strength == 0.0 or not adapter.components:
        return clone
    targets, unresolved = patch_targets(model, adapter.components)
    text = [n for n in unresolved if n.startswith(TEXT_ENCODER_PREFIXES)]
    unknown = [n for n in unresolved if n not in text]
    if text:
        log.info("LoRA² Apply: skipping %d text-encoder components (the MODEL is adapted only)", len(text))
    if unknown:
        raise LoRA2Error(
            f"{len(unknown)} adapter components match no weight of this model (first: {unknown[0]}); "
            f"the adapter was made for {adapter.base_model}, this model is {model_family(model)}"
        )
    patches = {}
    for name, target in targets.items():
        up, down, alpha = file_factors(adapter.components[name])
        patches[target] = LoRAAdapter(set(), (up, down, alpha, None, None, None))
    clone.add_patches(patches, strength)
    return clone


def kohya_key_for(model) -> Callable[[str], str]:
    """Component name -> kohya LoRA key: diffusers-derived names for UNets (what A1111, kohya and
    diffusers read), ``lora_unet_<module path>`` otherwise; ComfyUI maps both back to the weight."""
    unet_config = base_model(model).model_config.unet_config
    diffusers = comfy.utils.unet_to_diffusers(unet_config) if "num_res_blocks" in unet_config else {}
    by_module = {v[: -len(".weight")]: k[: -len(".weight")] for k, v in diffusers.items() if k.endswith(".weight")}

    def key_for(component: str) -> str:
        if is_foreign_key(component):
            return component
        name = by_module.get(component, component)
        return "lora_unet_" + name.replace(".", "_")

    return key_for


def lora_key_map(model) -> dict[str, str]:
    """ComfyUI's own map from every LoRA key spelling it accepts to the model's weight keys."""
    return comfy.lora.model_lora_keys_unet(base_model(model), {})


# ----------------------------------------------------------------------------- files
_UNSAFE = re.compile(r"[^A-Za-z0-9 _.\-]+")


def loras_dir() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0])


def safe_lora_path(name: str, suffix: str = ".safetensors") -> Path:
    """``models/loras/<name><suffix>`` with the name sanitised; sub-folders allowed, never outside."""
    root = loras_dir().resolve()
    parts = [_UNSAFE.sub("_", part).strip(" .") for part in re.split(r"[\\/]+", name) if part.strip(" .")]
    if not parts:
        raise LoRA2Error(f"file name {name!r} is empty after removing unsafe characters; use letters and digits")
    parts[-1] = parts[-1].removesuffix(".safetensors").removesuffix(".lora2state") + suffix
    path = root.joinpath(*parts).resolve()
    if root not in path.parents:
        raise LoRA2Error(f"file name {name!r} points outside the loras folder")
    return path


def lora_file(name: str) -> Path:
    """The full path of a file listed in ``models/loras`` (ComfyUI's own lookup)."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise LoRA2Error(f"no file '{name}' in models/loras; refresh the node list or check the name")
    return Path(path)


def resume_choices() -> list[str]:
    """``none`` and every ``*.lora2state`` file under models/loras (relative names)."""
    names = []
    for root in folder_paths.get_folder_paths("loras"):
        base = Path(root)
        if base.is_dir():
            names += sorted(str(p.relative_to(base)) for p in base.rglob("*.lora2state"))
    return ["none", *names]


def resume_path(name: str) -> Path:
    for root in folder_paths.get_folder_paths("loras"):
        candidate = (Path(root) / name).resolve()
        if Path(root).resolve() in candidate.parents and candidate.is_file():
            return candidate
    raise LoRA2Error(f"no training state '{name}' in models/loras")


# ----------------------------------------------------------------------------- progress and Cancel
def interrupted() -> bool:
    """True once the user pressed Cancel (ComfyUI's global interrupt flag)."""
    return comfy.model_management.processing_interrupted()


class Progress:
    """ComfyUI's progress bar on the node, plus a console line every ``every`` steps."""

    def __init__(self, total: int, every: int = 10) -> None:
        self.bar = comfy.utils.ProgressBar(total)
        self.every = max(1, every)

    def __call__(self, report) -> None:
        if interrupted():
            return  # the host's progress hook would raise; the trainer stops cleanly after this step
        self.bar.update_absolute(report.step, report.total_steps)
        if report.step % self.every == 0 or report.step == report.total_steps:
            log.info(
                "LoRA² step %d/%d  loss %.4f  total rank %d  adapter %.2f MB  %.1fs",
                report.step,
                report.total_steps,
                report.loss,
                report.total_rank,
                report.adapter_megabytes,
                report.seconds,
            )
