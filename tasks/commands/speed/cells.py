"""One cell of the speed table (backbone x size x steps x method): its settings, its inputs (an SR x4 measurement
of a smooth random image as the objective, or for the editors that image as the source with two prompts) and its
measurement: a warm-up run of ``WARMUP_STEPS`` steps, then ``repeats`` timed runs; on CUDA the peak is the
allocator's over the timed runs, on the CPU the process's RSS high-water mark, and each run's CPU time beside its
wall time."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..restore import max_rss_gib
from .backbones import FULL_SIZE
from .settings import CellSkipped, Settings, _first_line

__all__ = ["EDIT_PROMPTS", "METHODS", "OPERATOR", "Cell", "cell_options", "measure_cell"]

#: name -> (registered method, what the method is given, what the row measures). Given: None (nothing: unguided
#: sampling), "latent" or "pixel" (the SR x4 objective in that space), "edit" (the source image and the prompts
#: ``EDIT_PROMPTS``, plus the seeds' generators) or "deterministic edit" (the same, no generator: an ODE editor).
METHODS = {
    "unguided": ("unguided", None, "plain Euler sampling (the reference of every ratio)"),
    "flowchef-latent": ("flowchef", "latent",
                        "FlowChef, latent loss ‖M ⊙ (z − E(A⁺y))‖², no decoder in the loop"),
    "flowchef-pixel": ("flowchef", "pixel", "FlowChef, pixel loss ‖A(D(z)) − y‖² through the decoder"),
    "flair": ("flair", "pixel", "FLAIR, pixel loss through the decoder, ≤ 15 data steps per step"),
    "pnp_flow": ("pnp_flow", "pixel", "PnP-Flow, pixel loss through the decoder, 2 noise draws per step"),
    "dps": ("dps", "pixel", "DPS, backpropagates through the transformer every step (the contrast)"),
    "flowdps": ("flowdps", "pixel", "FlowDPS, data steps on the clean estimate through the decoder, then re-noising"),
    "psld": ("psld", "pixel", "PSLD (flow port), backpropagates through the transformer and the autoencoder"),
    "d_flow": ("d_flow", "pixel", "D-Flow, L-BFGS on the source noise through the whole ODE (checkpointed steps)"),
    "ot_ode": ("ot_ode", "pixel", "OT-ODE, one vector-Jacobian product through the network per step (pixel models)"),
    "ictm": ("ictm", "pixel", "ICTM, Adam on each step's state with a Hutchinson trace (pixel models)"),
    "flower": ("flower", "pixel", "Flower, a conjugate-gradient projection per step (pixel models)"),
    "flowedit": ("flowedit", "edit", "FlowEdit, no inversion: 2 calls (source and edit prompt) per edited step, the "
                                     "last n_max of the N steps (33/50 of them with CFG, 24/28 guidance-distilled)"),
    "rf_inversion": ("rf_inversion", "edit", "RF-Inversion, the controlled forward ODE then the controlled reverse "
                                             "ODE (eta 0.9 on the first 7/28 of the steps): 2N calls"),
    "rf_solver_edit": ("rf_solver_edit", "deterministic edit",
                       "RF-Solver editing, second-order inversion then second-order sampling: 4N calls"),
}

OPERATOR = "sr:factor=4"
EDIT_PROMPTS = ("a photo of a cat", "a photo of a dog")  # (source, edit) of the editors' rows
EDITS = ("edit", "deterministic edit")                     # what the editors' rows are given
FLOWER_NOISE_STD = 0.01   # the σ Flower's rows assume (the measurement itself is noiseless, as for every row)
WARMUP_STEPS = 2          # steps of each cell's warm-up run (at most the cell's own)


@dataclass(frozen=True)
class Cell:
    backbone: str
    method: str
    size: int
    steps: int


def _smooth_image(channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """A smooth random image (1, channels, size, size) in [-1, 1]: uniform noise on a grid 16 times coarser,
    upsampled bicubically."""
    coarse = torch.rand(1, channels, max(1, size // 16), max(1, size // 16), generator=generator)
    return torch.nn.functional.interpolate(coarse * 1.6 - 0.8, size=(size, size), mode="bicubic").clamp(-1, 1)


def _inputs(given: str | None, model, size: int, seed: int, batch_size: int) -> dict:
    """What the row's method is given besides the common arguments: the objective (the SR x4 measurement of a
    smooth random image in the row's space; None for unguided), or for an editor that image as the source (one per
    image of the batch) with the prompts :data:`EDIT_PROMPTS`."""
    if given is None:
        return {"objective": None}
    from guidance import MeasurementFidelity
    from operators import make_operator

    generator = torch.Generator().manual_seed(seed)
    clean = _smooth_image(model.image_channels, size, generator)
    device = torch.device(model.device)
    if given in EDITS:
        return {"objective": None, "source_image": clean.expand(batch_size, -1, -1, -1).to(device),
                "source_prompt": EDIT_PROMPTS[0], "edit_prompt": EDIT_PROMPTS[1]}
    operator = make_operator(OPERATOR)
    y = operator.measure(clean, generator)
    return {"objective": MeasurementFidelity(operator.to(device), y.to(device), space=given)}


def cell_options(cell: Cell, settings: Settings) -> dict:
    """The options a cell's method runs with: FLAIR gets the default CRW table (no calibration lookup, no
    warning), Flower the noise level :data:`FLOWER_NOISE_STD` (its refinement weighs the data by 1 / σ², and the
    row's measurement is noiseless), the full-size random-weight backbones run without divergence checks, then the row's own
    ``settings.options[cell.method]`` (``--option ROW.KEY=VALUE``) on top."""
    from guidance.methods import method_options

    method = METHODS[cell.method][0]
    options = {}
    if method == "flair":
        from guidance.features.calibration import DEFAULT_CRW

        options["crw"] = DEFAULT_CRW
    if method == "flower":
        options["noise_std"] = FLOWER_NOISE_STD
    if cell.backbone in FULL_SIZE and "check_divergence" in method_options(method):
        options["check_divergence"] = False
    return {**options, **settings.options.get(cell.method, {})}


def _run_once(model, cond, cell: Cell, settings: Settings, inputs: dict, num_steps: int | None = None):
    from guidance import get_method

    method, given, _ = METHODS[cell.method]
    solver = get_method(method, **cell_options(cell, settings))
    seeds = range(settings.seed, settings.seed + settings.batch_size)
    generator = None if given == "deterministic edit" else [torch.Generator().manual_seed(s) for s in seeds]
    cond = None if given in EDITS else cond  # the editors condition on their prompts
    return solver(model, num_steps=num_steps or cell.steps, cond=cond, height=cell.size, width=cell.size,
                  generator=generator, batch_size=settings.batch_size, progress=False, **inputs)


def measure_cell(model, cond, cell: Cell, settings: Settings) -> dict:
    """Time one cell: a warm-up run of ``WARMUP_STEPS`` steps, then ``repeats`` timed runs (the NFE is the first
    timed run's). On CUDA the peak is the allocator's over the timed runs; on the CPU the process's RSS high-water
    mark (meaningful per cell in a fresh process only) and, beside each run's wall time, its CPU time
    (``time.process_time``, every thread of this process): on a shared machine the wall time also counts the
    waiting, the CPU time only the computing."""
    try:
        model.check_size(cell.size, cell.size)
    except ValueError as error:
        raise CellSkipped(f"size too large for the backbone: {_first_line(error)}", "size") from None
    given = METHODS[cell.method][1]
    if given in EDITS and not getattr(model, "takes_text", False):
        raise CellSkipped(f"needs a text-conditioned model (it edits from a source prompt to an edit prompt; "
                          f"{cell.backbone} takes no text)")
    inputs = _inputs(given, model, cell.size, settings.seed + 1000, settings.batch_size)
    device = torch.device(model.device)
    cuda = device.type == "cuda"
    baseline = max_rss_gib()
    begin = time.perf_counter()
    _run_once(model, cond, cell, settings, inputs, min(cell.steps, WARMUP_STEPS))  # result dropped at once
    warmup = time.perf_counter() - begin
    if cuda:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device) / 2**30
    seconds, cpu_seconds, nfe = [], [], None
    for _ in range(settings.repeats):
        if cuda:
            torch.cuda.synchronize(device)
        begin, cpu_begin = time.perf_counter(), time.process_time()
        result = _run_once(model, cond, cell, settings, inputs)
        if cuda:
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - begin)
        cpu_seconds.append(time.process_time() - cpu_begin)
        nfe = int(result.nfe) if nfe is None else nfe
        del result
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else max_rss_gib()
    row = {**asdict(cell), "status": "measured", "batch_size": settings.batch_size, "seconds": seconds,
           "seconds_per_image": statistics.median(seconds) / settings.batch_size, "warmup_seconds": warmup,
           "warmup_steps": min(cell.steps, WARMUP_STEPS),
           "nfe": nfe, "peak_memory_gib": peak, "memory_above_load_gib": max(0.0, peak - baseline),
           "memory_kind": "torch.cuda.max_memory_allocated" if cuda else "process RSS high-water mark"}
    if not cuda:
        row.update(cpu_seconds=cpu_seconds,
                   cpu_seconds_per_image=statistics.median(cpu_seconds) / settings.batch_size)
    return row


def _not_measured(cell: Cell, reason: str) -> dict:
    return {**asdict(cell), "status": "not measured", "reason": reason}
