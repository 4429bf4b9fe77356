"""The benchmark's state on disk: its images, its result folder, resume and shards.

* images: ``find_images`` (sorted by name, ids that never collide), ``check_images`` (every image decodes before
  any work), ``_load_square`` (center-cropped and resized, as every item sees it);
* the result folder: ``benchmark.json`` holds the settings; ``_check_out`` refuses a folder that holds another
  benchmark or other files (unless ``overwrite``), ``_remove_stale`` clears what an overwriting run does not
  rewrite, ``remove_stale_parts`` the temporary files a killed write left, ``_forget_settings`` what a failed
  first run wrote;
* resume: an item is done when ``items/<item>.json`` carries the fingerprint of its settings (``_read_item``);
* shards: ``_shard`` reads RANK / WORLD_SIZE; process 0 waits for the other processes' items (``_wait_for``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "IMAGE_SUFFIXES", "TIMING_FIELDS", "BenchmarkResult", "check_images", "find_images",
           "remove_stale_parts"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SUMMARY_NAMES = ("summary.md", "summary.csv", "summary.json", "items.csv")
OWN_ENTRIES = frozenset({"benchmark.json", "items", "grids", "plots", "shards", *SUMMARY_NAMES})
TIMING_FIELDS = ("seconds", "peak_memory_gib", "peak_memory_kind")  # differ between runs; all else is reproducible
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


# -- images -----------------------------------------------------------------------------------------------------------
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
    from guidance.loading.images import ImageTooLargeError, open_image

    for _, path in found:
        try:
            with open_image(path, "benchmark image") as image:  # a decompression bomb is refused, named
                image.verify()
        except ImageTooLargeError:
            raise
        except Exception as error:  # PIL raises many kinds for a damaged file
            raise ValueError(f"the benchmark image {str(path)!r} cannot be read ({type(error).__name__}: "
                             f"{str(error).strip().splitlines()[0] if str(error).strip() else 'damaged'}); repair "
                             f"or remove it, then rerun") from None


def _load_square(path: Path, size: int) -> torch.Tensor:
    """The image center-cropped to a square and resized to ``size`` x ``size``."""
    from ..restore import read_image, resize_image

    image = read_image(path, "benchmark image")
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return resize_image(image[..., top:top + side, left:left + side], (size, size))


# -- the result folder ------------------------------------------------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


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


# -- shards -----------------------------------------------------------------------------------------------------------
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


def _process_start() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except (ImportError, OSError):  # pragma: no cover - psutil ships with accelerate
        return _IMPORTED


_IMPORTED = time.time()


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
