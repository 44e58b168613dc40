"""One configuration of the speed benchmark, measured in a process of its own.

``python -m comfyui_lora2.bench.speed_worker '<json>'`` boots ComfyUI in-process (as
devtools/comfy_host.py does: the tree on ``sys.path``, ``utils.install_util`` before anything else,
``args.cpu`` before ``model_management``), builds the model, and measures one of:

* ``floor``: the bare frozen model's forward and backward (gradient w.r.t. the input only): the
  gradient every adapter needs flowing through the model (an adapter on later layers only, such as
  ``attn``, skips the part of it before its first adapted layer, so it can come in below).
* ``native``: ComfyUI's ``TrainLoraNode.execute``, called as the executor calls it.
* ``lora2``: ``LoRA2Train.execute``, the node a user runs (adaptive or fixed rank).
* ``apply_stock`` / ``apply_lora2``: loading a LoRA file onto the model and merging it (the stock
  ``LoraLoaderModelOnly`` path against LoRA² Load + Apply), for their peak memory.

Step times come from ComfyUI's progress-bar hook, which both trainers call once per optimizer step, so
both are timed at the same point; the run is stopped from that hook after ``warmup + steps`` steps
(``StopBench``), so nodes run with their default ``steps`` (evaluation and freeze schedules as a user
gets them) but the benchmark pays only for the steps it measures. Memory is read two ways
(:class:`Memory`): the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``
just before the measured call) minus the resident set at that moment, and the peak of allocated bytes
over those at that moment (glibc's count, sampled through one extra untimed step: :mod:`.allocated`);
on CUDA both are ``torch.cuda.max_memory_allocated`` minus what was allocated before. The last
line printed is one JSON object.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..devtools.layout import COMFY_DIR
from ..devtools.layout import STUBS_DIR as TORCHVISION_STUB  # used only when no torchvision is installed
from . import allocated


class StopBench(Exception):
    """Raised from the progress hook once the measured steps are done."""


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the worker exits: a full run starts hundreds of workers, and
    each left its ComfyUI folders (and the Apply test its 6 MB LoRA file) in ``/tmp`` before."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def boot_host(device: str, comfy_dir: Path = COMFY_DIR, stub: Path = TORCHVISION_STUB) -> None:
    """Put the pinned ComfyUI 0.3.75 on ``sys.path`` and configure it before its modules read ``args``."""
    import importlib.util

    if not (comfy_dir / "comfy").is_dir():
        raise SystemExit(f"ComfyUI host not installed at {comfy_dir}: run `make host`")
    sys.path.insert(0, str(comfy_dir))
    if importlib.util.find_spec("torchvision") is None:
        sys.path.insert(1, str(stub))
    import utils.install_util  # noqa: F401  (before `comfy`: see devtools/comfy_host.py)
    from comfy.cli_args import args

    args.cpu = device == "cpu"
    args.disable_api_nodes = True
    base = scratch_dir("lora2_speed_")
    import folder_paths

    for name in ("loras", "checkpoints"):
        (base / "models" / name).mkdir(parents=True)
        folder_paths.add_model_folder_path(name, str(base / "models" / name), is_default=True)
    for setter, sub in (("set_output_directory", "output"), ("set_temp_directory", "temp")):
        (base / sub).mkdir()
        getattr(folder_paths, setter)(str(base / sub))


# ----------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Memory:
    """Peak memory of one call: RSS high-water mark and peak allocated bytes on CPU, the allocator's peak on CUDA.

    ``added_mb`` is what the call added to the resident set (CPU) or to the allocator (CUDA);
    ``allocated_mb`` is the peak of allocated bytes over those at the start: on CUDA the same number, on
    CPU glibc's in-use count sampled after every operation of one tracked step (:mod:`.allocated`,
    :class:`StepClock`), or of the whole call where the caller starts tracking with it (Apply). It is
    what the ratios read: the RSS also holds the allocator's slack, which no trainer controls.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.tracker = None
        self.allocated_peak: int | None = None

    @property
    def samples_allocations(self) -> bool:
        """Whether allocated bytes are sampled (CPU with glibc); on CUDA the allocator counts them itself."""
        return not self.cuda and allocated.available()

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        except OSError:
            pass
        self.before = _status_kb("VmRSS") * 1024
        if self.samples_allocations:
            self.allocated_before = allocated.malloc_in_use()

    def track_start(self) -> None:
        """Start sampling allocated bytes (CPU with glibc; elsewhere nothing to do)."""
        if not self.samples_allocations or self.tracker is not None:
            return
        self.tracker = allocated.PeakAllocated()
        self.tracker.__enter__()

    def track_stop(self) -> None:
        if self.tracker is not None:
            self.tracker.__exit__(None, None, None)
            self.allocated_peak = self.tracker.peak
            self.tracker = None

    def stop(self) -> dict[str, float | None]:
        import torch

        self.track_stop()
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            added = (peak - self.before) / 2**20
            return {"peak_mb": peak / 2**20, "added_mb": added, "allocated_mb": added}
        peak = _status_kb("VmHWM") * 1024
        allocated_mb = None
        if self.allocated_peak is not None:
            allocated_mb = (self.allocated_peak - self.allocated_before) / 2**20
        return {"peak_mb": peak / 2**20, "added_mb": (peak - self.before) / 2**20, "allocated_mb": allocated_mb}


# ----------------------------------------------------------------------------- step timing
class StepClock:
    """Timestamps of the progress-bar updates; raises :class:`StopBench` after ``stop_after`` of them.

    On CPU a step's time is the process's CPU time (``time.process_time``), not the wall clock: the
    benchmark runs one torch thread, and on a shared machine the wall clock mostly measures the
    neighbours. On CUDA it is the wall clock after a synchronise. Both are kept (``wall_s``).

    With ``memory``, one more step runs after the timed ones with :meth:`Memory.track_start` on (sampling
    allocated bytes slows every operation, so that step is not timed), and the clock stops after it.
    """

    def __init__(self, stop_after: int, device: str, memory: Memory | None = None) -> None:
        self.stop_after = stop_after
        self.cuda = device.startswith("cuda")
        self.memory = memory if memory is not None and memory.samples_allocations else None
        self.tracking = False
        self.times: list[float] = []
        self.walls: list[float] = []

    def tick(self, *_args, **_kwargs) -> None:
        if self.tracking:
            self.memory.track_stop()
            raise StopBench()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.walls.append(time.perf_counter())
        self.times.append(self.walls[-1] if self.cuda else time.process_time())
        if len(self.times) >= self.stop_after:
            if self.memory is None:
                raise StopBench()
            self.tracking = True
            self.memory.track_start()

    @staticmethod
    def _gaps(marks: list[float], warmup: int) -> list[float]:
        gaps = [b - a for a, b in itertools.pairwise(marks)]
        return gaps[max(0, warmup - 1) :]

    def result(self, warmup: int) -> dict[str, list[float]]:
        """Durations of the steps after the first ``warmup`` (those pay for allocation and caches)."""
        return {"step_s": self._gaps(self.times, warmup), "wall_s": self._gaps(self.walls, warmup)}


def _install_clock(clock: StepClock) -> None:
    import comfy.utils

    comfy.utils.set_progress_bar_global_hook(clock.tick)
    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm line on stderr per step


# ----------------------------------------------------------------------------- the configurations
def _model(cfg: dict[str, Any]):
    from .speed_models import WEIGHT_DTYPES, build_model

    return build_model(cfg["model"], cfg["seed"], WEIGHT_DTYPES[cfg["weights"]], cfg["device"])


def _inputs(cfg: dict[str, Any]):
    from .speed_models import conditioning, latents

    images = 2  # TrainLoraNode 0.3.75 fails on a single latent dict
    return latents(cfg["model"], images, cfg["seed"], cfg.get("latent_side")), conditioning(
        cfg["model"], images, cfg["seed"]
    )


def run_floor(cfg: dict[str, Any]) -> dict[str, Any]:
    """Forward + backward of the frozen model through the same denoiser call LoRA² Train uses."""
    import comfy.model_management
    import torch

    from comfyui_lora2.nodes.comfy import model as host

    model = _model(cfg)

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    diffusion = host.base_model(model).diffusion_model
    diffusion.requires_grad_(False)
    denoise = host.make_denoiser(model)
    lat, conds = _inputs(cfg)
    device = model.load_device
    x = host.process_latents(model, lat[:1]).to(device)
    cond = {k: v.to(device) for k, v in conds[0].items()}
    sigma = torch.tensor([1.0], device=device)
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["compute"]]
    memory = Memory(cfg["device"])
    clock = StepClock(cfg["warmup"] + cfg["steps"], cfg["device"], memory)
    memory.start()
    context = _checkpointing(cfg, diffusion)
    try:
        with torch.inference_mode(False), torch.enable_grad(), context:
            while True:
                model_input = x.clone().requires_grad_(True)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    out = denoise(model_input, sigma, cond)
                out.float().pow(2).mean().backward()
                clock.tick()
    except StopBench:
        pass
    return {**clock.result(cfg["warmup"]), **memory.stop()}


def _checkpointing(cfg: dict[str, Any], diffusion):
    import contextlib

    from comfyui_lora2.lora2.checkpointing import checkpointed, find_blocks

    return checkpointed(find_blocks(diffusion)) if cfg["checkpointing"] else contextlib.nullcontext()


def run_native(cfg: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's TrainLoraNode on the same model and data, fp32 or bf16 as configured."""
    from comfy_extras.nodes_train import TrainLoraNode

    model = _model(cfg)
    lat, conds = _inputs(cfg)
    latent_dicts = [{"samples": lat[i : i + 1]} for i in range(lat.shape[0])]
    positive = [[c["cross_attn"], {k: v for k, v in c.items() if k != "cross_attn"}] for c in conds]
    native_dtype = "fp32" if cfg["compute"] == "float32" else "bf16"
    memory = Memory(cfg["device"])
    clock = StepClock(cfg["warmup"] + cfg["steps"], cfg["device"], memory)
    _install_clock(clock)
    memory.start()
    try:
        TrainLoraNode.execute(
            model=[model],
            latents=latent_dicts,
            positive=[positive],
            batch_size=[1],
            steps=[cfg["node_steps"]],
            grad_accumulation_steps=[1],
            learning_rate=[5e-4],
            rank=[cfg["rank"]],
            optimizer=["AdamW"],
            loss_function=["MSE"],
            seed=[cfg["seed"]],
            training_dtype=[native_dtype],
            lora_dtype=[native_dtype],
            algorithm=["LoRA"],
            gradient_checkpointing=[cfg["checkpointing"]],
            existing_lora=["[None]"],
        )
    except StopBench:
        pass
    return {**clock.result(cfg["warmup"]), **memory.stop()}


def _dataset(cfg: dict[str, Any]):
    from comfyui_lora2.lora2.dataset import CachedDataset, CachedItem, DatasetSpec

    lat, conds = _inputs(cfg)
    side = lat.shape[-1] * 8
    items = [
        CachedItem(Path(f"bench_{i}.png"), "a photo of sks", 1, (side, side), lat[i : i + 1], conds[i])
        for i in range(lat.shape[0])
    ]
    return CachedDataset(items, DatasetSpec(resolution=side, bucketing=False))


def lora2_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """LoRA² Train's widgets at their defaults, except what the configuration sets."""
    from comfyui_lora2.lora2 import LoRA2Config
    from comfyui_lora2.lora2.train import TrainConfig

    lora2, train = LoRA2Config(), TrainConfig()
    return {
        "steps": cfg["node_steps"],
        "batch_size": 1,
        "learning_rate": train.lr,
        "rank_learning_rate": train.nu_lr,
        "optimizer": train.optimizer,
        "init_rank": cfg["rank"],
        "max_rank": cfg.get("max_rank") or cfg["rank"],  # rank: equal size to fixed rank (train_speed.ROOM)
        "targets": cfg["targets"],
        "custom_targets": "",
        "importance_mass": lora2.mass,
        "prior_strength": lora2.prior_strength,
        "seed": cfg["seed"],
        "training_dtype": cfg["compute"],
        "gradient_checkpointing": cfg["checkpointing"],
        "save_every": 0,
        "checkpoint_name": "lora2/bench",
        "resume": "none",
        "mode": "LoRA²" if cfg["adaptive"] else "fixed rank",
    }


def run_lora2(cfg: dict[str, Any]) -> dict[str, Any]:
    """LoRA² Train's ``execute`` as the executor calls it (inside inference mode, like ComfyUI)."""
    import torch

    from comfyui_lora2.nodes.train_node import LoRA2Train

    model = _model(cfg)
    dataset = _dataset(cfg)
    memory = Memory(cfg["device"])
    clock = StepClock(cfg["warmup"] + cfg["steps"], cfg["device"], memory)
    _install_clock(clock)
    memory.start()
    try:
        with torch.inference_mode():
            LoRA2Train.execute(model, dataset, **lora2_settings(cfg))
    except StopBench:
        pass
    return {**clock.result(cfg["warmup"]), **memory.stop(), "stored_dtypes": _stored_dtypes(model)}


def _stored_dtypes(model) -> list[str]:
    """The dtypes the base model's weight matrices are stored in after training (fp8 must stay fp8)."""
    from comfyui_lora2.nodes.comfy.model import base_model

    diffusion = base_model(model).diffusion_model
    return sorted({str(p.dtype).removeprefix("torch.") for p in diffusion.parameters() if p.ndim >= 2})


def _lora_file(cfg: dict[str, Any], model, folder: Path) -> Path:
    """A rank-``rank`` LoRA on every target of ``targets``, saved by LoRA² Save's writer in fp16."""
    import torch

    from comfyui_lora2.lora2.adapter import Adapter, Component
    from comfyui_lora2.lora2.lora_file import save_adapter
    from comfyui_lora2.lora2.targets import select_targets
    from comfyui_lora2.nodes.comfy.model import base_model
    from comfyui_lora2.nodes.comfy.patches import kohya_key_for

    generator = torch.Generator().manual_seed(cfg["seed"] + 3)
    components = {}
    diffusion = base_model(model).diffusion_model
    for name, layer in select_targets(diffusion, cfg["targets"], None, ("linear", "conv2d")):
        weight = layer.weight
        r = min(cfg["rank"], weight.shape[0], weight[0].numel())
        up = torch.randn(weight.shape[0], r, *([1, 1] if weight.dim() == 4 else []), generator=generator) * 1e-2
        down = torch.randn(r, *weight.shape[1:], generator=generator) * 1e-2
        components[name] = Component(up=up, down=down)
    path = folder / "bench.safetensors"
    save_adapter(path, Adapter(components), kohya_key_for(model), dtype=torch.float16)
    return path


def run_apply(cfg: dict[str, Any]) -> dict[str, Any]:
    """Load a LoRA file onto the model and merge it, the stock way or through LoRA² Load + Apply."""
    import comfy.model_management

    model = _model(cfg)
    folder = scratch_dir("lora2_apply_")
    path = _lora_file(cfg, model, folder)
    memory = Memory(cfg["device"])
    memory.start()
    memory.track_start()  # the whole call: loading and merging have no steps to pick one from
    started, cpu = time.perf_counter(), time.process_time()
    if cfg["kind"] == "apply_stock":
        import comfy.sd
        import comfy.utils

        patched, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path)), 1.0, 0.0)
    else:
        from comfyui_lora2.lora2.lora_file import load_adapter
        from comfyui_lora2.nodes.comfy.patches import apply_adapter

        patched = apply_adapter(model, load_adapter(path), 1.0)
    comfy.model_management.load_models_gpu([patched], force_full_load=True)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu  # includes the sampling's cost
    return {
        "step_s": [wall if cfg["device"].startswith("cuda") else cpu],
        "wall_s": [wall],
        "file_mb": path.stat().st_size / 2**20,
        **memory.stop(),
    }


RUNNERS = {
    "floor": run_floor,
    "native": run_native,
    "lora2": run_lora2,
    "apply_stock": run_apply,
    "apply_lora2": run_apply,
}


def main(argv: list[str] | None = None) -> None:
    cfg = json.loads((argv if argv is not None else sys.argv[1:])[0])
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.get("threads", 1)))
    import torch

    torch.set_num_threads(int(cfg.get("threads", 1)))
    torch.manual_seed(cfg["seed"])
    boot_host(cfg["device"], Path(cfg.get("comfy_dir", COMFY_DIR)), Path(cfg.get("stub_dir", TORCHVISION_STUB)))
    import logging
    import warnings

    import torch._dynamo  # a one-time import (+~80 MB) the first optimizer may trigger: not training memory

    logging.disable(logging.WARNING)  # ComfyUI's start-up warnings (torchaudio, ...) are not results
    warnings.filterwarnings("ignore")  # nor is autocast's note that CPU float32 autocast is a no-op
    result = RUNNERS[cfg["kind"]](cfg)
    for key in ("step_s", "wall_s"):
        if result.get(key):
            result[key.replace("_s", "_median")] = statistics.median(result[key])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
