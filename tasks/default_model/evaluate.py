"""Measure the embedded default model on held-out photos: the figures of its model card.

    python -m tasks.default_model.evaluate --images 2 --sr-images 6   # the model card's figures, into the model folder
    python -m tasks.default_model.evaluate --model DIR --out DIR --images 1 --restore-samples 1 --samples 16  # a quick look
    python -m tasks.default_model.evaluate --images 2 --sr-images 6 --skip guidance,samples --methods pnp_flow  # one method

With ``--methods`` naming some of the four under unchanged settings, the others keep their earlier rows and run
once more on each operator's first image, one sample, for the grid.

Figures (held-out photos of :data:`tasks.default_model.train.HELD_OUT` only, 256x256):

* autoencoder reconstruction PSNR;
* restoration PSNR / SSIM for SR x4, Gaussian deblurring (sigma 2) and box inpainting (a quarter of the image),
  noise std 0.01, with FLAIR, FlowChef, PnP-Flow and DPS against the classical floors (bicubic upsampling, the
  degraded input, a mean-colour fill); each method as it comes, made consistent with the measurement in pixel
  space, and as the consistent mean of several samples; each floor as it is and made consistent;
* classifier guidance: accuracy of the independent ``judge`` classifier on guided samples of each class, against
  unguided samples;
* grids of unconditional samples and of restorations (``samples.png``, ``restorations.png``).

Writes ``evaluation.json`` and ``evaluation.md`` (the tables) next to the grids.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from guidance.features.consistency import pixel_consistency
from guidance.features.rewards import load_classifier, make_guide
from guidance.loading.files import write_text_atomic
from guidance.methods import get_method
from guidance.backbones.default import default_model_dir

from ..commands.restore import restore
from ..outputs.grid import save_grid
from ..outputs.metrics import LpipsUnavailable, psnr, ssim
from .train import CLASSES, HELD_OUT, held_out_images

NOISE_STD = 0.01
#: Benchmark operators: name -> (spec, classical floor).
OPERATORS = {
    "SR x4": (f"sr:factor=4,noise_std={NOISE_STD}", "bicubic"),
    "deblur (Gaussian, sigma 2)": (f"gaussian_blur:sigma=2,noise_std={NOISE_STD}", "degraded input"),
    "box inpainting (1/4)": (f"inpaint_box:fraction=0.25,noise_std={NOISE_STD}", "mean-colour fill"),
}
METHODS = ("flair", "flowchef", "pnp_flow", "dps")
#: Most pixel-consistency iterations (the discrepancy principle stops them earlier: 1-3 for SR x4 and inpainting,
#: tens for deblurring).
CONSISTENCY_STEPS = 100
#: Classifier guidance: scale of −log p(label) and FlowChef's options (the model's restoration recommendations
#: are tuned for measurements, not for classifiers).
GUIDANCE_WEIGHT = 10.0
GUIDANCE_OPTIONS = {"step_size": 2.0}


def classical_floor(name: str, y: torch.Tensor, operator, size: tuple[int, int]) -> torch.Tensor:
    """The floor an image prior must beat: bicubic upsampling (SR), the measurement itself (deblurring) or the
    observed pixels with the hole filled by their mean colour (inpainting)."""
    if name == "bicubic":
        return F.interpolate(y, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
    if name == "degraded input":
        return y.clamp(-1, 1)
    if name == "mean-colour fill":
        mask = operator(torch.ones_like(y))  # A(1) = the 0/1 mask of observed pixels
        mean = (y * mask).sum((-2, -1), keepdim=True) / mask.sum((-2, -1), keepdim=True)
        return (y * mask + mean * (1 - mask)).clamp(-1, 1)
    raise ValueError(f"unknown floor {name!r}")


def _scores(image: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    return {"psnr": float(psnr(image, reference)), "ssim": float(ssim(image, reference))}


def autoencoder_psnr(model, images: torch.Tensor) -> list[float]:
    with torch.no_grad():
        return [float(psnr(model.decode(model.encode(x[None])).clamp(-1, 1), x[None])) for x in images]


def restoration_table(model, images: dict[str, torch.Tensor] | torch.Tensor, methods=METHODS, num_steps: int = 28,
                      seed: int = 0, options: dict | None = None, samples: int = 1,
                      consistency_steps: int = CONSISTENCY_STEPS, grid_only: tuple[str, ...] = ()
                      ) -> tuple[list[dict], list]:
    """One row per image x operator x setting, and grid rows for the first image. ``images``: one stack for every
    operator, or a stack per operator name.

    Settings of each method: its first sample as it comes (``method``), the same made consistent with y in pixel
    space (``method + consistency``) and, with ``samples`` > 1, the mean of the samples made consistent
    (``method, mean of K + consistency``: the posterior-mean estimate). Each floor appears as it is and made
    consistent the same way (for SR, bicubic + consistency is iterative back-projection). Methods in ``grid_only``
    (a subset of ``methods``) run on the first image only, one sample (the same first sample a full run draws),
    for the grid: their rows come from an earlier run (:func:`merge_rows`)."""
    rows, grid = [], []
    for op_name, (spec, floor) in OPERATORS.items():
        stack = images[op_name] if isinstance(images, dict) else images
        operator = _operator(spec)
        for i, image in enumerate(stack):
            x = image[None]

            def add(setting: str, restored: torch.Tensor, **extra) -> None:
                rows.append({"operator": op_name, "image": i, "method": setting, **_scores(restored, x), **extra})
                print(f"{op_name:28s} image {i} {setting:34s} PSNR {rows[-1]['psnr']:6.2f} "
                      f"SSIM {rows[-1]['ssim']:.3f}", flush=True)

            def consistent(image: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return pixel_consistency(image, operator, y, max_steps=consistency_steps)

            for method in methods:
                if method in grid_only and i > 0:
                    continue
                count = 1 if method in grid_only else samples
                result = restore(model, x, spec, method, simulate=True, num_steps=num_steps, seed=seed + i,
                                 options=(options or {}).get(method), progress=False, samples=count,
                                 consistency_steps=0, lpips=LpipsUnavailable("not measured here"))
                timing = {"seconds": result.metrics["seconds"] / count, "nfe": result.metrics["nfe"]}
                first = result.samples[:1]
                first_consistent = consistent(first, result.measurement)
                if method not in grid_only:
                    add(method, first, **timing)
                    add(f"{method} + consistency", first_consistent, **timing)
                if count > 1:
                    mean = consistent(result.samples.mean(0, keepdim=True), result.measurement)
                    add(f"{method}, mean of {samples} + consistency", mean, seconds=result.metrics["seconds"],
                        nfe=result.metrics["nfe"])
                if i == 0:
                    if method == methods[0]:
                        grid.append(([result.measurement], [op_name]))
                    grid[-1][0].append(first_consistent)
                    grid[-1][1].append(f"{method} + cons.")
            baseline = classical_floor(floor, result.measurement, operator, tuple(x.shape[-2:]))
            add(floor, baseline)
            add(f"{floor} + consistency", consistent(baseline, result.measurement))
            if i == 0:
                grid[-1][0].extend([baseline, x])
                grid[-1][1].extend([floor, "reference"])
    return rows, grid


def row_method(row: dict) -> str:
    """The method (or floor) a table row belongs to: ``"pnp_flow, mean of 4 + consistency"`` -> ``"pnp_flow"``."""
    return row["method"].split(",")[0].split(" + ")[0]


def merge_rows(rows: list[dict], previous: list[dict], methods: tuple[str, ...]) -> list[dict]:
    """``rows`` of the methods just run, with the ``previous`` rows of every other guided method (floors are always
    measured anew), ordered by operator, image, then :data:`METHODS` and the floors."""
    kept = [row for row in previous if row_method(row) in METHODS and row_method(row) not in methods]
    operators, order = list(OPERATORS), {name: k for k, name in enumerate(METHODS)}
    return sorted(kept + rows, key=lambda row: (operators.index(row["operator"]), row["image"],
                                                 order.get(row_method(row), len(METHODS))))


def _operator(spec: str):
    from operators import make_operator

    return make_operator(spec)


def summarise(rows: list[dict]) -> dict:
    """Mean PSNR / SSIM per operator and method."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        cell = table.setdefault(row["operator"], {}).setdefault(row["method"], {"psnr": [], "ssim": [], "seconds": []})
        for key in ("psnr", "ssim", "seconds"):
            if key in row:
                cell[key].append(row[key])
    return {op: {m: {k: round(sum(v) / len(v), 4) for k, v in cell.items() if v} for m, cell in methods.items()}
            for op, methods in table.items()}


def classifier_guidance(model, folder: Path, samples: int = 64, method: str = "flowchef", num_steps: int = 28,
                        size: int = 64, seed: int = 0, weight: float = 1.0, options: dict | None = None) -> dict:
    """Judge accuracy on ``samples`` guided samples per class (guided by ``classifier``, judged by ``judge``),
    and the judge's class frequencies on as many unguided samples."""
    judge = load_classifier(str(folder / "judge"))
    names = list(CLASSES)
    options = {**model.recommended_options(method), **(options or {})}
    solver = get_method(method, **options)
    unguided = get_method("unguided")

    def judged(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return judge.logits(images).argmax(1)

    result = {"method": method, "options": options, "weight": weight, "samples_per_class": samples,
              "size": size, "num_steps": num_steps, "per_class": {}}
    tiles = []
    for c, name in enumerate(names):
        guide = make_guide(classifier=str(folder / "classifier"), label=name, weight=weight)
        out = solver(model, guide.objective, num_steps=num_steps, height=size, width=size, batch_size=samples,
                     generator=torch.Generator().manual_seed(seed + c), progress=False)
        images = out.image.detach().clamp(-1, 1)
        accuracy = float((judged(images) == c).float().mean())
        result["per_class"][name] = {"guided_accuracy": accuracy}
        tiles.append([images[j:j + 1] for j in range(min(8, samples))])
        print(f"class {name}: judge accuracy on guided samples {accuracy:.3f}", flush=True)
    base = unguided(model, None, num_steps=num_steps, height=size, width=size, batch_size=samples * len(names),
                    generator=torch.Generator().manual_seed(seed + 100), progress=False).image.clamp(-1, 1)
    counts = torch.bincount(judged(base), minlength=len(names)).float() / base.shape[0]
    for c, name in enumerate(names):
        result["per_class"][name]["unguided_frequency"] = float(counts[c])
    result["mean_guided_accuracy"] = sum(v["guided_accuracy"] for v in result["per_class"].values()) / len(names)
    result["tiles"] = tiles
    return result


def _window_means(values: list[float], every: int) -> list[tuple[int, float]]:
    return [(end, sum(values[end - every:end]) / every) for end in range(every, len(values) + 1, every)]


def training_curves(log: dict, points: int = 10) -> str:
    """The loss curves of ``training_log.json`` as Markdown tables (means over ``points`` equal windows)."""
    lines = []
    autoencoder = log.get("autoencoder")
    if autoencoder:
        every = max(1, len(autoencoder["loss_l1"]) // points)
        psnr_at = {e["step"]: e["held_out_psnr"] for e in autoencoder.get("evaluations", [])}
        lines += [f"Autoencoder ({autoencoder['steps']} steps, batch {autoencoder['batch']}, "
                  f"{autoencoder['minutes']:.0f} min):", "", "| step | L1 (window mean) | held-out PSNR (dB) |",
                  "|---:|---:|---:|"]
        for end, value in _window_means(autoencoder["loss_l1"], every):
            shown = f"{psnr_at[end]:.2f}" if end in psnr_at else ""
            lines.append(f"| {end} | {value:.4f} | {shown} |")
        lines.append("")
    for name, title in (("flow", "Velocity network"), ("classifier", "Guiding classifier"),
                        ("judge", "Judge classifier")):
        record = log.get(name)
        if not record:
            continue
        every = max(1, len(record["loss"]) // points)
        extra = (f", accuracy on fresh held-in crops {record['accuracy_fresh_crops']:.3f}"
                 if "accuracy_fresh_crops" in record else "")
        lines += [f"{title} ({record['steps']} steps, batch {record['batch']}, {record['minutes']:.0f} min{extra}):",
                  "", "| step | loss (window mean) |", "|---:|---:|"]
        lines += [f"| {end} | {value:.4f} |" for end, value in _window_means(record["loss"], every)]
        lines.append("")
    return "\n".join(lines)


def markdown(evaluation: dict) -> str:
    lines = [f"Autoencoder reconstruction PSNR on {evaluation['num_images']} held-out 256x256 images "
             f"({', '.join(HELD_OUT)}): **{evaluation['autoencoder_psnr']:.2f} dB** "
             f"(min {min(evaluation['autoencoder_psnr_each']):.2f}).", ""]
    counts = evaluation.get("restoration_images", {})
    lines += ["| task | method | PSNR (dB) | SSIM | s / image |", "|---|---|---:|---:|---:|"]
    for op, methods in evaluation.get("restoration", {}).items():
        if op in counts:
            lines.append(f"| {op} ({counts[op]} image{'' if counts[op] == 1 else 's'}) | | | | |")
        for method, cell in methods.items():
            seconds = f"{cell['seconds']:.1f}" if "seconds" in cell else "—"
            lines.append(f"| {op} | {method} | {cell['psnr']:.2f} | {cell['ssim']:.3f} | {seconds} |")
    guidance = evaluation.get("classifier_guidance")
    if guidance:
        lines += ["", f"Classifier guidance ({guidance['method']}, {guidance['samples_per_class']} samples per class "
                      f"at {guidance['size']}x{guidance['size']}, judged by the independent classifier):", "",
                  "| class | judge accuracy, guided | judge frequency, unguided |", "|---|---:|---:|"]
        for name, cell in guidance["per_class"].items():
            lines.append(f"| {name} | {cell['guided_accuracy']:.3f} | {cell['unguided_frequency']:.3f} |")
        lines.append(f"| mean | {guidance['mean_guided_accuracy']:.3f} | {1 / len(guidance['per_class']):.3f} |")
    return "\n".join(lines) + "\n"


def method_options(items: list[str] | None) -> dict[str, dict]:
    """``["d_flow:lbfgs_iter=3", ...]`` -> ``{"d_flow": {"lbfgs_iter": 3}}`` (values as ``flowsteer restore
    --option`` reads them)."""
    from tasks.commands.restore import parse_options

    options: dict[str, dict] = {}
    for item in items or ():
        method, sep, setting = item.partition(":")
        if not sep or not method.strip():
            raise SystemExit(f"--option expects METHOD:KEY=VALUE (e.g. d_flow:lbfgs_iter=3), got {item!r}")
        options.setdefault(method.strip(), {}).update(parse_options([setting]))
    return options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.default_model.evaluate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the installed default model)")
    parser.add_argument("--out", default=None, help="where the figures go (default: the model folder)")
    parser.add_argument("--images", type=int, default=None,
                        help="restore only the first N held-out images for deblurring and inpainting")
    parser.add_argument("--sr-images", type=int, default=None,
                        help="restore only the first N held-out images for SR x4 (default: as --images)")
    parser.add_argument("--restore-samples", type=int, default=4,
                        help="samples per restoration, for the posterior-mean rows (1: none)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--samples", type=int, default=64, help="guided samples per class")
    parser.add_argument("--weight", type=float, default=GUIDANCE_WEIGHT, help="classifier guidance weight")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: restoration,guidance,samples")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--option", action="append", metavar="METHOD:KEY=VALUE",
                        help="a method option over the model's recommendation, e.g. d_flow:lbfgs_iter=3 "
                             "(repeatable; recorded in evaluation.json)")
    args = parser.parse_args(argv)
    options = method_options(args.option)
    torch.set_num_threads(args.threads)
    from guidance.loading.models import load_model

    folder = Path(args.model) if args.model else default_model_dir()
    out = Path(args.out) if args.out else folder
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    model = load_model("default") if args.model is None else load_model(str(folder))
    images = held_out_images()
    begin = time.time()
    each = autoencoder_psnr(model, images)
    previous = out / "evaluation.json"  # parts skipped now keep their last figures
    earlier = json.loads(previous.read_text()) if previous.is_file() else {}
    evaluation = {**earlier}
    evaluation.update({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": args.threads,
                       "num_images": int(images.shape[0]), "autoencoder_psnr": sum(each) / len(each),
                       "autoencoder_psnr_each": each, "noise_std": NOISE_STD, "num_steps": args.steps})
    print(f"autoencoder PSNR {evaluation['autoencoder_psnr']:.2f} dB", flush=True)
    if "samples" not in skip:
        samples = get_method("unguided")(model, None, num_steps=args.steps, height=128, width=128, batch_size=16,
                                         generator=torch.Generator().manual_seed(0), progress=False).image
        save_grid(out / "samples.png", [[samples[r * 8 + c:r * 8 + c + 1] for c in range(8)] for r in range(2)])
    if "restoration" not in skip:
        counts = {op: args.sr_images or args.images if op.startswith("SR") else args.images for op in OPERATORS}
        stacks = {op: images[:n] for op, n in counts.items()}
        methods = tuple(args.methods.split(","))
        settings = {"restoration_images": {op: int(stack.shape[0]) for op, stack in stacks.items()},
                    "restore_samples": args.restore_samples, "consistency_steps": CONSISTENCY_STEPS}
        # a subset of the methods, under the same settings: the others keep their rows and join the grid anew
        measured = {row_method(row) for row in earlier.get("restoration_rows", [])}
        same = all(earlier.get(key) == value for key, value in {**settings, "num_steps": args.steps}.items())
        kept = [m for m in METHODS if m not in methods and m in measured] if same else []
        run = tuple(m for m in METHODS if m in methods or m in kept) + tuple(m for m in methods if m not in METHODS)
        evaluation["method_options"] = {**{m: o for m, o in earlier.get("method_options", {}).items()
                                           if m not in methods}, **options}
        rows, grid = restoration_table(model, stacks, run, args.steps, samples=args.restore_samples, options=options,
                                       grid_only=tuple(kept))
        if kept:
            rows = merge_rows(rows, earlier["restoration_rows"], methods)
            print(f"kept the earlier rows of {', '.join(kept)}", flush=True)
        evaluation.update(settings)
        evaluation["restoration"] = summarise(rows)
        evaluation["restoration_rows"] = rows
        save_grid(out / "restorations.png", [r[0] for r in grid], [r[1] for r in grid])
    if "guidance" not in skip:
        guidance = classifier_guidance(model, folder, args.samples, num_steps=args.steps, weight=args.weight,
                                       options=GUIDANCE_OPTIONS)
        tiles = guidance.pop("tiles")
        save_grid(out / "guided_samples.png", tiles, [[name] + [""] * (len(t) - 1) for name, t in zip(CLASSES, tiles)])
        evaluation["classifier_guidance"] = guidance
    evaluation["minutes"] = round((time.time() - begin) / 60, 2)
    write_text_atomic(out / "evaluation.json", json.dumps(evaluation, indent=1) + "\n")
    log = folder / "training_log.json"
    curves = training_curves(json.loads(log.read_text())) if log.is_file() else ""
    write_text_atomic(out / "evaluation.md", markdown(evaluation) + ("\n" + curves if curves else ""))
    print(markdown(evaluation))


if __name__ == "__main__":
    main()
