"""Benchmark guidance methods on a folder of images: every image x operator x method is restored from a simulated
measurement, scored, and summarised in tables, image grids and bar charts. Resumable and shardable.

    run_benchmark("photos/", ["sr:factor=4", "gaussian_blur:sigma=3"], ["flair", "dps"],
                  model="stabilityai/stable-diffusion-3.5-medium", out="results/bench", num_steps=28)

From the shell (operator specs contain commas, so ``--operators`` separates them with ``;``; ``--operators``
and ``--methods`` may also be repeated)::

    flowsteer benchmark --images photos --operators "sr:factor=4;gaussian_blur:sigma=3" \\
        --methods flair,dps --model stabilityai/stable-diffusion-3.5-medium --out results/bench
    accelerate launch --num_processes 4 -m tasks.commands.benchmark --images photos ...     # 4 GPUs, same arguments
    flowsteer benchmark --preset flair_sr12 --images div2k --captions captions.txt --out results/sr12

A ``--preset`` (``flowsteer presets``) runs a published setting whole (:mod:`tasks.commands.benchmark.parity`); what is
given besides it overrides it and is recorded in the settings as an override.

Protocol. Images (PNG, JPEG, BMP, TIFF, WebP; sorted by name; the first ``limit``) are center-cropped to a square
and resized to ``size`` (bicubic). Image number i uses seed ``seed + 2 i``: :func:`tasks.commands.restore.restore` draws
the measurement noise from that seed (so every method sees the same measurement) and the sampler from the next.

Outputs in ``out``: ``benchmark.json`` (the settings), ``items/<image>__<operator>__<method>.json`` and ``.png``
(metrics and restoration per item) plus ``items/<image>__<operator>__measurement.png``, ``summary.md``,
``summary.csv`` (one row per operator x method: mean PSNR, SSIM, LPIPS, seconds and NFE, max peak memory),
``summary.json`` (those rows plus one row per item), ``items.csv``, ``grids/<image>.png`` (one row per operator:
measurement, each method, reference) and ``plots/<metric>.png``. Every file is written atomically.

Resuming. Rerunning the same command skips the items whose JSON (and images) exist for the same settings, so an
interrupted run finishes with the results of an uninterrupted one. A folder holding a benchmark with other
settings is an error unless ``overwrite`` (which recomputes everything and removes stale outputs).

Sharding. The process rank and count come from the ``RANK`` and ``WORLD_SIZE`` environment variables (set by
``accelerate launch``, ``torchrun`` or by hand; ``LOCAL_RANK`` picks the GPU); no process group is created.
Item i goes to process i % WORLD_SIZE, each process writes only its own items, and process 0 then waits until
every item file is there (polling the folder; a process that fails leaves ``shards/rank<r>.failed``, which
stops the wait) and writes the summary. On CPU-only machines ``accelerate launch --multi_gpu --num_processes 2``
(or ``torchrun --nproc_per_node 2``) starts the processes; accelerate's ``--cpu`` multi-process mode needs MPI.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from guidance.loading.files import write_text_atomic
from operators.checks import MAX_STEPS, check_int, check_seed

from .report import _write_summary
from .state import (FORMAT, BenchmarkResult, _check_out, _fingerprint, _forget_settings, _Item, _jsonable,
                    _load_square, _process_start, _read_item, _remove_stale, _sha, _shard, _slug, _wait_for,
                    check_images, find_images, remove_stale_parts)

__all__ = ["BenchmarkResult", "parse_method_options", "run_benchmark", "split_methods", "split_operators"]


# -- arguments ------------------------------------------------------------------------------------------------
def split_operators(values: str | Iterable[str]) -> list[str]:
    """``"sr:factor=2;gaussian_blur:sigma=1,kernel_size=9"`` (or several such strings) -> a list of specs."""
    values = [values] if isinstance(values, str) else list(values or ())
    return [spec.strip() for value in values for spec in value.split(";") if spec.strip()]


def split_methods(values: str | Iterable[str]) -> list[str]:
    """``"flair,dps"`` (or several such strings) -> a list of method names."""
    values = [values] if isinstance(values, str) else list(values or ())
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def parse_method_options(items: Iterable[str] | None) -> dict[str, dict[str, Any]]:
    """``["flowchef.step_size=0.3", "flair.window=(0,10)"]`` -> ``{"flowchef": {"step_size": 0.3}, ...}``."""
    from ..restore import parse_options

    options: dict[str, dict[str, Any]] = {}
    for item in items or ():
        method, dot, rest = item.partition(".")
        if not dot or not method.strip() or "=" in method:
            raise ValueError(f"--option expects METHOD.KEY=VALUE (e.g. --option flowchef.step_size=0.3), got {item!r}")
        options.setdefault(method.strip(), {}).update(parse_options([rest]))
    return options


# -- the benchmark, step by step ----------------------------------------------------------------------------
def run_benchmark(images: str | os.PathLike, operators: str | Sequence[str] | None = None,
                  methods: str | Sequence[str] | None = None, *, out: str | os.PathLike, model: Any = None,
                  num_steps: int | None = None, seed: int | None = None, size: int | None = None,
                  limit: int | None = None, options: dict[str, dict] | None = None, overwrite: bool = False,
                  device: str | None = None, dtype: Any = None, rank: int | None = None,
                  world_size: int | None = None, progress: bool = True,
                  on_item: Callable[[dict], None] | None = None, samples: int = 1,
                  consistency_steps: int | None = None, preset: str | None = None, prompt: str | None = None,
                  negative_prompt: str | None = None, guidance_scale: float | None = None,
                  captions: str | os.PathLike | None = None, noise_std: float | None = None,
                  decoder: Any = None, encoder: Any = None, official_quirks: bool = False,
                  memory: str | None = None) -> BenchmarkResult:
    """Restore every image in the folder ``images`` with every operator and method, and write the results.

    Args:
        operators: operator specs (a list, or one string separated by ``;``).
        methods: method names (a list, or one comma-separated string).
        model: anything :func:`guidance.load_model` takes (a name or folder keeps the run resumable).
        size: the side of the square images (default: the model's default size, else 256).
        limit: use only the first ``limit`` images (sorted by name).
        options: per-method options, ``{"flowchef": {"step_size": 0.3}}``.
        overwrite: recompute everything, even over a benchmark with other settings.
        rank, world_size: this process's shard (default: the RANK / WORLD_SIZE environment variables).
        on_item: called with each newly computed item's record (e.g. for progress).
        samples, consistency_steps: as in :func:`tasks.commands.restore.restore` (the mean of K seeds; pixel
            consistency, None: the model's recommendation).
        preset: a parity preset (``flowsteer presets``) that sets the method, its options, the steps, the
            operators, the noise, the objective, the model (dtype, decoder, encoder), the size, the prompts, the
            guidance scale and the seed (:func:`tasks.commands.benchmark.parity.preset_run`); every argument given
            explicitly overrides it and is recorded as an override in the settings. ``official_quirks=True`` runs the
            preset's parity variant: the official code's deliberate departures from flowsteer switched on (its
            ``quirks``).
        prompt, negative_prompt, guidance_scale: the text condition of every item (text-conditioned models).
        captions: a caption file (``<image file name>: <caption>`` per line); image i is then restored with the
            prompt ``"<prompt> <caption i>"``.
        noise_std: the measurement noise of every operator (default: each operator's own).
        decoder, encoder: autoencoders replacing the model's VAE to decode / encode (e.g. "madebyollin/taesd3");
            "none" keeps the model's own.
        memory: a memory profile of the model; a run the planner says does not fit is refused before it loads.
    """
    started = _process_start()
    rank, world_size = _shard(rank, world_size)
    device = _default_device(device)  # a device flowsteer cannot run on is refused before any work
    run = _resolve(images, operators, methods, out, model=model, num_steps=num_steps, seed=seed, size=size,
                   limit=limit, options=options, samples=samples, consistency_steps=consistency_steps,
                   preset=preset, prompt=prompt, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                   captions=captions, noise_std=noise_std, dtype=dtype, decoder=decoder, encoder=encoder,
                   official_quirks=official_quirks)  # 1. the arguments, the preset and the images, checked first
    early = {**run.settings, **({"size": run.size} if run.size is not None else {})}
    _check_out(run.out, early, overwrite, [k for k in early if k != "format"])  # 2. this benchmark's folder, or none

    marker = run.out / "shards" / f"rank{rank}.failed"  # a failed process > 0 leaves it, which stops process 0's wait
    marker.unlink(missing_ok=True)
    fresh = not (run.out / "benchmark.json").exists()  # nothing of an earlier run here
    try:
        net = _open_model(run, device, progress, memory)  # 3. the model, and the size and operators it fits
        profile = getattr(net, "memory_profile", None)
        if profile not in (None, "none"):  # quantised or offloaded results resume only under the same profile
            run.settings["memory"] = profile
        _check_out(run.out, run.settings, overwrite, [k for k in run.settings if k != "format"])
        items, fingerprints = _items(run)  # 4. every item, and the fingerprint it resumes by
        _prepare_out(run, items, rank, started, overwrite)  # 5. process 0: stale files out, benchmark.json in
        _compute(run, net, items, fingerprints, rank, world_size, overwrite, progress, on_item)  # 6. this shard
    except BaseException as error:
        if rank != 0:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            write_text_atomic(marker, f"{type(error).__name__}: {message}\n")
        elif fresh and run.computed == 0:  # e.g. a bad option value: leave nothing, so the corrected rerun is not
            _forget_settings(run.out)      # refused for "other settings"
        raise
    if rank != 0:
        return BenchmarkResult(run.out, None, run.computed, run.skipped, rank, world_size)

    records = _collect(run, items, fingerprints, world_size, started, overwrite, progress)  # 7. every shard's items
    summary = _write_summary(run.out, run.settings, run.found, items, records)  # 8. the report
    _clear_shards(run.out)
    return BenchmarkResult(run.out, summary, run.computed, run.skipped, rank, world_size)


# -- 1. the arguments ----------------------------------------------------------------------------------------
@dataclass
class _Run:
    """One benchmark run as its arguments (and its preset) resolve: what every step reads, and what it counts."""

    out: Path
    found: list[tuple[str, Path]]   # (image id, path), sorted by file name
    operators: list[str]
    methods: list[str]
    options: dict[str, dict]
    model: Any
    model_label: str
    dtype: Any
    num_steps: int
    seed: int
    size: int | None                # None: the model's default size, set when it is open
    samples: int
    consistency_steps: int | None
    noise_std: float | None
    decoder: Any
    encoder: Any
    space: str
    objective_options: dict
    preset: str | None
    user_text: bool                 # the user (not a preset) gave a prompt, negative prompt, guidance or captions
    prompts: dict[str, str]         # image file name -> its prompt
    condition: dict[str, Any]       # negative_prompt and guidance_scale of model.condition
    conditioned: bool
    settings: dict[str, Any]        # benchmark.json
    run_extra: dict[str, Any]       # the settings beyond the first format's, only those that are set
    computed: int = 0
    skipped: int = 0


def _resolve(images, operators, methods, out, *, model, num_steps, seed, size, limit, options, samples,
             consistency_steps, preset, prompt, negative_prompt, guidance_scale, captions, noise_std, dtype, decoder,
             encoder, official_quirks) -> _Run:
    """The run of :func:`run_benchmark`'s arguments: the preset applied under the explicit arguments, defaults
    filled in, everything checked (operators, methods and their options, every image readable) before any model
    loads, and the settings that benchmark.json records."""
    from guidance import get_method
    from operators import make_operator

    from ..restore import check_sampling

    from .parity import PRESET_ARGUMENTS, image_prompts, preset_run, read_captions

    operators = split_operators(operators)
    methods = split_methods(methods)
    options = {m: dict(o) for m, o in (options or {}).items()}
    space, objective_options, preset_record = "pixel", {}, None
    user_text = any(v is not None for v in (prompt, negative_prompt, guidance_scale, captions))  # before a preset
    if preset is not None:
        given = dict(model=model, dtype=dtype, decoder=decoder, encoder=encoder, size=size, seed=seed,
                     num_steps=num_steps, prompt=prompt, negative_prompt=negative_prompt,
                     guidance_scale=guidance_scale, noise_std=noise_std)
        arguments, preset_record = preset_run(preset, given, operators, methods, options, official_quirks)
        (model, dtype, decoder, encoder, size, seed, num_steps, prompt, negative_prompt, guidance_scale,
         noise_std) = (arguments[name] for name in PRESET_ARGUMENTS)
        operators, methods, options = arguments["operators"], arguments["methods"], arguments["options"]
        space, objective_options = arguments["space"], arguments["objective_options"]
    elif official_quirks:
        raise ValueError("official_quirks applies to a --preset (the official code's departures it names); give one")
    model = "default" if model is None else model
    num_steps = 28 if num_steps is None else num_steps
    seed = 0 if seed is None else seed
    decoder, encoder = (None if isinstance(a, str) and a.lower() == "none" else a for a in (decoder, encoder))
    check_int(num_steps, "the number of steps (--steps)", 1, MAX_STEPS)
    check_seed(seed, "the seed (--seed)")
    for name, value in (("size", size), ("limit", limit)):
        if value is not None:
            check_int(value, f"--{name}", 1, None)
    if not operators:
        raise ValueError("no operators given: pass e.g. --operators 'sr:factor=4;gaussian_blur:sigma=3', or a "
                         "--preset")
    if not methods:
        raise ValueError("no methods given: pass e.g. --methods flair,dps, or a --preset")
    for kind, names in (("operator", operators), ("method", methods)):
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"the {kind} {twice[0]!r} is listed twice")
    slugs: dict[str, str] = {}
    for spec in operators:  # unknown operators and parameters fail now, before any work
        check_sampling(samples, consistency_steps, make_operator(spec), spec)
        if _slug(spec) in slugs:
            raise ValueError(f"the operators {slugs[_slug(spec)]!r} and {spec!r} would share the result name "
                             f"{_slug(spec)!r}; write one of them differently")
        slugs[_slug(spec)] = spec
    stray = sorted(set(options) - set(methods))
    if stray:
        raise ValueError(f"--option given for {stray[0]!r}, which is not among the methods {methods}")
    for method in methods:
        get_method(method, **options.get(method, {}))
    found = find_images(images, limit)
    check_images(found)  # every image readable before any model loads
    prompts = image_prompts([path.name for _, path in found], prompt,
                            None if captions is None else read_captions(captions))
    condition = {"negative_prompt": negative_prompt, "guidance_scale": guidance_scale}
    conditioned = prompt is not None or captions is not None or any(v is not None for v in condition.values())
    model_label = _model_label(model)
    settings: dict[str, Any] = _jsonable({
        "format": FORMAT, "model": model_label,
        "images": [{"name": key, "file": path.name, "sha256": _sha(path)} for key, path in found],
        "operators": operators, "methods": methods, "options": {m: options.get(m, {}) for m in methods},
        "steps": num_steps, "seed": seed, "limit": limit, "samples": samples,
        "consistency_steps": "the model's recommendation" if consistency_steps is None else consistency_steps})
    run_extra = _jsonable({key: value for key, value in {
        "preset": preset_record, "prompt": prompt, "captions": None if captions is None else str(captions),
        "prompts": {key: prompts[path.name] for key, path in found} if captions is not None else None,
        **condition, "noise_std": noise_std, "decoder": _model_label(decoder) if decoder is not None else None,
        "encoder": _model_label(encoder) if encoder is not None else None,
        "space": space if space != "pixel" else None, "objective": objective_options or None}.items()
        if value is not None})  # only what is set: earlier benchmarks keep resuming
    settings.update(run_extra)
    return _Run(Path(out), found, operators, methods, options, model, model_label, dtype, num_steps, seed, size,
                samples, consistency_steps, noise_std, decoder, encoder, space, objective_options, preset, user_text,
                prompts, condition, conditioned, settings, run_extra)


def _model_label(model: Any) -> str:
    """The model's source, for the settings and the summary title: the --model string (a hub id, 'default'), a
    folder as its absolute path; for a loaded model or pipeline the source it was loaded from, else its class name
    (never an object repr)."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model).expanduser()
        return str(path.resolve()) if path.is_dir() else os.fspath(model)
    for owner in (model, getattr(model, "pipeline", None)):
        source = getattr(owner, "name_or_path", None)
        if isinstance(source, (str, os.PathLike)) and str(source).strip():
            return _model_label(source)
    return type(model).__name__


# -- 3. the model ---------------------------------------------------------------------------------------------
def _open_model(run: _Run, device: str | None, progress: bool, memory: str | None = None):
    """The run's model, on this process's device; the size it restores at (its default size, else 256) checked
    against it and every operator, and the settings completed with the size, dtype and device."""
    from operators import make_operator

    from ..memory_option import preload_profile
    from ..restore import allowed_size, open_model

    planned = None if run.size is None else (run.size, run.size)
    for method in run.methods:  # the same profile must fit every method's run
        memory = preload_profile(run.model, memory, method, planned, run.samples, _default_device(device),
                                 run.dtype, "benchmark item", run.options.get(method), run.space)
    net = open_model(run.model, device=_default_device(device), dtype=run.dtype, progress=progress,
                     decoder=run.decoder, encoder=run.encoder, memory=memory)
    if run.conditioned and not getattr(net, "takes_text", True) and run.preset is not None and not run.user_text:
        # the preset's text settings, not the user's: an unconditional model runs the rest of the setting
        settings = run.settings
        dropped = {k: settings.pop(k) for k in ("prompt", "negative_prompt", "guidance_scale") if k in settings}
        run.run_extra = {k: v for k, v in run.run_extra.items() if k not in dropped}
        settings["preset"]["not_applied"] = {**dropped, "reason": f"{_model_label(run.model)} takes no text"}
        warnings.warn(f"the preset {run.preset!r} sets {', '.join(dropped)}, which {_model_label(run.model)!r} does "
                      f"not take (an unconditional model): running without them, recorded as not applied",
                      UserWarning, stacklevel=3)
        run.conditioned = False
    size = run.size
    if size is None:
        size = run.size = int(net.default_size[0]) if getattr(net, "default_size", None) else 256
    if allowed_size(net, size, size) != (size, size):
        fit = allowed_size(net, size, size)[0]
        largest = f" up to {net.max_size}" if net.max_size else ""
        raise ValueError(f"--size {size} does not suit {type(net).__name__}: sides must be multiples of "
                         f"{net.size_multiple}{largest}; use e.g. --size {fit}")
    for spec in run.operators:
        try:
            with torch.no_grad():
                make_operator(spec)(torch.zeros(1, 3, size, size))
        except ValueError as error:
            raise ValueError(f"the operator {spec!r} does not fit {size}x{size} images: "
                             f"{str(error).strip().splitlines()[0]}") from None
    run.settings.update(size=size, dtype=str(getattr(net, "dtype", "")).replace("torch.", ""),
                        device=torch.device(getattr(net, "device", "cpu")).type)
    run.settings["seeds"] = "image i (sorted by file name) uses seed + 2 i: the measurement noise, then the sampler"
    return net


def _default_device(device: str | None) -> str:
    if device:
        from guidance.loading.devices import check_device

        return str(check_device(device))
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


# -- 4.-5. the items and the folder ---------------------------------------------------------------------------
def _items(run: _Run) -> tuple[list[_Item], dict[str, str]]:
    """Every image x operator x method in order, and each item's fingerprint: what its result depends on, so
    that a rerun resumes exactly the items whose settings did not change."""
    found, settings, run_extra = run.found, run.settings, run.run_extra
    items = [_Item(0, key, spec, _slug(spec), method, run.seed + 2 * i)
             for i, (key, _) in enumerate(found) for spec in run.operators for method in run.methods]
    items = [_Item(n, it.image, it.operator, it.slug, it.method, it.seed) for n, it in enumerate(items)]
    shas = {entry["name"]: entry["sha256"] for entry in settings["images"]}
    fingerprints = {it.name: _fingerprint({
        "model": run.model_label, "dtype": settings["dtype"], "device": settings["device"], "steps": run.num_steps,
        "size": run.size, "image": shas[it.image], "seed": it.seed, "operator": it.operator, "method": it.method,
        "options": settings["options"][it.method], "samples": run.samples,
        "consistency_steps": settings["consistency_steps"],
        **({"run": {k: v for k, v in run_extra.items() if k not in ("preset", "prompts", "captions")},
            "prompt": run.prompts[dict(found)[it.image].name]} if run_extra else {})}) for it in items}
    return items, fingerprints


def _prepare_out(run: _Run, items: list[_Item], rank: int, started: float, overwrite: bool) -> None:
    """The result folder made; process 0 removes what interrupted writes (and, with ``overwrite``, earlier runs)
    left and writes benchmark.json."""
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        remove_stale_parts(out, started)
        if overwrite:
            keep = {f"items/{it.name}.{ext}" for it in items for ext in ("json", "png")}
            keep |= {f"items/{it.measurement}" for it in items}
            keep |= {f"grids/{key}.png" for key, _ in run.found}
            _remove_stale(out, keep)
        write_text_atomic(out / "benchmark.json", json.dumps(run.settings, indent=2) + "\n")


# -- 6. this process's items ----------------------------------------------------------------------------------
def _compute(run: _Run, net, items: list[_Item], fingerprints: dict[str, str], rank: int, world_size: int,
             overwrite: bool, progress: bool, on_item: Callable[[dict], None] | None) -> None:
    """Restore and score this process's share of the items (item i on process i % world_size), skipping those
    already done; counts them in ``run.computed`` and ``run.skipped``."""
    from tasks.outputs.metrics import lpips_metric

    out, paths = run.out, dict(run.found)
    conds: dict[str, Any] = {}  # one condition per distinct prompt
    lpips = lpips_metric(net.device)
    mine = [it for it in items if it.index % world_size == rank]
    run.computed = run.skipped = 0
    cache: dict[str, torch.Tensor] = {}
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    for position, item in enumerate(mine, 1):
        if not overwrite and _read_item(out, item, fingerprints[item.name]) is not None:
            run.skipped += 1
            continue
        if item.image not in cache:
            cache = {item.image: _load_square(paths[item.image], run.size)}
        cond = None
        if run.conditioned:
            text = run.prompts[paths[item.image].name]
            if text not in conds:
                conds[text] = net.condition(text, **run.condition)
            cond = conds[text]
        record = _run_item(net, item, cache[item.image], run.options.get(item.method, {}), run.num_steps, lpips, out,
                           fingerprints[item.name], paths[item.image].name, run.samples, run.consistency_steps,
                           cond=cond, noise_std=run.noise_std, space=run.space,
                           objective_options=run.objective_options)
        run.computed += 1
        if progress:
            if record["status"] == "ok":
                note = (f"PSNR {record['psnr']:.2f} dB, SSIM {record['ssim']:.3f}, {record['nfe']} NFE, "
                        f"{record['seconds']:.1f} s")
            else:
                note = f"diverged ({record['error']})"
            print(f"flowsteer: {prefix}[{position}/{len(mine)}] {item.name}: {note}", file=sys.stderr)
        if on_item is not None:
            on_item(record)


def _run_item(net, item: _Item, image: torch.Tensor, options: dict, num_steps: int, lpips, out: Path,
              fingerprint: str, image_file: str, samples: int = 1, consistency_steps: int | None = None,
              cond: Any = None, noise_std: float | None = None, space: str = "pixel",
              objective_options: dict | None = None) -> dict:
    from guidance import DivergenceError
    from tasks.outputs.image_io import save_image

    from ..restore import restore

    torch.manual_seed(item.seed)  # for methods that draw from the global generator
    record: dict[str, Any] = {"item": item.name, "image": item.image, "image_file": image_file,
                              "operator": item.operator, "method": item.method, "seed": item.seed}
    try:
        result = restore(net, image, item.operator, item.method, simulate=True, num_steps=num_steps, seed=item.seed,
                         options=options, progress=False, lpips=lpips, samples=samples,
                         consistency_steps=consistency_steps, cond=cond, noise_std=noise_std, space=space,
                         objective_options=objective_options)
    except DivergenceError as error:
        record.update(status="diverged", error=str(error).strip().splitlines()[0], restored=None, measurement=None,
                      fingerprint=fingerprint)
        write_text_atomic(out / "items" / f"{item.name}.json", json.dumps(record, indent=2) + "\n")
        return record
    measurement = f"items/{item.measurement}"
    try:
        save_image(result.measurement, out / measurement)
    except ValueError:  # e.g. a measurement that is not an image
        measurement = None
    restored = f"items/{item.name}.png"
    save_image(result.restored, out / restored)
    metrics = result.metrics
    record.update(status="ok", error=None, psnr=metrics["psnr"], ssim=metrics["ssim"], lpips=metrics["lpips"],
                  nfe=metrics["nfe"], seconds=metrics["seconds"], peak_memory_gib=metrics["peak_memory_gib"],
                  peak_memory_kind=metrics["peak_memory_kind"], restored=restored, measurement=measurement,
                  settings=result.settings, fingerprint=fingerprint)
    write_text_atomic(out / "items" / f"{item.name}.json", json.dumps(record, indent=2, default=str) + "\n")
    return record


# -- 7. every shard's items -----------------------------------------------------------------------------------
def _collect(run: _Run, items: list[_Item], fingerprints: dict[str, str], world_size: int, started: float,
             overwrite: bool, progress: bool) -> dict[str, dict]:
    """Process 0: every item's record, once the other processes have written theirs."""
    others = [(it, fingerprints[it.name]) for it in items if it.index % world_size != 0]
    _wait_for(run.out, others, started - 2 if overwrite else None, started, progress)
    records = {it.name: _read_item(run.out, it, fingerprints[it.name]) for it in items}
    missing = [name for name, record in records.items() if record is None]
    if missing:
        raise RuntimeError(f"the item {missing[0]!r} is missing from {str(run.out / 'items')!r}; rerun to resume")
    return records


def _clear_shards(out: Path) -> None:
    """The shards/ folder without the failure markers of earlier runs, removed when empty."""
    shards = out / "shards"
    for old in shards.glob("rank*.failed") if shards.is_dir() else ():  # markers of earlier, failed runs
        old.unlink(missing_ok=True)
    if shards.is_dir() and not any(shards.iterdir()):
        shards.rmdir()
