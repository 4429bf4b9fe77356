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

import csv
import hashlib
import io
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from guidance.loading.files import write_text_atomic

__all__ = ["IMAGE_SUFFIXES", "TIMING_FIELDS", "BenchmarkResult", "find_images", "parse_method_options",
           "run_benchmark", "split_methods", "split_operators"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SUMMARY_NAMES = ("summary.md", "summary.csv", "summary.json", "items.csv")
OWN_ENTRIES = frozenset({"benchmark.json", "items", "grids", "plots", "shards", *SUMMARY_NAMES})
TIMING_FIELDS = ("seconds", "peak_memory_gib", "peak_memory_kind")  # differ between runs; all else is reproducible
METRICS = (("psnr", "PSNR (dB)", "higher is better"), ("ssim", "SSIM", "higher is better"),
           ("lpips", "LPIPS", "lower is better"))
FORMAT = "flowsteer-benchmark/1"
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class _Item:
    index: int
    image: str        # image id (sanitised file stem)
    operator: str     # the spec
    slug: str         # the spec as a file-name part
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.image}__{self.slug}__{self.method}"

    @property
    def measurement(self) -> str:
        return f"{self.image}__{self.slug}__measurement.png"


@dataclass
class BenchmarkResult:
    """What one process did: ``summary`` (the contents of summary.json) on process 0, None on the others."""

    out: Path
    summary: dict | None
    computed: int
    skipped: int
    rank: int = 0
    world_size: int = 1


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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.") or "x"


def find_images(folder: str | os.PathLike, limit: int | None = None) -> list[tuple[str, Path]]:
    """(id, path) of the images in ``folder`` sorted by file name, the first ``limit``; a ValueError when there
    is no such folder, no image in it, or two images would share an id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"the images folder {str(folder)!r} does not exist (or is not a folder); check --images")
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: p.name)
    if not files:
        raise ValueError(f"no images in {str(folder)!r}: put PNG, JPEG, BMP, TIFF or WebP files "
                         f"({', '.join(IMAGE_SUFFIXES)}) there")
    files = files[:limit] if limit else files
    ids: dict[str, Path] = {}
    for path in files:
        key = _slug(path.stem)
        if key in ids:
            raise ValueError(f"{ids[key].name!r} and {path.name!r} in {str(folder)!r} would share the result name "
                             f"{key!r}; rename one of them")
        ids[key] = path
    return list(ids.items())


def check_images(found: list[tuple[str, Path]]) -> None:
    """Every benchmark image opens and decodes (PIL's verify, no full load); a ValueError naming the first that
    does not, before any work."""
    from PIL import Image

    for _, path in found:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # PIL raises many kinds for a damaged file
            raise ValueError(f"the benchmark image {str(path)!r} cannot be read ({type(error).__name__}: "
                             f"{str(error).strip().splitlines()[0] if str(error).strip() else 'damaged'}); repair "
                             f"or remove it, then rerun") from None


def remove_stale_parts(out: Path, started: float, age: float = 60.0) -> list[Path]:
    """Remove the temporary ``.*.part`` files that an interrupted write (SIGKILL) left in ``out`` and its
    ``items/`` — those older than this process and than ``age`` seconds, so that no write in progress is touched."""
    removed = []
    now = time.time()
    for folder in (out, out / "items", out / "grids"):
        for part in folder.glob(".*.part") if folder.is_dir() else ():
            try:
                modified = part.stat().st_mtime
                if modified < started and now - modified > age:
                    part.unlink()
                    removed.append(part)
            except OSError:
                pass
    return removed


def _forget_settings(out: Path) -> None:
    """Remove what a failed first run wrote before computing anything (benchmark.json, empty folders)."""
    (out / "benchmark.json").unlink(missing_ok=True)
    for folder in (out / "items", out / "shards", out):
        try:
            folder.rmdir()
        except OSError:
            pass


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _shard(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size) from the arguments, else the RANK / WORLD_SIZE environment variables, else (0, 1)."""
    try:
        rank = int(os.environ.get("RANK", "0")) if rank is None else int(rank)
        world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else int(world_size)
    except ValueError:
        raise ValueError("RANK and WORLD_SIZE must be integers (they are set by accelerate launch / torchrun)") \
            from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"process rank {rank} does not fit {world_size} process(es): need 0 <= RANK < WORLD_SIZE")
    return rank, world_size


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


def _default_device(device: str | None) -> str:
    if device:
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


def _process_start() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except (ImportError, OSError):  # pragma: no cover - psutil ships with accelerate
        return _IMPORTED


_IMPORTED = time.time()


# -- settings -------------------------------------------------------------------------------------------------
def _compare(previous: dict, current: dict, keys: Iterable[str], out: Path) -> None:
    changed = [k for k in keys if k in current and previous.get(k) != current[k]]
    if not changed:
        return

    def show(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    def describe(key: str) -> str:
        if key == "images" and isinstance(previous.get(key), list):
            before = {e.get("file"): e.get("sha256") for e in previous[key] if isinstance(e, dict)}
            now = {e["file"]: e["sha256"] for e in current[key]}
            if list(before) == list(now):
                edited = [name for name in now if before[name] != now[name]]
                return f"images: {', '.join(edited[:3])}{' and more' if len(edited) > 3 else ''} changed"
            return f"images: {show(', '.join(before))} before, {show(', '.join(now))} now"
        return f"{key}: {show(previous.get(key))} before, {show(current[key])} now"

    details = "; ".join(describe(k) for k in changed)
    raise ValueError(f"{str(out)!r} holds a benchmark with other settings ({details}); rerun with the same settings "
                     f"to resume, pass --overwrite to replace it, or choose another --out")


def _check_out(out: Path, settings: dict, overwrite: bool, keys: Iterable[str]) -> None:
    """A ValueError when ``out`` holds something else than this benchmark (unless ``overwrite``)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; choose a folder")
    if overwrite or not out.is_dir():
        return
    record = out / "benchmark.json"
    if record.is_file():
        try:
            previous = json.loads(record.read_text())
        except ValueError:
            raise ValueError(f"{str(record)!r} is not valid JSON; pass --overwrite or choose another --out") from None
        _compare(previous, settings, keys, out)
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_ENTRIES and not p.name.startswith("."))
    if foreign:
        raise ValueError(f"--out {str(out)!r} already holds other files ({foreign[0]!r}"
                         f"{' and more' if len(foreign) > 1 else ''}); choose an empty or new folder, or pass "
                         f"--overwrite")


def _remove_stale(out: Path, keep: set[str]) -> None:
    """With --overwrite: remove this benchmark's earlier outputs that the new run does not rewrite."""
    for name in SUMMARY_NAMES:
        (out / name).unlink(missing_ok=True)
    for folder in ("items", "grids", "plots"):
        for path in (out / folder).glob("*") if (out / folder).is_dir() else ():
            if path.is_file() and path.suffix in (".json", ".png") and f"{folder}/{path.name}" not in keep:
                path.unlink(missing_ok=True)


# -- items ----------------------------------------------------------------------------------------------------
def _load_square(path: Path, size: int) -> torch.Tensor:
    """The image center-cropped to a square and resized to ``size`` x ``size``."""
    from ..restore import read_image, resize_image

    image = read_image(path, "benchmark image")
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return resize_image(image[..., top:top + side, left:left + side], (size, size))


def _read_item(out: Path, item: _Item, fingerprint: str, since: float | None = None) -> dict | None:
    """The item's record when it is complete for these settings (and, with ``since``, written after it)."""
    path = out / "items" / f"{item.name}.json"
    try:
        if since is not None and path.stat().st_mtime < since:
            return None
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    if record.get("status") == "ok":
        if not (out / record["restored"]).is_file():
            return None
    elif record.get("status") != "diverged":
        return None
    return record


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


def _wait_for(out: Path, pending: list[tuple[_Item, str]], since: float | None, started: float,
              progress: bool) -> None:
    """Process 0: poll until the other processes' items are complete; stop when one of them failed."""
    announced = False
    while True:
        pending = [(item, fp) for item, fp in pending if _read_item(out, item, fp, since) is None]
        if not pending:
            return
        for marker in sorted((out / "shards").glob("rank*.failed")) if (out / "shards").is_dir() else ():
            try:
                if marker.stat().st_mtime >= started - 2:
                    raise RuntimeError(f"process {marker.stem[4:]} stopped: {marker.read_text().strip()}; fix it and "
                                       f"rerun the same command to resume")
            except FileNotFoundError:
                continue
        if progress and not announced:
            print(f"flowsteer: waiting for {len(pending)} item(s) from the other processes", file=sys.stderr)
            announced = True
        time.sleep(POLL_SECONDS)


# -- summary --------------------------------------------------------------------------------------------------
def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _group_rows(rows: list[dict], operators: Sequence[str], methods: Sequence[str]) -> list[dict]:
    groups = []
    for operator in operators:
        for method in methods:
            mine = [r for r in rows if r["operator"] == operator and r["method"] == method]
            ok = [r for r in mine if r["status"] == "ok"]
            group: dict[str, Any] = {"operator": operator, "method": method, "n": len(ok),
                                     "diverged": len(mine) - len(ok)}
            for key in ("psnr", "ssim"):
                group[key] = _mean([r[key] for r in ok])
            reasons = [r["lpips"] for r in ok if isinstance(r["lpips"], str)]
            group["lpips"] = reasons[0] if reasons else _mean([r["lpips"] for r in ok])
            group["nfe"] = _mean([r["nfe"] for r in ok])
            group["seconds"] = _mean([r["seconds"] for r in ok])
            group["peak_memory_gib"] = max((r["peak_memory_gib"] for r in ok), default=None)
            group["peak_memory_kind"] = ok[0]["peak_memory_kind"] if ok else None
            groups.append(group)
    return groups


def _cell(value, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return "unavailable" if value.startswith("unavailable") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if digits == 0:
        return f"{value:g}"
    return f"{value:.{digits}f}"


_COLUMNS = (("operator", "operator", None), ("method", "method", None), ("n", "n", None),
            ("diverged", "diverged", None), ("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 4), ("lpips", "LPIPS", 4),
            ("seconds", "time (s)", 2), ("peak_memory_gib", "peak memory (GiB)", 2), ("nfe", "NFE", 0))


def _markdown(summary: dict) -> str:
    settings, groups = summary["settings"], summary["groups"]
    size = settings["size"]
    lines = [f"# Benchmark of {', '.join(settings['methods'])} on {settings['model']}", "",
             (f"{len(settings['images'])} image(s) x {len(settings['operators'])} operator(s) x "
              f"{len(settings['methods'])} method(s), {settings['steps']} steps, seed {settings['seed']}, "
              f"{size}x{size} pixels, {settings['dtype']} on {settings['device']}. Means over the images; peak "
              f"memory is the largest over the images."), "",
             "| " + " | ".join(title for _, title, _ in _COLUMNS) + " |",
             "|" + "|".join("---" if digits is None else "---:" for _, _, digits in _COLUMNS) + "|"]
    for group in groups:
        cells = [str(group[k]) if digits is None else _cell(group[k], digits) for k, _, digits in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    reasons = sorted({g["lpips"] for g in groups if isinstance(g["lpips"], str)})
    if reasons:
        notes.append(f"LPIPS {reasons[0]}")
    kinds = sorted({g["peak_memory_kind"] for g in groups if g["peak_memory_kind"]})
    if kinds:
        notes.append(f"Peak memory: {', '.join(kinds)}.")
    diverged = [r for r in summary["items"] if r["status"] == "diverged"]
    for row in diverged:
        notes.append(f"Diverged: {row['item']}: {row['error']}")
    notes.append("Files: items/ (per-item metrics and images), grids/ (per image: measurement, each method, "
                 "reference; one row per operator), plots/ (bar charts), summary.csv, summary.json, items.csv.")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


def _csv(rows: list[dict], keys: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(keys)
    for row in rows:
        writer.writerow(["unavailable" if isinstance(row.get(k), str) and row[k].startswith("unavailable")
                         else ("" if row.get(k) is None else row[k]) for k in keys])
    return buffer.getvalue()


def _grid_caption(method: str, record: dict) -> str:
    """A restored cell's caption: the method and, below it, its PSNR against the reference from ``record``."""
    psnr = record.get("psnr")
    if record.get("status") == "diverged":
        return f"{method}\ndiverged"
    if isinstance(psnr, (int, float)) and not isinstance(psnr, bool):
        return f"{method}\n{psnr:.2f} dB" if math.isfinite(psnr) else f"{method}\n{psnr} dB"
    return method


def _write_grids(out: Path, settings: dict, images: list[tuple[str, Path]], items: list[_Item],
                 records: dict[str, dict], keep: set[str] | None = None) -> None:
    from tasks.outputs.grid import save_grid
    from tasks.outputs.image_io import load_image

    size, methods = settings["size"], settings["methods"]
    blank = torch.zeros(1, 3, size, size)

    def picture(relative: str | None) -> torch.Tensor:
        if relative and (out / relative).is_file():
            return load_image(out / relative)
        return blank

    by_key = {(it.image, it.operator, it.method): it for it in items}
    for image_id, path in images:
        reference = _load_square(path, size)
        rows, captions = [], []
        for operator in settings["operators"]:
            first = by_key[(image_id, operator, methods[0])]
            measurement = next((records[by_key[(image_id, operator, m)].name].get("measurement") for m in methods
                                if records[by_key[(image_id, operator, m)].name].get("measurement")), None)
            mine = [records[by_key[(image_id, operator, m)].name] for m in methods]
            rows.append([picture(measurement), *(picture(record.get("restored")) for record in mine), reference])
            captions.append([first.slug, *(_grid_caption(m, record) for m, record in zip(methods, mine)),
                             "reference"])
        save_grid(out / "grids" / f"{image_id}.png", rows, captions)


def _write_plots(out: Path, groups: list[dict], operators: Sequence[str], methods: Sequence[str]) -> list[str]:
    from tasks.outputs.plots import save_bar_chart

    written = []
    for key, title, direction in METRICS:
        values = {m: {} for m in methods}
        for group in groups:
            value = group[key]
            values[group["method"]][group["operator"]] = value if isinstance(value, (int, float)) else None
        if not any(v is not None for per in values.values() for v in per.values()):
            continue  # e.g. LPIPS unavailable
        save_bar_chart(out / "plots" / f"{key}.png", f"{title}, {direction}", list(operators), list(methods),
                       values)
        written.append(f"plots/{key}.png")
    return written


def _write_summary(out: Path, settings: dict, images, items: list[_Item], records: dict[str, dict]) -> dict:
    item_keys = ("item", "image", "image_file", "operator", "method", "seed", "status", "error", "psnr", "ssim",
                 "lpips", "nfe", "seconds", "peak_memory_gib", "peak_memory_kind", "restored", "measurement")
    rows = [{k: records[item.name].get(k) for k in item_keys} for item in items]
    groups = _group_rows(rows, settings["operators"], settings["methods"])
    summary = {"settings": settings, "groups": groups, "items": rows}
    _write_grids(out, settings, images, items, records)
    summary["plots"] = _write_plots(out, groups, settings["operators"], settings["methods"])
    summary["grids"] = [f"grids/{image_id}.png" for image_id, _ in images]
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "summary.csv", _csv(groups, [k for k, _, _ in _COLUMNS]))
    write_text_atomic(out / "items.csv", _csv(rows, [k for k in item_keys if k != "error"]))
    write_text_atomic(out / "summary.md", _markdown(summary))
    return summary


# -- the benchmark --------------------------------------------------------------------------------------------
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
                  decoder: Any = None, encoder: Any = None, official_quirks: bool = False) -> BenchmarkResult:
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
    """
    from guidance import get_method
    from operators import make_operator

    from ..restore import allowed_size, check_sampling, open_model

    from .parity import PRESET_ARGUMENTS, image_prompts, preset_run, read_captions

    started = _process_start()
    rank, world_size = _shard(rank, world_size)
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
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"the number of steps must be an integer >= 1, got {num_steps!r}")
    for name, value in (("size", size), ("limit", limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")
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
    out = Path(out)
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
    early = {**settings, **({"size": size} if size is not None else {})}
    _check_out(out, early, overwrite, [k for k in early if k != "format"])

    marker = out / "shards" / f"rank{rank}.failed"  # a failed process > 0 leaves it, which stops process 0's wait
    marker.unlink(missing_ok=True)
    fresh = not (out / "benchmark.json").exists()  # nothing of an earlier run here
    computed = 0
    try:
        net = open_model(model, device=_default_device(device), dtype=dtype, progress=progress, decoder=decoder,
                         encoder=encoder)
        if conditioned and not getattr(net, "takes_text", True) and preset is not None and not user_text:
            # the preset's text settings, not the user's: an unconditional model runs the rest of the setting
            dropped = {k: settings.pop(k) for k in ("prompt", "negative_prompt", "guidance_scale") if k in settings}
            run_extra = {k: v for k, v in run_extra.items() if k not in dropped}
            settings["preset"]["not_applied"] = {**dropped, "reason": f"{_model_label(model)} takes no text"}
            warnings.warn(f"the preset {preset!r} sets {', '.join(dropped)}, which {_model_label(model)!r} does "
                          f"not take (an unconditional model): running without them, recorded as not applied",
                          UserWarning, stacklevel=2)
            conditioned = False
        if size is None:
            size = int(net.default_size[0]) if getattr(net, "default_size", None) else 256
        if allowed_size(net, size, size) != (size, size):
            fit = allowed_size(net, size, size)[0]
            largest = f" up to {net.max_size}" if net.max_size else ""
            raise ValueError(f"--size {size} does not suit {type(net).__name__}: sides must be multiples of "
                             f"{net.size_multiple}{largest}; use e.g. --size {fit}")
        for spec in operators:
            try:
                with torch.no_grad():
                    make_operator(spec)(torch.zeros(1, 3, size, size))
            except ValueError as error:
                raise ValueError(f"the operator {spec!r} does not fit {size}x{size} images: "
                                 f"{str(error).strip().splitlines()[0]}") from None
        settings.update(size=size, dtype=str(getattr(net, "dtype", "")).replace("torch.", ""),
                        device=torch.device(getattr(net, "device", "cpu")).type)
        settings["seeds"] = "image i (sorted by file name) uses seed + 2 i: the measurement noise, then the sampler"
        _check_out(out, settings, overwrite, [k for k in settings if k != "format"])

        items = [_Item(0, key, spec, _slug(spec), method, seed + 2 * i)
                 for i, (key, _) in enumerate(found) for spec in operators for method in methods]
        items = [_Item(n, it.image, it.operator, it.slug, it.method, it.seed) for n, it in enumerate(items)]
        shas = {entry["name"]: entry["sha256"] for entry in settings["images"]}
        fingerprints = {it.name: _fingerprint({
            "model": model_label, "dtype": settings["dtype"], "device": settings["device"], "steps": num_steps,
            "size": size, "image": shas[it.image], "seed": it.seed, "operator": it.operator, "method": it.method,
            "options": settings["options"][it.method], "samples": samples,
            "consistency_steps": settings["consistency_steps"],
            **({"run": {k: v for k, v in run_extra.items() if k not in ("preset", "prompts", "captions")},
                "prompt": prompts[dict(found)[it.image].name]} if run_extra else {})}) for it in items}
        paths = dict(found)
        conds: dict[str, Any] = {}  # one condition per distinct prompt

        out.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            remove_stale_parts(out, started)
            if overwrite:
                keep = {f"items/{it.name}.{ext}" for it in items for ext in ("json", "png")}
                keep |= {f"items/{it.measurement}" for it in items}
                keep |= {f"grids/{key}.png" for key, _ in found}
                _remove_stale(out, keep)
            write_text_atomic(out / "benchmark.json", json.dumps(settings, indent=2) + "\n")

        from tasks.outputs.metrics import lpips_metric

        lpips = lpips_metric(net.device)
        mine = [it for it in items if it.index % world_size == rank]
        computed = skipped = 0
        cache: dict[str, torch.Tensor] = {}
        prefix = f"[rank {rank}] " if world_size > 1 else ""
        for position, item in enumerate(mine, 1):
            if not overwrite and _read_item(out, item, fingerprints[item.name]) is not None:
                skipped += 1
                continue
            if item.image not in cache:
                cache = {item.image: _load_square(paths[item.image], size)}
            cond = None
            if conditioned:
                text = prompts[paths[item.image].name]
                if text not in conds:
                    conds[text] = net.condition(text, **condition)
                cond = conds[text]
            record = _run_item(net, item, cache[item.image], options.get(item.method, {}), num_steps, lpips, out,
                               fingerprints[item.name], paths[item.image].name, samples, consistency_steps,
                               cond=cond, noise_std=noise_std, space=space, objective_options=objective_options)
            computed += 1
            if progress:
                if record["status"] == "ok":
                    note = (f"PSNR {record['psnr']:.2f} dB, SSIM {record['ssim']:.3f}, {record['nfe']} NFE, "
                            f"{record['seconds']:.1f} s")
                else:
                    note = f"diverged ({record['error']})"
                print(f"flowsteer: {prefix}[{position}/{len(mine)}] {item.name}: {note}", file=sys.stderr)
            if on_item is not None:
                on_item(record)
    except BaseException as error:
        if rank != 0:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            write_text_atomic(marker, f"{type(error).__name__}: {message}\n")
        elif fresh and computed == 0:  # e.g. a bad option value: leave nothing, so the corrected rerun is not
            _forget_settings(out)      # refused for "other settings"
        raise
    if rank != 0:
        return BenchmarkResult(out, None, computed, skipped, rank, world_size)

    others = [(it, fingerprints[it.name]) for it in items if it.index % world_size != 0]
    _wait_for(out, others, started - 2 if overwrite else None, started, progress)
    records = {it.name: _read_item(out, it, fingerprints[it.name]) for it in items}
    missing = [name for name, record in records.items() if record is None]
    if missing:
        raise RuntimeError(f"the item {missing[0]!r} is missing from {str(out / 'items')!r}; rerun to resume")
    summary = _write_summary(out, settings, found, items, records)
    shards = out / "shards"
    for old in shards.glob("rank*.failed") if shards.is_dir() else ():  # markers of earlier, failed runs
        old.unlink(missing_ok=True)
    if shards.is_dir() and not any(shards.iterdir()):
        shards.rmdir()
    return BenchmarkResult(out, summary, computed, skipped, rank, world_size)


# -- `flowsteer benchmark` ------------------------------------------------------------------------------------
def run(args) -> int:
    """Run the benchmark and print the summary table."""
    from ..restore import cli_messages

    with cli_messages():
        result = run_benchmark(
            args.images, split_operators(args.operators), split_methods(args.methods), out=args.out,
            model=args.model, num_steps=args.steps, seed=args.seed, size=args.size, limit=args.limit,
            options=parse_method_options(args.option), overwrite=args.overwrite, device=args.device,
            dtype=args.dtype, progress=not args.quiet, samples=args.samples,
            consistency_steps=args.consistency_steps, preset=args.preset, prompt=args.prompt,
            negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale, captions=args.captions,
            noise_std=args.noise_std, decoder=args.decoder, encoder=args.encoder, official_quirks=args.official_quirks)
    done = f"{result.computed} item(s) computed, {result.skipped} already done"
    if result.summary is None:
        print(f"process {result.rank} of {result.world_size}: {done}; process 0 writes the summary")
        return 0
    print((result.out / "summary.md").read_text().split("\n\n")[2])
    print(f"{done}; wrote summary.md, summary.csv, summary.json, items.csv, grids/ and plots/ to {result.out}")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "benchmark", help="benchmark guidance methods on a folder of images (tables, grids, plots)",
        description="Restore every image of a folder with every operator and method (from measurements simulated "
                    "with a per-image seed), score PSNR, SSIM and LPIPS, and write summary tables, grids and bar "
                    "charts into --out. Rerunning resumes; RANK / WORLD_SIZE (accelerate launch, torchrun) shard "
                    "the items over processes.")
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of clean images (PNG, JPEG, ...)")
    parser.add_argument("--preset", metavar="NAME",
                        help="a published setting (flowsteer presets lists them, e.g. flair_sr12): it sets the "
                             "method and its options, steps, operators, noise, model, decoder, size, prompt, "
                             "guidance scale and seed; any of those given here overrides it and is recorded")
    parser.add_argument("--official-quirks", action="store_true",
                        help="with --preset: reproduce what the official code does that flowsteer deliberately does "
                             "not (the preset's quirks: off-centre kernels, re-sampled noise, ...), for parity runs")
    parser.add_argument("--operators", action="append", metavar="SPECS",
                        help="operator specs separated by ';', e.g. 'sr:factor=4;gaussian_blur:sigma=3' (repeatable; "
                             "required without --preset)")
    parser.add_argument("--methods", action="append", metavar="NAMES",
                        help="methods separated by ',', e.g. flair,dps (repeatable; flowsteer methods; required "
                             "without --preset)")
    parser.add_argument("--model", help="hub id, local folder or 'default' (flowsteer models; default: the "
                                        "preset's, else 'default')")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the preset's, else 28)")
    parser.add_argument("--seed", type=int,
                        help="base seed; image i uses seed + 2 i (default: the preset's, else 0)")
    parser.add_argument("--prompt", help="text prompt of every image (text-conditioned models; with --captions, "
                                         "the prefix of each caption)")
    parser.add_argument("--negative-prompt", help="negative prompt (text-conditioned models)")
    parser.add_argument("--guidance-scale", type=float, metavar="W", help="classifier-free guidance scale")
    parser.add_argument("--captions", metavar="FILE",
                        help="a caption per image, one '<image file name>: <caption>' line each; the prompt of an "
                             "image is then '<prompt> <caption>'")
    parser.add_argument("--noise-std", type=float, metavar="S",
                        help="measurement noise std in [-1, 1] units for every operator (default: the operator's)")
    parser.add_argument("--decoder", metavar="ID",
                        help="an autoencoder (hub id or folder, e.g. madebyollin/taesd3) that decodes in place of "
                             "the model's VAE; 'none' keeps the VAE")
    parser.add_argument("--encoder", metavar="ID", help="the same for encoding; 'none' keeps the VAE")
    parser.add_argument("--size", type=int, metavar="N",
                        help="images are center-cropped and resized to N x N (default: the model's size, else 256)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images (sorted by name)")
    parser.add_argument("--option", action="append", metavar="METHOD.KEY=VALUE",
                        help="a method option, e.g. --option flowchef.step_size=0.3 (repeatable)")
    parser.add_argument("--samples", type=int, default=1, metavar="K",
                        help="the mean of K seeds per item (posterior-mean estimate; default 1)")
    parser.add_argument("--consistency-steps", type=int, metavar="N",
                        help="at most N pixel-space Landweber iterations toward A(x) = y per item, stopped at the "
                             "noise level (default: the model's recommendation, else 0)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="skip the items already done (the default; settings must match the earlier run)")
    again.add_argument("--overwrite", action="store_true",
                       help="recompute every item, replacing an earlier benchmark in --out (even with other settings)")
    parser.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="model weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(run=run)
