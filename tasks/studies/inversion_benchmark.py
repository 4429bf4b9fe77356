"""Inversion and editing measured: the README's tables "Inversion round trip" and "Editing on the default model".

    python -m tasks.studies.inversion_benchmark [--size 256] [--edit-size 64] [--json out.json]
        [--skip orders,round_trips,edits --previous earlier.json]

1. Orders on an exact flow: a Gaussian data distribution N(mu, diag(var)) on 1x2x2, whose ODE maps x0 to the noise
   (x0 - mu) / sqrt(var) exactly; the max error of :func:`guidance.invert` at 8 to 64 steps per solver and the
   fitted order (slope of log error against log steps).
2. Round trip on the default model: the held-out photos (:func:`tasks.default_model.train.held_out_images`),
   inverted and sampled back with each solver at equal NFE (28 and 10 network evaluations each way: Euler N steps,
   RF-Solver N/2, FireFlow N-1); PSNR of the round trip against the photo and against the autoencoder's own round
   trip D(E(x)) (the inversion's error alone), and the RMS error of the latent.
3. Editing on the default model: the two held-out central squares (64x64 by default), edited toward the classifier's "texture"
   (weight 1) with inversion_edit, per solver and strength at the default step size (and FireFlow at a 10x step),
   with and without a mask (the band across the middle);
   scored by the independent judge classifier (its probability of "texture") and the mean absolute change to the
   photo outside and inside the band (the autoencoder's round trip is the floor of the change).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from guidance import AnalyticGMMFlow, get_method, invert, load_model, sample
from guidance.features.rewards import make_guide
from guidance.loading.files import write_text_atomic
from guidance.solvers import SOLVERS, evaluations

SOLVER_NAMES = tuple(SOLVERS)
LABEL = "texture"
STRENGTHS = (0.4, 0.6, 0.8, 1.0)
DEFAULT_STEP = 0.3   # inversion_edit's default step size (chosen on the held-in astronaut photo)
STRONG_STEP = 3.0


def _steps_for(solver: str, nfe: int) -> int:
    """Steps of ``solver`` that cost ``nfe`` evaluations."""
    return {"euler": nfe, "rf_solver": nfe // 2, "fireflow": nfe - 1}[solver]


def orders(steps=(8, 16, 32, 64)) -> list[dict]:
    variances = torch.tensor([0.1, 0.3, 0.6, 1.0], dtype=torch.float64)
    mean = torch.tensor([0.2, -0.1, 0.3, 0.0], dtype=torch.float64)
    flow = AnalyticGMMFlow([1.0], mean[None], torch.diag(variances)[None], (1, 2, 2))
    x0 = flow.sample_prior(64, torch.Generator().manual_seed(0))
    truth = ((x0.double().flatten(1) - mean) / variances.sqrt()).reshape(x0.shape)
    rows = []
    for solver in SOLVER_NAMES:
        errors = [(invert(flow, latents=x0, num_steps=n, solver=solver, progress=False).noise.double() - truth)
                  .abs().max().item() for n in steps]
        order = -float(np.polyfit(np.log(steps), np.log(errors), 1)[0])
        rows.append({"solver": solver, "steps": list(steps), "errors": errors, "order": order})
    return rows


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")


def round_trips(model, images: torch.Tensor, budgets=(28, 10)) -> list[dict]:
    rows = []
    with torch.no_grad():
        reconstruction = model.decode(model.encode(images)).clamp(-1, 1)
    for nfe in budgets:
        for solver in SOLVER_NAMES:
            n = _steps_for(solver, nfe)
            begin = time.perf_counter()
            psnr, psnr_ae, latent = [], [], []
            for image, floor in zip(images, reconstruction):
                inverted = invert(model, image[None], num_steps=n, solver=solver, progress=False)
                back = sample(model, latents=inverted.noise, num_steps=n, solver=solver, progress=False)
                psnr.append(_psnr(back.image, image[None]))
                psnr_ae.append(_psnr(back.image, floor[None]))
                latent.append((back.x - inverted.latent).pow(2).mean().sqrt().item())
            rows.append({"nfe_each_way": evaluations(solver, n), "solver": solver, "steps": n,
                         "psnr": float(np.mean(psnr)), "psnr_vs_autoencoder": float(np.mean(psnr_ae)),
                         "latent_rmse": float(np.mean(latent)),
                         "seconds_per_image": (time.perf_counter() - begin) / len(images)})
            print(rows[-1], flush=True)
    return rows


def band_mask(size: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., int(0.3 * size):int(0.7 * size), :] = 1
    return mask


def edits(model, images: torch.Tensor, num_steps: int = 28) -> list[dict]:
    guide = make_guide(classifier="default", label=LABEL)
    judge = make_guide(classifier="default:judge", label=LABEL)
    size = images.shape[-1]
    mask = band_mask(size)
    with torch.no_grad():
        floor = (model.decode(model.encode(images)).clamp(-1, 1) - images).abs().mean().item()
    rows = [{"method": "source", "solver": None, "strength": None, "mask": None,
             "judge_probability": judge.score(images).exp().mean().item(), "change_outside": 0.0,
             "change_inside": 0.0, "autoencoder_floor": floor}]
    settings = [(solver, DEFAULT_STEP) for solver in SOLVER_NAMES] + [("fireflow", STRONG_STEP)]
    for masked in (False, True):
        for solver, step_size in settings:
            for strength in STRENGTHS:
                method = get_method("inversion_edit", solver=solver, strength=strength, step_size=step_size)
                begin = time.perf_counter()
                result = method(model, guide.objective, num_steps=num_steps, source_image=images,
                                mask=mask if masked else None, progress=False)
                edited = result.image.clamp(-1, 1)
                change = (edited - images).abs().mean(1, keepdim=True)
                region = mask.expand_as(change)
                rows.append({
                    "method": "inversion_edit", "solver": solver, "step_size": step_size, "strength": strength,
                    "mask": masked,
                    "judge_probability": judge.score(edited).exp().mean().item(),
                    "change_outside": float((change * (1 - region)).sum() / (1 - region).sum()),
                    "change_inside": float((change * region).sum() / region.sum()), "nfe": result.nfe,
                    "seconds_per_image": (time.perf_counter() - begin) / len(images)})
                print(rows[-1], flush=True)
    return rows


def markdown(results: dict) -> str:
    lines = ["Orders on an exact Gaussian flow (max error of the inverted noise; order fitted over the steps):", "",
             "| solver | " + " | ".join(f"{n} steps" for n in results["orders"][0]["steps"]) + " | order |",
             "|---|" + "---:|" * (len(results["orders"][0]["steps"]) + 1)]
    for row in results["orders"]:
        lines.append(f"| {row['solver']} | " + " | ".join(f"{e:.2g}" for e in row["errors"]) + f" | {row['order']:.2f} |")
    lines += ["", "Round trip on the default model (held-out photos, equal NFE each way):", "",
              "| NFE each way | solver | steps | PSNR vs photo (dB) | PSNR vs D(E(x)) (dB) | latent RMSE | s / image |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for row in results["round_trips"]:
        lines.append(f"| {row['nfe_each_way']} | {row['solver']} | {row['steps']} | {row['psnr']:.2f} | "
                     f"{row['psnr_vs_autoencoder']:.2f} | {row['latent_rmse']:.4f} | {row['seconds_per_image']:.1f} |")
    source = results["edits"][0]
    lines += ["", f"Editing on the default model toward the classifier's {LABEL!r} (inversion_edit; judge probability of "
              f"{LABEL!r}: {source['judge_probability']:.3f} on the photos; autoencoder floor of the change "
              f"{source['autoencoder_floor']:.3f}):", "",
              "| mask | solver | step size | strength | judge p(texture) | change outside band | change inside band | NFE |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in results["edits"][1:]:
        lines.append(f"| {'band' if row['mask'] else 'none'} | {row['solver']} | {row['step_size']} | {row['strength']} | "
                     f"{row['judge_probability']:.3f} | {row['change_outside']:.3f} | {row['change_inside']:.3f} | "
                     f"{row['nfe']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="inversion round trips and edits on the default model")
    parser.add_argument("--size", type=int, default=256, help="size of the round-trip images (default 256)")
    parser.add_argument("--edit-size", type=int, default=64,
                        help="size of the edited images (default 64, the classifiers' training crops)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--previous", help="a JSON of an earlier run whose parts are kept where --skip skips them")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: orders,round_trips,edits")
    args = parser.parse_args(argv)
    from tasks.default_model.train import held_out_images

    skip = {part for part in args.skip.split(",") if part}
    results = json.loads(open(args.previous).read()) if args.previous else {}
    model = load_model("default")
    if "orders" not in skip:
        results["orders"] = orders()
    if "round_trips" not in skip:
        results["round_trips"] = round_trips(model, held_out_images(args.size))
    if "edits" not in skip:
        results["edits"] = edits(model, held_out_images(args.edit_size)[:2])
    text = markdown(results)
    print(text)
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
