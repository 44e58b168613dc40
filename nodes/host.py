"""The one module of the nodes that speaks ComfyUI's internals.

It turns ComfyUI objects into the plain callables ``lora2`` takes: a MODEL's ``model_sampling`` into a
noise rule, its ``BaseModel`` into a denoiser, VAE/CLIP into encoders, CONDITIONING into tensors, an
adapter into ModelPatcher patches, and it owns file locations under ``models/loras``, progress and
Cancel. Everything else in ``nodes/`` is declarations that call into ``lora2`` through here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import unicodedata
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
from ..lora2.dataset_files import resolve_folder
from ..lora2.errors import LoRA2Error
from ..lora2.lora_file import STATE_SUFFIX, file_factors, is_foreign_key, state_path
from ..lora2.noise import DenoisedRule
from ..lora2.paths import check_name_length, inside, is_inside, remove_orphan_temporaries
from ..lora2.run import TrainingTarget

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


def training_target(model, dataset) -> TrainingTarget:
    """A MODEL and a LoRA² dataset as the plain pieces :func:`lora2.run.train_run` trains (model loaded fully)."""
    comfy.model_management.load_models_gpu([model], force_full_load=True)

    def batches(batch_size: int, generator: torch.Generator) -> Iterator:
        for batch in dataset.batches(batch_size, generator):
            yield dataclasses.replace(batch, latents=process_latents(model, batch.latents))

    return TrainingTarget(
        module=base_model(model).diffusion_model,
        denoiser=make_denoiser(model),
        rule=noise_rule(model),
        batches=batches,
        device=model.load_device,
        family=model_family(model),
        key_for=kohya_key_for(model),
        inplace_residuals=True,
        interrupt_errors=(comfy.model_management.InterruptProcessingException,),
    )


def raise_cancelled() -> None:
    """End this node as ComfyUI's Cancel does: the rest of the graph is skipped and nothing is cached."""
    raise comfy.model_management.InterruptProcessingException()


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


def diffusers_names(unet_config: dict) -> dict[str, str]:
    """ComfyUI UNet module path -> its diffusers name, for modules that have exactly one.

    ComfyUI's table gives SDXL's added-conditioning MLP two diffusers names (``label_emb.0.0`` is
    ``add_embedding.linear_1`` in SDXL and ``class_embedding.linear_1`` in other UNets); such modules keep
    their own path, ``lora_unet_label_emb_0_0``, which is what kohya writes for SDXL and what diffusers'
    converter maps to ``add_embedding`` (a guessed diffusers name would be dropped by one of them).
    """
    if "num_res_blocks" not in unet_config:
        return {}
    names: dict[str, set[str]] = {}
    for diffusers_key, comfy_key in comfy.utils.unet_to_diffusers(unet_config).items():
        if diffusers_key.endswith(".weight"):
            names.setdefault(comfy_key[: -len(".weight")], set()).add(diffusers_key[: -len(".weight")])
    return {module: next(iter(found)) for module, found in names.items() if len(found) == 1}


def kohya_key_for(model) -> Callable[[str], str]:
    """Component name -> kohya LoRA key: diffusers-derived names for UNets (what A1111, kohya and
    diffusers read), ``lora_unet_<module path>`` otherwise; ComfyUI maps both back to the weight."""
    by_module = diffusers_names(base_model(model).model_config.unet_config)

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
_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"|?*]+')
"""Characters no file system (or no shell-safe name) takes; letters of every script are kept."""
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
"""Windows device names, which cannot be file names there whatever the extension."""
LORA_SUFFIXES = (".safetensors", STATE_SUFFIX)


def loras_dir() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0])


def _name_part(part: str) -> str:
    part = _UNSAFE.sub("_", unicodedata.normalize("NFC", part)).strip(" .")
    return f"_{part}" if part.split(".")[0].lower() in _RESERVED else part


def safe_lora_path(name: str, suffix: str = ".safetensors") -> Path:
    """``models/loras/<name><suffix>``, sub-folders allowed, never outside; any script's letters are kept.

    Only characters file systems refuse (``<>:"|?*``, control characters) become ``_``, so ``日本語`` and
    ``中文`` stay two names. A name longer than the file system takes is refused, not cut.
    """
    root = loras_dir().resolve()
    parts = [_name_part(part) for part in re.split(r"[\\/]+", name) if part.strip(" .")]
    parts = [part for part in parts if part]
    if not parts:
        raise LoRA2Error(f"file name {name!r} is empty after removing unsafe characters; use letters and digits")
    stem = parts[-1]
    for known in LORA_SUFFIXES:
        stem = stem.removesuffix(known)
    parts[-1] = stem + suffix
    path = root.joinpath(*parts)
    for part in parts:
        check_name_length(Path(part), "file name")
    return inside(path, root, f"file name {name!r}")


def save_path(name: str, overwrite: bool) -> tuple[Path, str | None]:
    """Where LoRA² Save writes ``name``, and a note when that is not the name asked for.

    A LoRA and its ``.lora2state`` are one pair: with ``overwrite`` off, a name is taken when either
    file exists, and the first free ``<name>_2``, ``<name>_3``, ... is used instead (nothing replaced,
    and no old state ever sits beside the new file).
    """
    path = safe_lora_path(name)
    if overwrite or not _taken(path):
        return path, None
    stem = path.name[: -len(".safetensors")]
    for number in range(2, 10_000):
        candidate = path.with_name(f"{stem}_{number}.safetensors")
        check_name_length(candidate, "numbered file name")
        if not _taken(candidate):
            return candidate, f"'{path.name}' already exists (overwrite is off): saved as '{candidate.name}'"
    raise LoRA2Error(f"'{path}' and 10,000 numbered variants exist; choose another name or turn overwrite on")


def _taken(path: Path) -> bool:
    return path.exists() or state_path(path).exists()


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
            names += sorted(str(p.relative_to(base)) for p in base.rglob("*" + STATE_SUFFIX))
    return ["none", *names]


def resume_path(name: str) -> Path:
    """The ``.lora2state`` named ``name`` in one of the loras folders (never a path outside them)."""
    for root in folder_paths.get_folder_paths("loras"):
        candidate = Path(root) / name
        if is_inside(candidate, root) and candidate.is_file():
            return Path(os.path.realpath(candidate))
    raise LoRA2Error(f"no training state '{name}' in models/loras")


ANY_DATASET_PATH = "COMFYUI_LORA2_ANY_DATASET_PATH"
"""Set to 1 (in the environment ComfyUI starts in) to let LoRA² Dataset read absolute paths anywhere."""


def dataset_roots() -> list[Path]:
    """Where LoRA² Dataset looks up folder names: ComfyUI's input folder, then its ``datasets`` folders.

    ComfyUI 0.33 has a ``datasets`` folder type (``<base>/datasets``, more through extra_model_paths.yaml);
    older hosts such as 0.3.75 do not, and get the same default folder, so one workflow works on both.
    """
    if "datasets" in folder_paths.folder_names_and_paths:
        datasets = folder_paths.get_folder_paths("datasets")
    else:
        datasets = [os.path.join(folder_paths.base_path, "datasets")]
    return [Path(folder_paths.get_input_directory()), *(Path(p) for p in datasets)]


def dataset_folder(name: str) -> Path:
    """The folder LoRA² Dataset reads for ``name`` (absolute paths outside the roots only when opted in)."""
    allowed = os.environ.get(ANY_DATASET_PATH, "").strip().lower() in ("1", "true", "yes")
    hint = f", add its folder under 'datasets:' in extra_model_paths.yaml, or start ComfyUI with {ANY_DATASET_PATH}=1"
    return resolve_folder(name, dataset_roots(), allow_absolute=allowed, opt_in_hint=hint)


def cleanup_orphans() -> list[Path]:
    """Remove temporary files that interrupted writes left in models/loras and the dataset cache.

    Called once while ComfyUI loads the pack; never raises (see :func:`lora2.paths.remove_orphan_temporaries`).
    """
    try:
        folders = [*folder_paths.get_folder_paths("loras"), str(Path(folder_paths.models_dir) / "lora2_cache")]
        return remove_orphan_temporaries(folder for folder in folders if os.path.isdir(folder))
    except Exception as exc:  # start-up must not fail over housekeeping
        log.warning("LoRA²: skipped the clean-up of unfinished temporary files (%s)", exc)
        return []


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
