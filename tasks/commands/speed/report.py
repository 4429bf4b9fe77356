"""The speed table's report: ratios to unguided sampling, the scaling with the number of steps, the targets each
row meets or misses, the machine it ran on, and ``table.md`` (``results.json`` holds the same and every row)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from guidance.loading.files import write_text_atomic

from .cells import EDIT_PROMPTS, METHODS, OPERATOR, WARMUP_STEPS, Cell, cell_options
from .settings import Settings

__all__ = ["FORMAT", "OUTPUT_NAMES", "TARGETS", "Results", "add_ratios", "check_targets", "markdown", "steps_scaling"]

FORMAT = "flowsteer-speed/1"
OUTPUT_NAMES = ("table.md", "results.json")
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
STEP_MEMORY_LIMIT = 1.05  # peak(most steps) / peak(fewest steps) for "memory independent of steps"
LINEAR_LIMIT = 0.05       # largest residual of t = a + b N, relative to the largest time, for "linear in steps"


class Results:
    """The rows measured so far and what results.json says of them; ``add`` writes results.json and table.md again
    after every row (atomically), so that a run stopped part-way keeps what it measured."""

    def __init__(self, out: Path, settings: Settings, methods: list[str], time_budget: float | None,
                 on_row: Callable[[dict], None] | None = None):
        self.out, self.settings, self.methods, self.time_budget, self.on_row = out, settings, methods, time_budget, on_row
        self.environment = _environment(settings)
        self.rows: list[dict] = []
        self.described: dict[str, Any] = {}  # backbone -> its description, or why it was not measured

    def current(self) -> dict:
        """The contents of results.json: the environment, the settings, every row with its ratios, the scaling
        with the steps and the targets."""
        measured = [dict(row) for row in self.rows]
        add_ratios(measured)
        scaling = steps_scaling(measured)
        return {"format": FORMAT, "environment": self.environment, "settings": asdict(self.settings),
                "time_budget_seconds": self.time_budget, "operator": OPERATOR,
                "methods": {m: METHODS[m][2] for m in self.methods}, "backbones": dict(self.described),
                "notes": _notes(self.settings), "rows": measured, "steps_scaling": scaling,
                "targets": check_targets(measured, scaling, self.settings)}

    def add(self, row: dict) -> None:
        self.rows.append(row)
        current = self.current()
        write_text_atomic(self.out / "results.json", json.dumps(current, indent=1) + "\n")
        write_text_atomic(self.out / "table.md", markdown(current))
        if self.on_row is not None:
            self.on_row(current)


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
    """Each measured row's ratios to unguided sampling with the same backbone, size and steps (None without one);
    rows measured on the CPU also get the ratio of their CPU time."""
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
        if "cpu_seconds_per_image" in row:  # measured on the CPU
            row["ratios"]["cpu_time"] = _ratio(row["cpu_seconds_per_image"], ref.get("cpu_seconds_per_image"))


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


def _notes(settings: Settings) -> list[str]:
    memory = ("torch.cuda.max_memory_allocated over the timed runs (reset_peak_memory_stats first); 'above load' "
              "subtracts the memory allocated before them (weights, embeddings, objective)"
              if settings.cuda else
              "the resident-set high-water mark (ru_maxrss) of a fresh process per cell (multiprocessing spawn); "
              "'above load' subtracts the mark reached once the model, condition and objective were built"
              if settings.isolate else
              "the resident-set high-water mark (ru_maxrss) of this one process, which every cell shares (a mark "
              "never falls: later cells show at least the earlier ones' peak)")
    cpu = [] if settings.cuda else [
        "CPU s / image: the median CPU time (time.process_time: every thread of the measuring process) of the "
        "timed runs, per image, beside their wall time: on a machine shared with other jobs the wall time also "
        "counts the waiting, the CPU time only the computing (with several torch threads it can exceed the wall "
        "time)."]
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
        f"final latent. The editors edit that image (encoded by the full VAE) from {EDIT_PROMPTS[0]!r} to "
        f"{EDIT_PROMPTS[1]!r}, on text-conditioned backbones only. Method settings are each method's defaults; "
        "FLAIR uses the default CRW table"
        + "".join(f"; {row}: " + ", ".join(f"{k}={v!r}" for k, v in values.items())
                  for row, values in settings.options.items()) + ".",
        "Full-size backbones (sd3.5-medium, flux-dev) have random bf16 weights: their times and memory are real, "
        "their images are not, so they run without the methods' divergence checks. Solver state is float32 "
        "whatever the backbone's dtype.",
        f"Fast paths: compile {settings.compile}"
        f"{'' if settings.compile_backend is None else f' (backend {settings.compile_backend})'}, VAE tiling {'on' if settings.vae_tiling else 'off'}, memory profile {settings.memory or 'none'}, batch "
        f"{settings.batch_size}; ratios compare runs made in this one process tree on one machine.",
        *cpu,
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
    cpu = any("cpu_seconds_per_image" in row for row in results["rows"])
    header = ("| method | size | steps | s / image | × unguided |" + (" CPU s / image | × unguided |" if cpu else "")
              + " peak GiB | × unguided | above load GiB | × unguided | NFE | × unguided |")
    columns = 13 if cpu else 11
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
        lines += [header, "|" + "---|" * columns]
        for row in results["rows"]:
            if row["backbone"] != backbone:
                continue
            first = f"| {row['method']} | {row['size']} | {row['steps']} |"
            if row["status"] != "measured":
                lines.append(f"{first} not measured: {row['reason']} |" + " — |" * (columns - 4))
                continue
            r = row["ratios"]
            cpu_cells = (f"{_format(row.get('cpu_seconds_per_image'))} | {_format(r.get('cpu_time'), 3)} | "
                         if cpu else "")
            lines.append(f"{first} {_format(row['seconds_per_image'])} | {_format(r['time'], 3)} | {cpu_cells}"
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
