"""The speed benchmark: wall time per image, peak memory and network evaluations (NFE) of every guidance method,
beside unguided sampling with the same backbone, image size and step count, all measured in one run.

    run_speed(["tiny-sd3"], sizes=[64], steps=[4, 8], out="results/speed")
    flowsteer speed --backbones sd3.5-medium,flux-dev --sizes 512,768,1024 --steps 14,28 --out results/speed-gpu

Backbones: ``tiny-sd3`` and ``tiny-flux`` (the tests' random-weight miniatures), ``default`` (flowsteer's embedded
model) and, on a CUDA GPU only, ``sd3.5-medium`` and ``flux-dev``: the full-size architectures with random bf16
weights (the cost of a forward pass does not depend on the weights; see :mod:`tasks.random_models`).

Rows (``METHODS``), on the SR x4 measurement y of a smooth random image (the editors: on that image):

* ``unguided``: plain Euler sampling, the reference of every ratio;
* ``flowchef-latent``: FlowChef with the latent-space loss ‖M ⊙ (z − E(A⁺y))‖² (no decoder in the loop);
* ``flowchef-pixel``, ``flair``, ``pnp_flow``: the pixel-space loss ‖A(D(z)) − y‖² through the decoder (``tiny``:
  a TAESD-style AutoencoderTiny, ``full``: the model's VAE);
* ``dps``: the contrast, which backpropagates through the transformer at every step;
* the flow solvers (``flowdps``, ``psld``, ``d_flow``, ``ot_ode``, ``ictm``, ``flower``) on the same measurement;
* the editors ``flowedit``, ``rf_inversion`` and ``rf_solver_edit``: that smooth random image edited from "a photo
  of a cat" to "a photo of a dog" with each editor's defaults, on text-conditioned backbones only (elsewhere the
  row says "not measured: needs a text-conditioned model").

Protocol. Every cell (backbone x size x steps x method) runs once as a warm-up of ``WARMUP_STEPS`` steps (the same
shapes and kernels as the timed runs: compilation, allocator, caches), then ``repeats`` timed runs; the time per
image is the median run time over the batch. Text embeddings are
computed once per prompt before any timing (the editors' prompts in their warm-up run) and reused (the adapters
cache them). On CUDA the timed region is
bracketed by ``torch.cuda.synchronize`` and the peak is ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``; on the CPU each cell runs in a fresh process (multiprocessing spawn), so that the
resident-set high-water mark (``ru_maxrss``) is that cell's peak (``isolate=False`` measures CPU cells in this
process, as on CUDA). "Above load" is the peak minus the memory held after the model, condition and objective were
built. On the CPU each timed run's CPU time (``time.process_time``: every thread of the measuring process) is
recorded beside its wall time, so that a figure from a shared machine says how much of it was computing. Outputs:
``table.md`` and ``results.json``, written atomically again after every row, so that a run stopped part-way keeps
what it measured. A ``time_budget`` starts a cell (or opens a backbone) only if its estimated seconds
(:mod:`.estimates`, rescaled by what the run measured so far) fit in what is left, and leaves the others "not
measured". The full-size random-weight backbones run without the methods' divergence checks (their outputs mean
nothing).
"""

from __future__ import annotations

import concurrent.futures
import difflib
import gc
import inspect
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from operators.checks import MAX_STEPS

from .backbones import BACKBONES, FULL_SIZE, SIZE_MULTIPLES, open_backbone, unavailable
from .cells import METHODS, Cell, _not_measured, measure_cell
from .estimates import Estimator
from .report import OUTPUT_NAMES, Results
from .settings import MAX_SIDE, CellSkipped, Settings, _first_line, _positive_ints, _settings

__all__ = ["estimate_speed", "run_speed"]


def run_speed(backbones=None, methods=None, sizes=(512, 768, 1024), steps=(10, 20), *, decoder: str = "tiny",
              device: str | None = None, dtype: str | None = None, compile: str = "off", vae_tiling: bool = False,
              batch_size: int = 1, repeats: int = 3, seed: int = 0, out: str | os.PathLike = "speed",
              overwrite: bool = False, progress: bool = True, options: dict[str, dict] | None = None,
              isolate: bool = True, compile_backend: str | None = None, time_budget: float | None = None,
              on_row: Callable[[dict], None] | None = None, memory: str | None = None) -> dict:
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
        time_budget: seconds; a cell (a backbone: its opening and first cell) starts only if its estimated
            seconds, rescaled by the measured-to-estimated ratio of what the run did so far, fit in what is left of
            them; the others are "not measured" and say so.
        on_row: called with the results so far (the contents results.json then has) after every row.
        memory: a memory profile (:data:`guidance.memory_profiles.PROFILES`) applied to every backbone once it is
            built (before compiling); its peak memory is then the profile's.
    """
    settings = _settings(device, dtype, decoder, compile, vae_tiling, batch_size, repeats, seed, isolate,
                         compile_backend, options, memory)
    backbones, methods, sizes, steps = _check(settings, backbones, methods, sizes, steps, time_budget)  # first
    from tasks.outputs.folders import prepare_output_dir

    out = prepare_output_dir(out, OUTPUT_NAMES, overwrite)
    results = Results(out, settings, methods, time_budget, on_row)  # table.md and results.json after every row
    budget = None if time_budget is None else _Budget(time.monotonic() + time_budget, time_budget)
    estimator = _estimator(settings)
    # What exists now (torch, diffusers, every import) is never a cell's garbage: frozen, the collections after
    # each cell walk only what the run itself allocates (a full walk costs ~1 s per cell in a loaded process).
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        for backbone in backbones:
            cells = [Cell(backbone, m, size, n) for size in sizes for n in steps for m in methods]
            _measure_backbone(backbone, cells, settings, results.described, progress, results.add, budget,
                              estimator)
    finally:
        if freeze:
            gc.unfreeze()
    return results.current()


def estimate_speed(backbones=None, methods=None, sizes=(512, 768, 1024), steps=(10, 20), **arguments) -> float:
    """Prior estimate in seconds of :func:`run_speed` with the same arguments (:mod:`.estimates`: the full-size
    backbones on an H100, the miniatures on one CPU thread), without running or building anything; the
    arguments that do not change the time are accepted and ignored."""
    accepted = inspect.signature(run_speed).parameters
    stray = sorted(set(arguments) - set(accepted))
    if stray:
        raise TypeError(f"estimate_speed() takes run_speed's arguments; {stray[0]!r} is not one of them")
    device = arguments.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = Settings(str(device), "bfloat16", arguments.get("decoder", "tiny"), arguments.get("compile", "off"),
                        repeats=arguments.get("repeats", 3), batch_size=arguments.get("batch_size", 1),
                        isolate=arguments.get("isolate", True) and not any(b in FULL_SIZE for b in backbones or ()),
                        compile_backend=arguments.get("compile_backend"), options=arguments.get("options") or {})
    backbones = _choose(list(BACKBONES) if backbones is None else list(backbones), list(BACKBONES), "backbone",
                        "--backbones")
    methods = _choose(list(METHODS) if methods is None else list(methods), list(METHODS), "method", "--methods")
    methods = ["unguided", *(m for m in methods if m != "unguided")]
    sizes, steps = _positive_ints(list(sizes), "--sizes", MAX_SIDE), _positive_ints(list(steps), "--steps", MAX_STEPS)
    return _estimator(settings).run_seconds(backbones, methods, sizes, steps)


def _estimator(settings: Settings) -> Estimator:
    return Estimator(settings.repeats, settings.batch_size, settings.decoder, settings.compile,
                     settings.compile_backend, settings.options, spawn=not settings.cuda and settings.isolate)


def _check(settings: Settings, backbones, methods, sizes, steps, time_budget) -> tuple[list, list, list, list]:
    """(backbones, methods with unguided first, sizes, steps) checked before anything is written: known names,
    full-size backbones asked for on a GPU only, method options the methods take, sizes each backbone takes."""
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
    sizes, steps = _positive_ints(list(sizes), "--sizes", MAX_SIDE), _positive_ints(list(steps), "--steps", MAX_STEPS)
    for backbone in backbones:
        multiple = SIZE_MULTIPLES[backbone]
        for size in sizes:
            if size % multiple:
                low, high = max(multiple, size // multiple * multiple), (size // multiple + 1) * multiple
                raise ValueError(f"--sizes {size}: {backbone} takes image sides that are multiples of {multiple} "
                                 f"(e.g. {low} or {high})")
    return backbones, methods, sizes, steps


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


# -- measuring --------------------------------------------------------------------------------------------------------
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
    """(row, scope of a skip) of one cell measured in this process (CUDA, or the CPU without ``isolate``)."""
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


@dataclass(frozen=True)
class _Budget:
    """A run's time budget: its ``deadline`` (``time.monotonic``) and its ``seconds``."""

    deadline: float
    seconds: float

    def no_time(self, estimate: float, estimator: Estimator, what: str) -> str | None:
        """Why ``what`` (``estimate`` prior seconds, rescaled by the run so far) does not start now; None when it
        fits in what is left."""
        left, need = self.deadline - time.monotonic(), estimate * estimator.scale
        if need <= left:
            return None
        return (f"the time budget of {self.seconds:g} s had {_seconds(max(left, 0.0))} s left, less than the "
                f"estimated {_seconds(need)} s of {what}")


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.2g}"


def _measure_backbone(backbone: str, cells: list[Cell], settings: Settings, described: dict, progress: bool,
                      write: Callable[[dict], None], budget: _Budget | None, estimator: Estimator) -> None:
    """Every cell of one backbone, each row handed to ``write`` as it completes: in this process (one model for
    all cells) on CUDA or without ``isolate``, else in a fresh process per cell. A skip whose scope is the
    backbone (or a size) skips the rest of it (of that size); with a ``budget``, a cell whose estimate does not
    fit in what is left is skipped (and the backbone, when opening it and its first cell do not fit)."""

    def emit(row: dict) -> None:
        write(row)
        _report(row, progress)

    reason = unavailable(backbone, settings)
    here = settings.cuda or not settings.isolate
    if not reason and here and budget is not None and cells:
        reason = budget.no_time(estimator.open_seconds(backbone) + estimator.cell_seconds(cells[0]), estimator,
                                f"opening {backbone} and its first cell")
    if reason:
        described[backbone] = {"not measured": reason}
        for cell in cells:
            emit(_not_measured(cell, reason))
        return
    model = cond = None
    if here:
        begin = time.monotonic()
        try:
            model, cond, described[backbone] = open_backbone(backbone, settings)
        except Exception as error:
            reason = str(error) if isinstance(error, CellSkipped) else f"{type(error).__name__}: {_first_line(error)}"
            described[backbone] = {"not measured": reason}
            for cell in cells:
                emit(_not_measured(cell, reason))
            return
        opened = time.monotonic() - begin
        described[backbone].update(open_seconds=opened, open_estimated_seconds=estimator.open_seconds(backbone))
        estimator.record(estimator.open_seconds(backbone), opened)
    skipped, sizes = {}, set()
    for cell in cells:
        estimate = estimator.cell_seconds(cell, recompile=here and bool(sizes) and cell.size not in sizes)
        sizes.add(cell.size)
        reason = skipped.get("backbone") or skipped.get(("size", cell.size))
        if not reason and budget is not None:
            reason = budget.no_time(estimate, estimator, "this cell")
            if reason:  # a backbone whose every cell runs in a fresh process is described by its first one
                described.setdefault(backbone, {"not measured": reason})
        begin = time.monotonic()
        if reason:
            row, scope = _not_measured(cell, reason), "cell"
        elif here:
            row, scope = _measure_here(model, cond, cell, settings)
        else:
            row, scope, info = _in_fresh_process(cell, settings)
            if info is not None:
                described.setdefault(backbone, info)
        if row["status"] == "measured":
            row.update(cell_seconds=time.monotonic() - begin, estimated_seconds=estimate)
            estimator.record(estimate, row["cell_seconds"])
        if scope == "backbone":
            skipped["backbone"] = row["reason"]
            described.setdefault(backbone, {"not measured": row["reason"]})
        elif scope == "size":
            skipped[("size", cell.size)] = row["reason"]
        emit(row)
    del model, cond
    if settings.cuda:
        gc.collect()
        torch.cuda.empty_cache()


# -- fresh processes --------------------------------------------------------------------------------------------------
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
