"""Guidance methods scored against exact posteriors on an analytic Gaussian-mixture image prior.

The README's table "Against exact posteriors" comes from this study.

    python -m tasks.studies.analytic_benchmark [--pairs 64] [--steps 50] [--methods flowchef,flair,...] [--json out.json]
        [--channels 3] [--operator "gaussian_blur:kernel_size=3,sigma=1.0"] [--presets pnp_flow_celeba_deblur]

The prior lives on 1×8×8 images: six components whose covariances are smooth-image (squared-exponential)
kernels, nearly degenerate like those of real patches. For each operator (box inpainting, SR×2, Gaussian
blur; noise std 0.05) the benchmark draws ``pairs`` (x_true, y), runs each method once per pair with its
default settings, and then ``spread`` times for a single y; it prints a Markdown table of the scores in
:mod:`tasks.studies.posterior_scores`, NFE and time relative to unguided sampling. ``--channels`` sets the prior's
channel count (3: a colour prior), ``--operator`` gives full operator specs (commas allowed), and
``--presets`` adds rows for parity presets (:mod:`guidance.features.presets`: their method, options, steps and
objective, on the benchmark's operators and noise).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch

from guidance import AnalyticGMMFlow, MeasurementFidelity, get_method
from guidance.features.presets import get_preset
from operators import make_operator

from . import posterior_scores as scores
from guidance.loading.files import write_text_atomic

OPERATORS = {
    "inpaint_box": "inpaint_box:fraction=0.25",
    "sr_x2": "sr:factor=2",
    "gaussian_blur": "gaussian_blur:kernel_size=5,sigma=1.0",
}
#: the rows of the README's table; D-Flow (about 400x the NFE of unguided sampling here, an hour and more for its rows)
#: is scored with --methods d_flow --pairs 16
METHODS = ("unguided", "pseudo_inverse", "flowchef", "flair", "dps", "pnp_flow", "flowdps", "psld", "ot_ode", "ictm",
           "flower")
NOISE_STD = 0.05


def smooth_image_prior(shape=(1, 8, 8), components: int = 6, seed: int = 0) -> AnalyticGMMFlow:
    """A mixture of smooth-image Gaussians: component k has a mean made of a level and a gradient, and the
    covariance σ_k² exp(−|p − q|² / 2ℓ_k²) + 10⁻⁴ I over pixel positions p, q (length scales 1 to 3 pixels),
    whose spectrum decays quickly: nearly degenerate, as for real image patches."""
    generator = torch.Generator().manual_seed(seed)
    c, h, w = shape
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    points = torch.stack([rows.flatten(), cols.flatten()], 1).repeat(c, 1)
    channel = torch.arange(c).repeat_interleave(h * w)
    distance2 = ((points[:, None] - points[None]) ** 2).sum(-1)
    same_channel = (channel[:, None] == channel[None]).to(torch.float64)
    means, covariances = [], []
    for k in range(components):
        u = torch.rand(5, generator=generator, dtype=torch.float64)
        level = 1.2 * u[0] - 0.6
        slope_r, slope_c = 0.1 * (2 * u[1] - 1), 0.1 * (2 * u[2] - 1)
        mean = level + slope_r * (points[:, 0] - (h - 1) / 2) + slope_c * (points[:, 1] - (w - 1) / 2)
        length = 1.0 + 2.0 * u[3]
        scale = 0.15 + 0.25 * u[4]
        correlation = torch.exp(-distance2 / (2 * length**2)) * (0.5 + 0.5 * same_channel)
        means.append(mean)
        covariances.append(scale**2 * correlation + 1e-4 * torch.eye(c * h * w, dtype=torch.float64))
    weights = torch.full((components,), 1.0 / components, dtype=torch.float64)
    return AnalyticGMMFlow(weights, torch.stack(means), torch.stack(covariances), shape)


@dataclass
class Row:
    method: str
    operator: str
    mse_over_mmse: float
    residual_over_noise: float
    log_density_gap: float
    sliced_w2: float
    mode_weight_error: float
    nfe: int
    seconds: float
    time_vs_unguided: float | None = None


def _run(method: str, flow, objective, steps: int, seed: int, batch: int, options: dict | None = None):
    run = get_method(method, **(options or {}))
    start = time.perf_counter()
    result = run(flow, objective, num_steps=steps, generator=torch.Generator().manual_seed(seed), batch_size=batch,
                 progress=False)
    return result, time.perf_counter() - start


def score(method: str, flow: AnalyticGMMFlow, operator_spec: str, pairs: int = 64, steps: int = 50,
          spread: int = 256, seed: int = 0, options: dict | None = None, objective: dict | None = None) -> Row:
    """Score one method (with ``options``, default settings otherwise) on one operator (see the module docstring);
    ``objective``: ``MeasurementFidelity`` keyword arguments (space, weight, reduction) beside the defaults."""
    op = make_operator(operator_spec, noise_std=NOISE_STD)
    generator = torch.Generator().manual_seed(seed)
    x_true = flow.sample_prior(pairs, generator)
    y = op.measure(x_true, generator)
    posteriors = flow.posteriors(op, y, NOISE_STD)
    means = torch.stack([p.mean() for p in posteriors]).to(torch.float32)
    objective = objective or {}
    result, elapsed = _run(method, flow, MeasurementFidelity(op, y, **objective), steps, seed + 1, pairs, options)
    outputs = result.x

    y_one = y[:1].expand(spread, -1, -1, -1).contiguous()
    many = _run(method, flow, MeasurementFidelity(op, y_one, **objective), steps, seed + 2, spread, options)[0].x
    posterior = posteriors[0]
    exact = posterior.sample(spread, torch.Generator().manual_seed(seed + 3))
    return Row(
        method=method,
        operator=operator_spec,
        mse_over_mmse=scores.mse_over_mmse(outputs, x_true, means),
        residual_over_noise=scores.residual_over_noise(op, outputs, y, NOISE_STD),
        log_density_gap=scores.log_density_gap(posteriors, outputs, torch.Generator().manual_seed(seed + 4)),
        sliced_w2=scores.sliced_w2(many, exact, torch.Generator().manual_seed(seed + 5)),
        mode_weight_error=scores.mode_weight_error(posterior, many),
        nfe=result.nfe,
        seconds=elapsed,
    )


def markdown(rows: list[Row]) -> str:
    lines = ["| method | operator | MSE / MMSE | residual / noise | log-density gap | sliced W2 | mode-weight error "
             "| NFE | time vs unguided |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        relative = "–" if r.time_vs_unguided is None else f"{r.time_vs_unguided:.2f}"
        lines.append(f"| {r.method} | {r.operator} | {r.mse_over_mmse:.2f} | {r.residual_over_noise:.2f} | "
                     f"{r.log_density_gap:.1f} | {r.sliced_w2:.3f} | {r.mode_weight_error:.2f} | {r.nfe} | {relative} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score guidance methods against exact posteriors.")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--spread", type=int, default=256, help="outputs for one measurement (W2, mode weights)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--operators", default=",".join(OPERATORS))
    parser.add_argument("--operator", action="append", metavar="SPEC",
                        help="a full operator spec (commas allowed); repeatable; replaces --operators")
    parser.add_argument("--presets", default="", help="parity presets to score too, comma-separated")
    parser.add_argument("--channels", type=int, default=1, help="channels of the prior's 8x8 images (3: colour)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    if args.channels < 1:
        parser.error(f"--channels must be >= 1, got {args.channels}")
    flow = smooth_image_prior(shape=(args.channels, 8, 8))
    presets = {name: get_preset(name) for name in args.presets.split(",") if name}
    for name, preset in presets.items():
        if preset.get("objective") is None:
            parser.error(f"the preset {name!r} has no measurement objective ({preset['method']}); give restoration "
                         f"presets only")
    rows = []
    for name in args.operator or args.operators.split(","):
        spec = OPERATORS.get(name, name)
        score("unguided", flow, spec, 4, 2, 4, args.seed)  # warm-up, so that the first timing is fair
        group = [score(method, flow, spec, args.pairs, args.steps, args.spread, args.seed)
                 for method in args.methods.split(",") if method]
        for label, preset in presets.items():
            row = score(preset["method"], flow, spec, args.pairs, preset["num_steps"], args.spread, args.seed,
                        preset.get("options"), preset.get("objective"))
            row.method = label
            group.append(row)
        reference = next((r.seconds for r in group if r.method == "unguided"), None)
        for row in group:
            row.time_vs_unguided = row.seconds / reference if reference else None
            print(f"{row.method:>15} {name:>14}  MSE/MMSE {row.mse_over_mmse:8.2f}", flush=True)
        rows.extend(group)
    print()
    print(markdown(rows))
    if args.json:
        payload = json.dumps([asdict(r) for r in rows], indent=2)
        write_text_atomic(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
