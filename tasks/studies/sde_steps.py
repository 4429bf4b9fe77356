"""How many steps the SDE sampler needs for a noise scale η: the error of its final distribution on an exact prior.

The README's table in "Particle search: rewards without a useful gradient" (the SDE's η against the number of
steps) comes from this study.

    python -m tasks.studies.sde_steps [--samples 2000] [--etas 0,1,2,4,8] [--steps 10,20,50,100,200] [--json out.json]

In continuous time the SDE of :mod:`guidance.sde` keeps the ODE's marginals for every η; its Euler-Maruyama steps
do not. Where the data distribution is nearly degenerate (directions of small variance, as in real images),
the drift contracts the state at rate about (1 + η) / s, and a step of size Δs with (1 + η) Δs / s > 2 overshoots
and amplifies instead of contracting: on a uniform grid, the last stochastic steps, none for η <= 3 and about
(η - 3) / 2 of them for larger η.
The prior here is the smooth-image Gaussian mixture of :mod:`tasks.studies.analytic_benchmark` on 3×4×4 images
(48 dimensions, three components, covariance floor 10⁻⁴), whose final marginal is known exactly. For each η and
number of steps (uniform grid, η = 0 the ODE's Euler steps) ``samples`` trajectories run from the same seed; the
table gives the relative covariance error ‖Ĉ − C‖_F / ‖C‖_F of the final samples against the exact covariance C,
beside the same error for exact samples of that size (the floor), and, per η, the fewest steps from which its
error stays within the ODE's error at the same steps plus that floor.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from guidance import AnalyticGMMFlow
from guidance.loading.files import write_text_atomic
from guidance.sde import sde_step

from .analytic_benchmark import smooth_image_prior

SHAPE, COMPONENTS = (3, 4, 4), 3


def prior() -> AnalyticGMMFlow:
    """The study's exact prior: three smooth-image Gaussians on 3×4×4 images."""
    return smooth_image_prior(SHAPE, components=COMPONENTS)


def final_samples(flow: AnalyticGMMFlow, samples: int, steps: int, eta: float, seed: int = 1) -> torch.Tensor:
    """(samples, d) float64 results of ``steps`` uniform steps of :func:`guidance.sde.sde_step` from s = 1 to 0."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, *flow.shape, generator=generator, dtype=torch.float64)
    sigmas = flow.sigmas(steps).double()
    for i in range(steps):
        x = sde_step(x, flow.velocity(x, sigmas[i]), sigmas[i], sigmas[i + 1], eta, generator)
    return x.reshape(samples, -1)


def covariance_error(x: torch.Tensor, covariance: torch.Tensor) -> float:
    """‖cov(x) − C‖_F / ‖C‖_F."""
    return float((torch.cov(x.T) - covariance).norm() / covariance.norm())


def study(samples: int = 2000, etas: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0),
          steps: tuple[int, ...] = (10, 20, 50, 100, 200), seed: int = 1) -> dict:
    """``{"errors": {steps: {η: error}}, "floor": error of exact samples, "within": {η: fewest steps or None},
    "seconds": ...}``; η = 0 must be among ``etas`` (the ODE every η is compared with)."""
    if 0.0 not in etas:
        raise ValueError(f"etas must include 0 (the ODE each η is compared with), got {list(etas)}")
    begin = time.perf_counter()
    flow = prior()
    exact = flow.marginal(0.0)
    covariance = exact.covariance()
    reference = exact.sample(samples, torch.Generator().manual_seed(seed + 100)).reshape(samples, -1).double()
    floor = covariance_error(reference, covariance)
    errors = {n: {eta: covariance_error(final_samples(flow, samples, n, eta, seed), covariance) for eta in etas}
              for n in steps}
    within = {}
    for eta in etas:
        good = [errors[n][eta] <= errors[n][0.0] + floor for n in steps]
        within[eta] = next((n for j, n in enumerate(steps) if all(good[j:])), None)
    return {"errors": errors, "floor": floor, "within": within, "samples": samples,
            "seconds": time.perf_counter() - begin}


def markdown(result: dict) -> str:
    etas = list(next(iter(result["errors"].values())))
    lines = ["| steps | " + " | ".join("ODE (η = 0)" if eta == 0 else f"η = {eta:g}" for eta in etas) + " |",
             "|---|" + "---|" * len(etas)]
    for n, row in result["errors"].items():
        lines.append(f"| {n} | " + " | ".join(f"{row[eta]:.3f}" for eta in etas) + " |")
    lines.append(f"| exact samples (floor) | {result['floor']:.3f} |" + " |" * (len(etas) - 1))
    lines.append("| within the ODE's error from | " + " | ".join(
        "–" if eta == 0 else (f"{result['within'][eta]} steps" if result["within"][eta] else "never")
        for eta in etas) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.studies.sde_steps", description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2000, help="trajectories per cell (default 2000)")
    parser.add_argument("--etas", default="0,1,2,4,8", help="noise scales η, 0 included (default 0,1,2,4,8)")
    parser.add_argument("--steps", default="10,20,50,100,200", help="step counts (default 10,20,50,100,200)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the table to this JSON file")
    args = parser.parse_args(argv)
    etas = tuple(float(e) for e in args.etas.split(","))
    steps = tuple(int(n) for n in args.steps.split(","))
    result = study(args.samples, etas, steps, args.seed)
    print(markdown(result))
    print(f"{result['samples']} samples per cell, {result['seconds']:.0f} s")
    if args.json:
        write_text_atomic(args.json, json.dumps({**result, "errors": {str(n): {str(e): v for e, v in row.items()}
                                                                       for n, row in result["errors"].items()},
                                                 "within": {str(e): n for e, n in result["within"].items()}},
                                                indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
