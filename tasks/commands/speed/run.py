"""The speed benchmark: wall time per image, peak memory and network evaluations (NFE) of every guidance method,
beside unguided sampling with the same backbone, image size and step count, all measured in one run.

    run_speed(["tiny-sd3"], sizes=[64], steps=[4, 8], out="results/speed")
    flowsteer speed --backbones sd3.5-medium,flux-dev --sizes 512,768,1024 --steps 14,28 --out results/speed-gpu

Backbones: ``tiny-sd3`` and ``tiny-flux`` (the tests' random-weight miniatures), ``default`` (flowsteer's embedded
model) and, on a CUDA GPU only, ``sd3.5-medium`` and ``flux-dev``: the full-size architectures with random bf16
weights (the cost of a forward pass does not depend on the weights; see ``tasks.random_models.common``).

Rows (``METHODS``), all on the SR x4 measurement y of a smooth random image:

* ``unguided``: plain Euler sampling, the reference of every ratio;
* ``flowchef-latent``: FlowChef with the latent-space loss ‖M ⊙ (z − E(A⁺y))‖² (no decoder in the loop);
* ``flowchef-pixel``, ``flair``, ``pnp_flow``: the pixel-space loss ‖A(D(z)) − y‖² through the decoder (``tiny``:
  a TAESD-style AutoencoderTiny, ``full``: the model's VAE);
* ``dps``: the contrast, which backpropagates through the transformer at every step.

Protocol. Every cell (backbone x size x steps x method) runs once as a warm-up of ``WARMUP_STEPS`` steps (the same
shapes and kernels as the timed runs: compilation, allocator, caches), then ``repeats`` timed runs; the time per
image is the median run time over the batch. Text embeddings are
computed once per prompt before any timing and reused (the adapters cache them). On CUDA the timed region is
bracketed by ``torch.cuda.synchronize`` and the peak is ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``; on the CPU each cell runs in a fresh process (multiprocessing spawn), so that the
resident-set high-water mark (``ru_maxrss``) is that cell's peak (``isolate=False`` measures CPU cells in this
process, as on CUDA). "Above load" is the peak minus the memory held after the model, condition and objective were
built. Outputs: ``table.md`` and ``results.json``, written atomically again after every row, so that a run stopped
part-way keeps what it measured; a ``time_budget`` leaves the cells it has no time for "not measured". The
full-size random-weight backbones run without the methods' divergence checks (their outputs mean nothing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import difflib
import gc
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from guidance.loading.files import write_text_atomic

from ..restore import max_rss_gib

__all__ = ["BACKBONES", "FULL_SIZE", "METHODS", "TARGETS", "Settings", "open_backbone", "run_speed"]

FORMAT = "flowsteer-speed/1"
OUTPUT_NAMES = ("table.md", "results.json")
BACKBONES = {
    "tiny-sd3": "random-weight SD3 miniature (the tests' architecture), CFG w = 7 as one batched call",
    "tiny-flux": "random-weight FLUX.1-dev miniature (guidance embedding 3.5)",
    "tiny-flux2-klein": "random-weight FLUX.2 [klein] miniature (step-distilled, no CFG)",
    "tiny-qwen-image": "random-weight Qwen-Image miniature (true CFG 4 as one batched call)",
    "default": "flowsteer's embedded default model (trained weights, no text)",
    "sd3.5-medium": "SD3.5-medium architecture, random weights, CFG w = 7 as one batched call (GPU only)",
    "flux-dev": "FLUX.1-dev architecture, random weights, guidance embedding 3.5 (GPU only)",
    "flux2-klein-4b": "FLUX.2 [klein] 4B architecture (step-distilled, no CFG), random weights, full VAE (GPU only)",
    "flux2-klein-9b": "FLUX.2 [klein] 9B architecture (step-distilled, no CFG), random weights, full VAE (GPU only)",
    "qwen-image": "Qwen-Image 20B architecture, random weights, true CFG 4 as one batched call, full VAE (GPU only)",
}
FULL_SIZE = ("sd3.5-medium", "flux-dev", "flux2-klein-4b", "flux2-klein-9b", "qwen-image")
#: image sides each backbone takes are multiples of these (the latent factor times the transformer's patch)
SIZE_MULTIPLES = {"tiny-sd3": 8, "tiny-flux": 16, "default": 16, "sd3.5-medium": 16, "flux-dev": 16,
                  "tiny-flux2-klein": 16, "flux2-klein-4b": 16, "flux2-klein-9b": 16, "tiny-qwen-image": 16, "qwen-image": 16}
#: name -> (registered method, objective space or None, what the row measures)
METHODS = {
    "unguided": ("unguided", None, "plain Euler sampling (the reference of every ratio)"),
    "flowchef-latent": ("flowchef", "latent",
                        "FlowChef, latent loss ‖M ⊙ (z − E(A⁺y))‖², no decoder in the loop"),
    "flowchef-pixel": ("flowchef", "pixel", "FlowChef, pixel loss ‖A(D(z)) − y‖² through the decoder"),
    "flair": ("flair", "pixel", "FLAIR, pixel loss through the decoder, ≤ 15 data steps per step"),
    "pnp_flow": ("pnp_flow", "pixel", "PnP-Flow, pixel loss through the decoder, 2 noise draws per step"),
    "dps": ("dps", "pixel", "DPS, backpropagates through the transformer every step (the contrast)"),
}
OPERATOR = "sr:factor=4"
#: (methods, quantity, limit, what): ratios to unguided that the fast paths aim for.
TARGETS = (
    (("flowchef-latent",), "time", 1.05, "FlowChef with a latent loss: time <= 1.05x unguided"),
    (("flowchef-latent",), "peak_memory", 1.05, "FlowChef with a latent loss: peak memory <= 1.05x unguided"),
    (("flowchef-pixel", "flair"), "time", 1.5, "pixel loss through the tiny decoder: time <= 1.5x unguided"),
)
#: (backbone, row, size, limit in seconds per image, what): absolute times the GPU run aims for.
SECONDS_TARGETS = (
    ("sd3.5-medium", "flair", 768, 4.0,
     "FLAIR on SD3.5-medium at 768², tiny decoder: <= 4 s per image (the paper: about 22 s on an RTX 4090)"),
)
WARMUP_STEPS = 2          # steps of each cell's warm-up run (at most the cell's own)
STEP_MEMORY_LIMIT = 1.05  # peak(most steps) / peak(fewest steps) for "memory independent of steps"
LINEAR_LIMIT = 0.05       # largest residual of t = a + b N, relative to the largest time, for "linear in steps"


@dataclass(frozen=True)
class Settings:
    """How every cell runs (picklable: it travels to the worker processes)."""

    device: str
    dtype: str
    decoder: str = "tiny"
    compile: str = "off"
    vae_tiling: bool = False
    batch_size: int = 1
    repeats: int = 3
    seed: int = 0
    threads: int = 1
    isolate: bool = True
    compile_backend: str | None = None
    options: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"


@dataclass(frozen=True)
class Cell:
    backbone: str
    method: str
    size: int
    steps: int


class CellSkipped(ValueError):
    """A cell (or every cell of its backbone or size) cannot run; ``scope`` says which: cell, size or backbone."""

    def __init__(self, message: str, scope: str = "cell"):
        super().__init__(message)
        self.scope = scope


# -- backbones -----------------------------------------------------------------------------------------------
def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def unavailable(name: str, settings: Settings) -> str | None:
    """Why a backbone cannot run here (None when it can), without building it."""
    if name in FULL_SIZE and not settings.cuda:
        return f"{name} needs a CUDA GPU (full-size random-weight architectures are timed on a GPU only)"
    if name == "default":
        from guidance.backbones.default import DefaultModelError, check_default_model

        try:
            check_default_model()
        except DefaultModelError as error:
            return f"the default model is not installed ({_first_line(error)})"
    return None


def _placed(components: dict, device: str, dtype: torch.dtype) -> dict:
    """The tiny components (built in float32 on the CPU) moved to ``device`` and cast to ``dtype``."""
    if torch.device(device) == torch.device("cpu") and dtype == torch.float32:
        return components
    return {k: v.to(device=device, dtype=dtype) if isinstance(v, torch.nn.Module) else v
            for k, v in components.items()}


def _tiny_decoder(settings: Settings, scale: float, shift: float, latent_channels: int, width: float | None = 1.0,
                  factor: int = 8):
    """A random-weight TAESD-style decoder reading latents with the VAE's ``scale`` and ``shift``: TAESD3 / TAEF1's
    architecture at ``width`` (a fraction of its 64 channels) for a VAE of factor ``factor``, or the tests'
    4-channel one when ``width`` is None."""
    from tasks.random_models.common import taesd16, tiny_taesd

    dtype = getattr(torch, settings.dtype)
    if width is None:
        return _placed({"decoder": tiny_taesd(latent_channels, scale, shift)}, settings.device, dtype)["decoder"]
    return taesd16(scale, shift, width, settings.device, dtype, latent_channels=latent_channels,
                   spatial_factor=factor)


def open_backbone(name: str, settings: Settings) -> tuple[Any, Any, dict]:
    """(model, condition, description) of a backbone with the settings' decoder, compilation and tiling applied.
    The condition is encoded here, once: every cell reuses it (and the adapter caches it)."""
    from tasks.random_models import common as random_common, flux as random_flux, sd3 as random_sd3

    reason = unavailable(name, settings)
    if reason:
        raise CellSkipped(reason, "backbone")
    dtype, device, tiny = getattr(torch, settings.dtype), settings.device, settings.decoder == "tiny"
    if name in ("tiny-sd3", "sd3.5-medium"):
        from guidance.backbones.sd3 import SD3Model

        if name == "tiny-sd3":
            components = _placed(random_sd3.sd3_components(), device, dtype)
        else:
            components = random_sd3.sd35_medium_components(1.0, device, dtype)
        decoder = _tiny_decoder(settings, random_common.SD3_VAE_SCALE, random_common.SD3_VAE_SHIFT,
                                components["vae"].config.latent_channels, None if name == "tiny-sd3" else 1.0) \
            if tiny else None
        model = SD3Model.from_components(decoder=decoder, **components)
        cond = model.condition(random_common.PROMPT, random_common.NEGATIVE, 7.0)
        condition = "prompt and negative prompt encoded once; CFG w = 7 as one batched call"
    elif name in ("tiny-flux", "flux-dev"):
        from guidance.backbones.flux import FluxModel

        if name == "tiny-flux":
            components = _placed(random_flux.flux_components(dev=True), device, dtype)
        else:
            components = random_flux.flux_dev_components(1.0, device, dtype)
        decoder = _tiny_decoder(settings, random_common.FLUX_VAE_SCALE, random_common.FLUX_VAE_SHIFT,
                                components["vae"].config.latent_channels, None if name == "tiny-flux" else 1.0) \
            if tiny else None
        model = FluxModel.from_components(decoder=decoder, **components)
        cond = model.condition(random_common.PROMPT, guidance_scale=3.5)
        condition = "prompt encoded once; guidance embedding 3.5 (no CFG batch)"
    elif name in ("tiny-flux2-klein", "flux2-klein-4b", "flux2-klein-9b"):
        from guidance.backbones.flux2 import Flux2Model

        from tasks.random_models.flux2 import flux2_klein_components, tiny_flux2_components

        components = _placed(tiny_flux2_components("klein"), device, dtype) if name.startswith("tiny") \
            else flux2_klein_components(name.rsplit("-", 1)[1], 1.0, device, dtype)
        model = Flux2Model.from_components(is_distilled=True, **components)
        cond = model.condition(random_common.PROMPT)
        condition = "prompt encoded once; step-distilled, no CFG batch; the full FLUX.2 VAE decodes"
    elif name in ("tiny-qwen-image", "qwen-image"):
        from guidance.backbones.qwen_image import QwenImageModel

        from tasks.random_models.qwen_image import qwen_image_components, tiny_qwen_image_components

        components = _placed(tiny_qwen_image_components(), device, dtype) if name.startswith("tiny") \
            else qwen_image_components(1.0, device, dtype)
        model = QwenImageModel.from_components(**components)
        cond = model.condition(random_common.PROMPT, random_common.NEGATIVE, true_cfg_scale=4.0)
        condition = "prompt and negative prompt encoded once; true CFG 4 as one batched call; the full VAE decodes"
    elif name == "default":
        from guidance import load_model
        from guidance.backbones.autoencoder import LatentCodec, autoencoder_scale_shift

        model = load_model("default", device=device, dtype=dtype)
        if tiny:
            if getattr(model, "codec", None) is None:
                raise CellSkipped("the default model works in pixel space: no decoder to swap; use --decoder full",
                                  "backbone")
            vae = model.codec.autoencoder
            scale, shift = autoencoder_scale_shift(vae)
            narrowest = min(getattr(vae.config, "block_out_channels", None) or (64,))
            width = min(1.0, narrowest / 64)  # never wider than the VAE's own narrowest level
            try:
                decoder = _tiny_decoder(settings, scale, shift, model.codec.latent_channels, width,
                                        model.codec.spatial_factor)
                model.codec = LatentCodec(vae, decoder)
            except ValueError as error:
                raise CellSkipped(f"no TAESD-style decoder fits the default model ({_first_line(error)}); use "
                                  f"--decoder full", "backbone") from None
        cond = None
        condition = "no text (unconditional)"
    else:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    compiled = _compile(model, settings.compile, settings.compile_backend)
    if settings.vae_tiling:
        if not hasattr(model, "enable_vae_tiling"):
            raise CellSkipped(f"{type(model).__name__} has no VAE tiling switch; drop --vae-tiling", "backbone")
        model.enable_vae_tiling()
    network = getattr(model, "transformer", None)
    network = getattr(model, "network", None) if network is None else network
    parameters = sum(p.numel() for p in network.parameters()) if isinstance(network, torch.nn.Module) else None
    codec = getattr(model, "codec", None)
    decoder_name = "none (pixel model)" if codec is None else (
        f"{type(codec.decoder).__name__} ({'tiny' if codec.decoder is not codec.autoencoder else 'full VAE'})")
    info = {"backbone": name, "adapter": type(model).__name__, "network_parameters": parameters,
            "dtype": settings.dtype, "device": str(device), "decoder": decoder_name, "compile": compiled,
            "vae_tiling": settings.vae_tiling, "condition": condition, "description": BACKBONES[name]}
    return model, cond, info


def _compile(model, mode: str, backend: str | None = None) -> str:
    """Apply ``--compile`` (with ``--compile-backend``, torch.compile's default inductor when None) and say what
    was compiled."""
    if mode == "off":
        return "off"
    options = {} if backend is None else {"backend": backend}
    suffix = "" if backend is None else f", backend {backend}"
    if hasattr(model, "compile"):
        model.compile(regional=mode == "regional", **options)
        return f"{mode} (torch.compile{suffix})"
    network = getattr(model, "network", None)
    if isinstance(network, torch.nn.Module):
        network.compile(**options)
        return f"full network (torch.compile{suffix}; no repeated blocks to compile one by one)"
    raise CellSkipped(f"{type(model).__name__} has nothing torch.compile can take; drop --compile", "backbone")


# -- one cell ------------------------------------------------------------------------------------------------
def _objective(space: str | None, model, size: int, seed: int):
    """SR x4 measurement of a smooth random image, as the row's objective (None for unguided)."""
    if space is None:
        return None
    from guidance import MeasurementFidelity
    from operators import make_operator

    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, model.image_channels, max(1, size // 16), max(1, size // 16), generator=generator)
    clean = torch.nn.functional.interpolate(coarse * 1.6 - 0.8, size=(size, size), mode="bicubic").clamp(-1, 1)
    operator = make_operator(OPERATOR)
    y = operator.measure(clean, generator)
    device = torch.device(model.device)
    return MeasurementFidelity(operator.to(device), y.to(device), space=space)


def cell_options(cell: Cell, settings: Settings) -> dict:
    """The options a cell's method runs with: FLAIR gets the default CRW table (no calibration lookup, no
    warning), the full-size random-weight backbones run without divergence checks, then the row's own
    ``settings.options[cell.method]`` (``--option ROW.KEY=VALUE``) on top."""
    from guidance.methods import method_options

    method = METHODS[cell.method][0]
    options = {}
    if method == "flair":
        from guidance.features.calibration import DEFAULT_CRW

        options["crw"] = DEFAULT_CRW
    if cell.backbone in FULL_SIZE and "check_divergence" in method_options(method):
        options["check_divergence"] = False
    return {**options, **settings.options.get(cell.method, {})}


def _run_once(model, cond, cell: Cell, settings: Settings, objective, num_steps: int | None = None):
    from guidance import get_method

    solver = get_method(METHODS[cell.method][0], **cell_options(cell, settings))
    seeds = range(settings.seed, settings.seed + settings.batch_size)
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    return solver(model, objective, num_steps=num_steps or cell.steps, cond=cond, height=cell.size,
                  width=cell.size, generator=generator, batch_size=settings.batch_size, progress=False)


def measure_cell(model, cond, cell: Cell, settings: Settings) -> dict:
    """Time one cell: a warm-up run of ``WARMUP_STEPS`` steps, then ``repeats`` timed runs (the NFE is the first
    timed run's). On CUDA the peak is the allocator's over the timed runs; on the CPU the process's RSS high-water
    mark (meaningful per cell in a fresh process only)."""
    try:
        model.check_size(cell.size, cell.size)
    except ValueError as error:
        raise CellSkipped(f"size too large for the backbone: {_first_line(error)}", "size") from None
    objective = _objective(METHODS[cell.method][1], model, cell.size, settings.seed + 1000)
    device = torch.device(model.device)
    cuda = device.type == "cuda"
    baseline = max_rss_gib()
    begin = time.perf_counter()
    _run_once(model, cond, cell, settings, objective, min(cell.steps, WARMUP_STEPS))  # result dropped at once
    warmup = time.perf_counter() - begin
    if cuda:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device) / 2**30
    seconds, nfe = [], None
    for _ in range(settings.repeats):
        if cuda:
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        result = _run_once(model, cond, cell, settings, objective)
        if cuda:
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - begin)
        nfe = int(result.nfe) if nfe is None else nfe
        del result
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else max_rss_gib()
    return {**asdict(cell), "status": "measured", "batch_size": settings.batch_size, "seconds": seconds,
            "seconds_per_image": statistics.median(seconds) / settings.batch_size, "warmup_seconds": warmup,
            "warmup_steps": min(cell.steps, WARMUP_STEPS),
            "nfe": nfe, "peak_memory_gib": peak, "memory_above_load_gib": max(0.0, peak - baseline),
            "memory_kind": "torch.cuda.max_memory_allocated" if cuda else "process RSS high-water mark"}


def _not_measured(cell: Cell, reason: str) -> dict:
    return {**asdict(cell), "status": "not measured", "reason": reason}


def _fresh_process_cell(cell: Cell, settings: Settings) -> tuple[dict, str, dict | None]:
    """(row, scope of a skip, backbone description) of one cell measured in this (fresh) process."""
    torch.set_num_threads(settings.threads)
    try:
        model, cond, info = open_backbone(cell.backbone, settings)
        return measure_cell(model, cond, cell, settings), "cell", info
    except CellSkipped as error:
        return _not_measured(cell, str(error)), error.scope, None
    except Exception as error:  # the row says why; the other cells still run
        return _not_measured(cell, f"{type(error).__name__}: {_first_line(error)}"), "cell", None


def _in_fresh_process(cell: Cell, settings: Settings) -> tuple[dict, str, dict | None]:
    context = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(_fresh_process_cell, cell, settings).result()
    except concurrent.futures.process.BrokenProcessPool:
        return _not_measured(cell, "the worker process died (out of memory?)"), "cell", None


# -- the run -------------------------------------------------------------------------------------------------
def _choose(names, known, what: str, option: str) -> list[str]:
    chosen = []
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown {what} {name!r}{hint}; {option} takes {', '.join(known)}")
        if name not in chosen:
            chosen.append(name)
    return chosen


def _positive_ints(values, option: str) -> list[int]:
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{option} takes positive integers, got {value!r}")
        if value not in out:
            out.append(value)
    return out


def _settings(device, dtype, decoder, compile, vae_tiling, batch_size, repeats, seed, isolate=True,
              compile_backend=None, options=None) -> Settings:
    from guidance.loading.devices import check_device

    device = str(check_device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if dtype is None:
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype takes float32, bfloat16 or float16, got {dtype!r}")
    if decoder not in ("tiny", "full"):
        raise ValueError(f"--decoder takes tiny or full, got {decoder!r}")
    if compile not in ("off", "regional", "full"):
        raise ValueError(f"--compile takes off, regional or full, got {compile!r}")
    (batch_size,) = _positive_ints([batch_size], "--batch-size")
    (repeats,) = _positive_ints([repeats], "--repeats")
    if compile_backend is not None and not (isinstance(compile_backend, str) and compile_backend.strip()):
        raise ValueError(f"--compile-backend takes a torch.compile backend name (e.g. inductor, eager), "
                         f"got {compile_backend!r}")
    options = {str(row): dict(values) for row, values in (options or {}).items()}
    return Settings(device, dtype, decoder, compile, bool(vae_tiling), batch_size, repeats, int(seed),
                    torch.get_num_threads(), bool(isolate), compile_backend, options)


def _environment(settings: Settings) -> dict:
    import diffusers
    import transformers

    if settings.cuda:
        name = torch.cuda.get_device_name(torch.device(settings.device))
    else:
        name = platform.processor() or platform.machine()
        try:
            name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": settings.device, "device_name": name, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "platform": platform.platform(),
            "torch_threads": settings.threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def _ratio(value, reference) -> float | None:
    if value is None or reference is None or not reference > 0:
        return None
    return value / reference


def add_ratios(rows: list[dict]) -> None:
    """Each measured row's ratios to unguided sampling with the same backbone, size and steps (None without one)."""
    key = lambda row: (row["backbone"], row["size"], row["steps"])  # noqa: E731
    reference = {key(r): r for r in rows if r["method"] == "unguided" and r["status"] == "measured"}
    for row in rows:
        if row["status"] != "measured":
            continue
        ref = reference.get(key(row), {})
        row["ratios"] = {"time": _ratio(row["seconds_per_image"], ref.get("seconds_per_image")),
                         "peak_memory": _ratio(row["peak_memory_gib"], ref.get("peak_memory_gib")),
                         "memory_above_load": _ratio(row["memory_above_load_gib"], ref.get("memory_above_load_gib")),
                         "nfe": _ratio(row["nfe"], ref.get("nfe"))}


def steps_scaling(rows: list[dict]) -> list[dict]:
    """Per backbone, method and size with two or more step counts: the least-squares line t = a + b N (time per
    step b, fixed cost a), its largest residual relative to the largest time (3+ step counts), and the peak memory
    at the most steps over the peak at the fewest."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["status"] == "measured":
            groups.setdefault((row["backbone"], row["method"], row["size"]), []).append(row)
    out = []
    for (backbone, method, size), group in groups.items():
        group = sorted(group, key=lambda r: r["steps"])
        if len(group) < 2:
            continue
        n = [float(r["steps"]) for r in group]
        t = [r["seconds_per_image"] for r in group]
        n_mean, t_mean = statistics.fmean(n), statistics.fmean(t)
        slope = sum((a - n_mean) * (b - t_mean) for a, b in zip(n, t)) / sum((a - n_mean) ** 2 for a in n)
        intercept = t_mean - slope * n_mean
        residual = max(abs(b - (intercept + slope * a)) for a, b in zip(n, t)) / max(t) if len(group) > 2 else None
        out.append({"backbone": backbone, "method": method, "size": size, "steps": [r["steps"] for r in group],
                    "seconds_per_step": slope, "fixed_seconds": intercept, "linear_fit_residual": residual,
                    "memory_ratio_most_to_fewest_steps": _ratio(group[-1]["peak_memory_gib"],
                                                                group[0]["peak_memory_gib"])})
    return out


def check_targets(rows: list[dict], scaling: list[dict], settings: Settings) -> list[dict]:
    """Every target that the measured rows can check, met or missed."""
    decoder = settings.decoder
    out = []
    for row in rows:
        for backbone, method, size, limit, what in SECONDS_TARGETS:
            if (row["backbone"], row["method"], row["size"]) != (backbone, method, size) \
                    or row["status"] != "measured":
                continue
            data_steps = cell_options(Cell(backbone, method, size, row["steps"]), settings).get("data_steps")
            note = "; ".join(part for part in (
                f"data_steps {data_steps}" if data_steps is not None else "data_steps 15 (the default)",
                "" if decoder == "tiny" else "measured with the full VAE") if part)
            out.append({"target": what, "backbone": backbone, "method": method, "size": size,
                        "steps": row["steps"], "value": row["seconds_per_image"], "limit": limit,
                        "met": row["seconds_per_image"] <= limit, "note": note})
        for methods, quantity, limit, what in TARGETS:
            if row["method"] not in methods or row["status"] != "measured":
                continue
            value = row["ratios"][quantity]
            if value is None:
                continue
            note = "" if METHODS[row["method"]][1] != "pixel" or decoder == "tiny" else "measured with the full VAE"
            out.append({"target": what, "backbone": row["backbone"], "method": row["method"], "size": row["size"],
                        "steps": row["steps"], "value": value, "limit": limit, "met": value <= limit, "note": note})
    for entry in scaling:
        where = {"backbone": entry["backbone"], "method": entry["method"], "size": entry["size"],
                 "steps": entry["steps"], "note": ""}
        ratio = entry["memory_ratio_most_to_fewest_steps"]
        if entry["method"] != "dps" and ratio is not None:
            out.append({"target": "peak memory independent of steps (all but DPS)", **where, "value": ratio,
                        "limit": STEP_MEMORY_LIMIT, "met": ratio <= STEP_MEMORY_LIMIT})
        if entry["linear_fit_residual"] is not None:
            out.append({"target": "time linear in steps (largest residual of a + b N / largest time)", **where,
                        "value": entry["linear_fit_residual"], "limit": LINEAR_LIMIT,
                        "met": entry["linear_fit_residual"] <= LINEAR_LIMIT})
    return out


def run_speed(backbones=None, methods=None, sizes=(512, 768, 1024), steps=(10, 20), *, decoder: str = "tiny",
              device: str | None = None, dtype: str | None = None, compile: str = "off", vae_tiling: bool = False,
              batch_size: int = 1, repeats: int = 3, seed: int = 0, out: str | os.PathLike = "speed",
              overwrite: bool = False, progress: bool = True, options: dict[str, dict] | None = None,
              isolate: bool = True, compile_backend: str | None = None, time_budget: float | None = None,
              on_row: Callable[[dict], None] | None = None) -> dict:
    """Measure every backbone x size x steps x method cell and write ``table.md`` and ``results.json`` into
    ``out`` (again after every row); returns the contents of results.json.

    Args:
        backbones: names from ``BACKBONES`` (default: all; the full-size ones are then "not measured" without a
            GPU, while asking for one by name on a machine without a GPU is an error).
        methods: names from ``METHODS`` (default: all); ``unguided`` is always added, as the reference.
        sizes, steps: image sides in pixels and step counts.
        decoder: ``"tiny"`` (a TAESD-style decoder for the pixel losses and the final decode) or ``"full"``.
        device, dtype: default CUDA in bfloat16 when available, else CPU in float32.
        compile: ``"off"``, ``"regional"`` (each repeated transformer block) or ``"full"`` (the whole network).
        vae_tiling: encode and decode on tiles.
        batch_size: images per call (seeds seed, seed + 1, ...); times are per image.
        repeats: timed runs per cell after the warm-up (the median counts).
        options: method options per row name, ``{"flair": {"data_steps": 5}}`` (``--option flair.data_steps=5``).
        isolate: on the CPU, measure each cell in a fresh process (False: in this process, as on CUDA).
        compile_backend: torch.compile's backend (default: inductor).
        time_budget: seconds; cells that would start later than this after the start are "not measured".
        on_row: called with the results so far (the contents results.json then has) after every row.
    """
    settings = _settings(device, dtype, decoder, compile, vae_tiling, batch_size, repeats, seed, isolate,
                         compile_backend, options)
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and time_budget > 0):
        raise ValueError(f"--time-budget takes a positive number of seconds, got {time_budget!r}")
    explicit = backbones is not None
    backbones = _choose(list(BACKBONES) if backbones is None else list(backbones), list(BACKBONES), "backbone",
                        "--backbones")
    if explicit and not settings.cuda:
        for name in backbones:
            if name in FULL_SIZE:
                raise ValueError(f"{name} needs a CUDA GPU: full-size architectures with random weights are built "
                                 f"and timed on a GPU only (device here: {settings.device}); run on a machine with "
                                 f"a GPU or drop {name} from --backbones")
    methods = _choose(list(METHODS) if methods is None else list(methods), list(METHODS), "method", "--methods")
    methods = ["unguided", *(m for m in methods if m != "unguided")]
    stray = sorted(set(settings.options) - set(methods))
    if stray:
        raise ValueError(f"--option given for {stray[0]!r}, which is not among the rows {methods}; write "
                         f"ROW.KEY=VALUE with a row from --methods")
    from guidance import get_method

    for row, values in settings.options.items():  # a bad option is refused before anything is written
        get_method(METHODS[row][0], **values)
    sizes, steps = _positive_ints(list(sizes), "--sizes"), _positive_ints(list(steps), "--steps")
    for backbone in backbones:
        multiple = SIZE_MULTIPLES[backbone]
        for size in sizes:
            if size % multiple:
                low, high = max(multiple, size // multiple * multiple), (size // multiple + 1) * multiple
                raise ValueError(f"--sizes {size}: {backbone} takes image sides that are multiples of {multiple} "
                                 f"(e.g. {low} or {high})")
    from tasks.outputs.folders import prepare_output_dir

    out = prepare_output_dir(out, OUTPUT_NAMES, overwrite)
    environment = _environment(settings)
    deadline = None if time_budget is None else time.monotonic() + time_budget
    rows: list[dict] = []
    described: dict[str, Any] = {}

    def results() -> dict:
        measured = [dict(row) for row in rows]
        add_ratios(measured)
        scaling = steps_scaling(measured)
        return {"format": FORMAT, "environment": environment, "settings": asdict(settings),
                "time_budget_seconds": time_budget, "operator": OPERATOR,
                "methods": {m: METHODS[m][2] for m in methods}, "backbones": dict(described),
                "notes": _notes(settings), "rows": measured, "steps_scaling": scaling,
                "targets": check_targets(measured, scaling, settings)}

    def write(row: dict) -> None:
        rows.append(row)
        current = results()
        write_text_atomic(out / "results.json", json.dumps(current, indent=1) + "\n")
        write_text_atomic(out / "table.md", markdown(current))
        if on_row is not None:
            on_row(current)

    for backbone in backbones:
        cells = [Cell(backbone, m, size, n) for size in sizes for n in steps for m in methods]
        _measure_backbone(backbone, cells, settings, described, progress, write, deadline, time_budget)
    return results()


def _report(row: dict, progress: bool) -> None:
    if not progress:
        return
    what = f"{row['backbone']} {row['size']}px {row['steps']} steps {row['method']}"
    if row["status"] == "measured":
        print(f"speed: {what}: {row['seconds_per_image']:.4g} s/image, peak {row['peak_memory_gib']:.4g} GiB, "
              f"NFE {row['nfe']}", file=sys.stderr)
    else:
        print(f"speed: {what}: not measured: {row['reason']}", file=sys.stderr)


def _measure_here(model, cond, cell: Cell, settings: Settings) -> tuple[dict, str]:
    """(row, scope of a skip) of one cell measured in this process (CUDA)."""
    try:
        return measure_cell(model, cond, cell, settings), "cell"
    except CellSkipped as error:
        return _not_measured(cell, str(error)), error.scope
    except torch.cuda.OutOfMemoryError:
        return _not_measured(cell, "out of GPU memory"), "cell"
    except Exception as error:  # the row says why; the other cells still run
        return _not_measured(cell, f"{type(error).__name__}: {_first_line(error)}"), "cell"
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _measure_backbone(backbone: str, cells: list[Cell], settings: Settings, described: dict, progress: bool,
                      write: Callable[[dict], None], deadline: float | None = None,
                      time_budget: float | None = None) -> None:
    """Every cell of one backbone, each row handed to ``write`` as it completes: in this process (one model for
    all cells) on CUDA or without ``isolate``, else in a fresh process per cell. A skip whose scope is the
    backbone (or a size) skips the rest of it (of that size); past the ``deadline`` every cell is skipped."""

    def emit(row: dict) -> None:
        write(row)
        _report(row, progress)

    reason = unavailable(backbone, settings)
    if reason:
        described[backbone] = {"not measured": reason}
        for cell in cells:
            emit(_not_measured(cell, reason))
        return
    model = cond = None
    here = settings.cuda or not settings.isolate
    if here and not _past(deadline):
        try:
            model, cond, described[backbone] = open_backbone(backbone, settings)
        except Exception as error:
            reason = str(error) if isinstance(error, CellSkipped) else f"{type(error).__name__}: {_first_line(error)}"
            described[backbone] = {"not measured": reason}
            for cell in cells:
                emit(_not_measured(cell, reason))
            return
    skipped = {}
    for cell in cells:
        reason = skipped.get("backbone") or skipped.get(("size", cell.size))
        if _past(deadline):
            reason = f"the time budget of {time_budget:g} s was spent before this cell"
            described.setdefault(backbone, {"not measured": reason})
        if reason:
            row, scope = _not_measured(cell, reason), "cell"
        elif here:
            row, scope = _measure_here(model, cond, cell, settings)
        else:
            row, scope, info = _in_fresh_process(cell, settings)
            if info is not None:
                described.setdefault(backbone, info)
        if scope == "backbone":
            skipped["backbone"] = row["reason"]
            described.setdefault(backbone, {"not measured": row["reason"]})
        elif scope == "size":
            skipped[("size", cell.size)] = row["reason"]
        emit(row)
    del model, cond
    gc.collect()
    if settings.cuda:
        torch.cuda.empty_cache()


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


# -- the table -----------------------------------------------------------------------------------------------
def _notes(settings: Settings) -> list[str]:
    memory = ("torch.cuda.max_memory_allocated over the timed runs (reset_peak_memory_stats first); 'above load' "
              "subtracts the memory allocated before them (weights, embeddings, objective)"
              if settings.cuda else
              "the resident-set high-water mark (ru_maxrss) of a fresh process per cell (multiprocessing spawn); "
              "'above load' subtracts the mark reached once the model, condition and objective were built"
              if settings.isolate else
              "the resident-set high-water mark (ru_maxrss) of this one process, which every cell shares (a mark "
              "never falls: later cells show at least the earlier ones' peak)")
    return [
        "Text embeddings are computed once per prompt, before any timing, and reused across steps, images and "
        "repeats (cached by the adapter); their cost is not in the times. The full-size backbones' text encoders "
        "are one-layer stand-ins with the real output widths for that reason.",
        f"Time: median of {settings.repeats} run(s) after one warm-up run of {WARMUP_STEPS} steps (the same shapes "
        f"and kernels), wall clock per image (batch "
        f"{settings.batch_size}), including the final decode"
        + (", between torch.cuda.synchronize calls." if settings.cuda else "."),
        f"Peak memory: {memory}.",
        f"Measurement: {OPERATOR} of a smooth random image; pixel losses go through the "
        f"{'tiny (TAESD-style) decoder' if settings.decoder == 'tiny' else 'full VAE'}, which also decodes the "
        "final latent. Method settings are each method's defaults; FLAIR uses the default CRW table"
        + "".join(f"; {row}: " + ", ".join(f"{k}={v!r}" for k, v in values.items())
                  for row, values in settings.options.items()) + ".",
        "Full-size backbones (sd3.5-medium, flux-dev) have random bf16 weights: their times and memory are real, "
        "their images are not, so they run without the methods' divergence checks. Solver state is float32 "
        "whatever the backbone's dtype.",
        f"Fast paths: compile {settings.compile}"
        f"{'' if settings.compile_backend is None else f' (backend {settings.compile_backend})'}, VAE tiling {'on' if settings.vae_tiling else 'off'}, batch "
        f"{settings.batch_size}; ratios compare runs made in this one process tree on one machine.",
    ]


def _format(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown(results: dict) -> str:
    """The results as Markdown: one table per backbone, then steps scaling, targets and notes."""
    env = results["environment"]
    lines = ["# flowsteer speed benchmark", "",
             f"{env['date']} · {env['device_name']} ({env['device']}) · torch {env['torch']} · diffusers "
             f"{env['diffusers']} · {env['torch_threads']} torch thread(s) · {results['settings']['dtype']}", ""]
    header = ("| method | size | steps | s / image | × unguided | peak GiB | × unguided | above load GiB "
              "| × unguided | NFE | × unguided |")
    for backbone, info in results["backbones"].items():
        lines.append(f"## {backbone}")
        lines.append("")
        if "not measured" in info:
            lines += [f"not measured: {info['not measured']}", ""]
        else:
            params = info["network_parameters"]
            size = f"{params / 1e6:.4g}M network parameters, " if params else ""
            lines += [f"{info['adapter']}, {size}{info['dtype']} on {info['device']}; decoder {info['decoder']}; "
                      f"compile {info['compile']}; {info['condition']}.", ""]
        lines += [header, "|" + "---|" * 11]
        for row in results["rows"]:
            if row["backbone"] != backbone:
                continue
            first = f"| {row['method']} | {row['size']} | {row['steps']} |"
            if row["status"] != "measured":
                lines.append(f"{first} not measured: {row['reason']} |" + " — |" * 7)
                continue
            r = row["ratios"]
            lines.append(f"{first} {_format(row['seconds_per_image'])} | {_format(r['time'], 3)} | "
                         f"{_format(row['peak_memory_gib'])} | {_format(r['peak_memory'], 3)} | "
                         f"{_format(row['memory_above_load_gib'])} | {_format(r['memory_above_load'], 3)} | "
                         f"{row['nfe']} | {_format(r['nfe'], 3)} |")
        lines.append("")
    if results["steps_scaling"]:
        lines += ["## Steps scaling", "", "| backbone | method | size | steps | s / step | fixed s "
                  "| linear-fit residual | peak (most steps) / peak (fewest) |", "|" + "---|" * 8]
        for s in results["steps_scaling"]:
            lines.append(f"| {s['backbone']} | {s['method']} | {s['size']} | {','.join(map(str, s['steps']))} | "
                         f"{_format(s['seconds_per_step'])} | {_format(s['fixed_seconds'])} | "
                         f"{_format(s['linear_fit_residual'], 3)} | "
                         f"{_format(s['memory_ratio_most_to_fewest_steps'], 3)} |")
        lines.append("")
    if results["targets"]:
        lines += ["## Targets", "", "| target | backbone | method | size | steps | value | limit | met |",
                  "|" + "---|" * 8]
        for t in results["targets"]:
            steps = ",".join(map(str, t["steps"])) if isinstance(t["steps"], list) else t["steps"]
            met = ("yes" if t["met"] else "**no**") + (f" ({t['note']})" if t["note"] else "")
            lines.append(f"| {t['target']} | {t['backbone']} | {t['method']} | {t['size']} | {steps} | "
                         f"{_format(t['value'], 3)} | {t['limit']} | {met} |")
        lines.append("")
    lines += ["## Notes", "", *(f"* {note}" for note in results["notes"]),
              *(f"* {name}: {text}." for name, text in results["methods"].items()), ""]
    return "\n".join(lines)


# -- `flowsteer speed` ---------------------------------------------------------------------------------------
def _names(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _integers(value: str, option: str) -> list[int]:
    try:
        return [int(part) for part in _names(value)]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, e.g. {option} 512,1024; got {value!r}") from None


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table and where it went."""
    from ..benchmark import parse_method_options

    results = run_speed(
        _names(args.backbones) if args.backbones else None, _names(args.methods) if args.methods else None,
        _integers(args.sizes, "--sizes"), _integers(args.steps, "--steps"), decoder=args.decoder,
        device=args.device, dtype=args.dtype, compile=args.compile, vae_tiling=args.vae_tiling,
        batch_size=args.batch_size, repeats=args.repeats, seed=args.seed, out=args.out, overwrite=args.overwrite,
        progress=not args.quiet, options=parse_method_options(args.option), isolate=not args.same_process,
        compile_backend=args.compile_backend, time_budget=args.time_budget)
    print(markdown(results))
    print(f"wrote table.md and results.json to {args.out}")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "speed", help="time and memory of every guidance method against unguided sampling (table + JSON)",
        description="Measure wall time per image, peak memory and NFE of every method beside unguided sampling "
                    "with the same backbone, size and steps, in one run, and write table.md and results.json. "
                    "Full-size SD3.5-medium / FLUX.1-dev architectures (random weights) need a CUDA GPU.")
    parser.add_argument("--backbones", metavar="NAMES",
                        help=f"comma-separated, from {', '.join(BACKBONES)} (default: all; full-size ones need a GPU)")
    parser.add_argument("--methods", metavar="NAMES",
                        help=f"comma-separated, from {', '.join(METHODS)} (default: all; unguided is always run)")
    parser.add_argument("--sizes", default="512,768,1024", metavar="N,N", help="image sides (default 512,768,1024)")
    parser.add_argument("--steps", default="10,20", metavar="N,N", help="step counts (default 10,20)")
    parser.add_argument("--decoder", choices=("tiny", "full"), default="tiny",
                        help="decoder of the pixel losses and the final decode (default tiny)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="backbone dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--compile", nargs="?", const="regional", default="off", choices=("off", "regional", "full"),
                        help="torch.compile the transformer: regional (each repeated block; the default of a bare "
                             "--compile) or full")
    parser.add_argument("--compile-backend", metavar="NAME",
                        help="torch.compile backend (default inductor; eager checks the compiled path quickly)")
    parser.add_argument("--vae-tiling", action="store_true", help="encode and decode on tiles")
    parser.add_argument("--option", action="append", metavar="ROW.KEY=VALUE",
                        help="a method option for one row, e.g. --option flair.data_steps=5 (repeatable)")
    parser.add_argument("--same-process", action="store_true",
                        help="on the CPU, measure every cell in this process (default: a fresh process per cell, "
                             "so that each cell's peak memory is its own)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="leave the cells that would start later than this unmeasured (results so far are "
                             "written after every row)")
    parser.add_argument("--batch-size", type=int, default=1, help="images (seeds) per call (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell after a warm-up (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for table.md and results.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier table.md / results.json")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(run=run)
