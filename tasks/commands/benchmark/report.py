"""The benchmark's report, written by process 0 once every item is there: ``summary.json`` (the settings, one row per
operator x method and one per item), ``summary.md`` (the table), ``summary.csv``, ``items.csv``, ``grids/<image>.png``
(per image: the measurement, each method with its PSNR, the reference; one row per operator) and
``plots/<metric>.png`` (a bar chart per metric)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from guidance.loading.files import write_text_atomic

from .state import _Item, _load_square

METRICS = (("psnr", "PSNR (dB)", "higher is better"), ("ssim", "SSIM", "higher is better"),
           ("lpips", "LPIPS", "lower is better"))


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
