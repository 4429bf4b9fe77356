"""Flower (Pourya, El Rawas & Unser, "Flower: A Flow-Matching Solver for Inverse Problems", ICLR 2026).

For y = A x0 + n with n ~ N(0, σ² I) and a linear A, each step estimates the destination of the flow from the
current state, refines it by a proximal step on the data term (an exact Gaussian posterior for the destination
given its own uncertainty σ_r), and moves the refined destination back to the next time along the straight
path with fresh noise. Over the decreasing grid 1 = s_0 > s_1 > ... > s_N = 0 (paper time t = 1 − s)::

    for m in 1 .. M:                                     (num_samples independent runs, averaged at the end)
        x ~ N(0, I)
        for i in 0 .. N-1:
            s, s' = s_i, s_{i+1}
            x̂  = x − s v_theta(x, s)                     (1) destination estimate
            σ_r = s / sqrt(s² + (1 − s)²),   λ = σ_r²
            x* = argmin_u ‖A u − y‖² / σ² + ‖u − x̂‖² / λ    (2) refinement: conjugate gradient on
               (AᵀA / σ² + I / λ) u = Aᵀy / σ² + x̂ / λ, from u = x̂
            covariance "full": x* += e,   (AᵀA / σ² + I / λ) e = z1 / σ_r + Aᵀz2 / σ   (CG from e = 0),
               z1, z2 ~ N(0, I)
            x  = (1 − s') x* + s' z,   z ~ N(0, I)       (3) time progression
        x̄ += x / M
    return x̄

With ``covariance="full"`` the right-hand side of the second solve has covariance AᵀA / σ² + I / λ, the
system matrix itself, so e ~ N(0, (AᵀA / σ² + I / λ)⁻¹) and x* is a sample of the destination's Gaussian
posterior rather than its mean (the paper's γ = 1; the default "isotropic" is γ = 0). At the last step s' = 0,
so x = x*. The measurement noise σ is the objective's ``noise_std`` (or the ``noise_std`` option); σ = 0 has no
proximal step (1 / σ²) and is refused.

Correspondence with the official code (mehrsapo/Flower at commit 6b9eacabfc7c73c3199f379bf7d8726ac6d198e3, a fork
of annegnx/PnP-Flow): ``FLOWER.solve_ip`` and ``FLOWER.cg`` in pnpflow/methods/flower.py (isotropic) and
``FLOWER_COV.solve_ip`` in pnpflow/methods/flower_cov.py (full); config/method_config/flower*.yaml and
scripts/script_test_{celeba,afhq}_flower*.sh for the settings (:data:`PRESETS`); main.py for each problem's
noise level and operator size. Its time t runs 0 (noise) → 1 (data) with x_t = t x1 + (1 − t) x0, x0 the noise,
so t = 1 − s and its velocity is −v here: its x + (1 − t) v_t is x − s v, its grid t_k = k δ with δ = 1 / N is
s_k = 1 − k / N (``time_grid="uniform"``, which is the model's own schedule for an unshifted model), its
(t + δ) x* + (1 − t − δ) z is (1 − s') x* + s' z. Its λ = σ_r² and σ_noise enter unchanged (CG on
Hᵀ(H u) / σ_noise² + u / λ). CG runs at most 50 iterations in flower.py and 100 (both solves) in flower_cov.py
(``cg_iterations=None`` picks these), with eps 1e-5 on the residual norm of that system. The noise is drawn
in the official order: per run the starting x, then per step z1 (image shape) and z2 (measurement shape) for
"full", then z; the runs follow each other, so the stream of a run continues where the previous one stopped.

Official-code quirks:

* The CG stopping test ``if r_norm.sqrt().all() < eps: break`` reduces the per-sample residual norms to one
  bool with ``.all()`` (True unless some norm is exactly 0) and compares that bool with eps: ``True < 1e-5`` is
  False, so eps never stops it. CG runs its 50 (100) iterations unless some sample's squared residual norm is
  exactly 0 (then it stops for the whole batch, which also spares the 0 / 0 of the next iteration): that happens
  when the residual underflows, a few iterations after convergence when AᵀA has few distinct eigenvalues (masks,
  decimation, denoising), never for a blur within 50 iterations. Not copied: each sample stops once its residual
  norm is <= ``cg_tolerance`` (the intended test, per sample; a stopped sample is frozen while the others go
  on). Both stop at a solution converged to rounding, so they agree to float32 precision; ``cg_tolerance=0``
  reproduces the official iterations (the presets' parity variant; exactly so for a batch of one, as the
  official scripts run, while a larger batch goes on for the samples whose residual is not yet zero).
* flower_cov.py solves both systems with 100 iterations, flower.py with 50; kept (``cg_iterations=None``).
* ``estimated_iso_cov = 1 − t − δ`` is the standard deviation of the re-noising, not a covariance; the comment
  "initialize the image with the adjoint operator" is stale: both files start from N(0, I) noise, as here.
* The measurement noise of batch b is drawn after ``torch.manual_seed(b)``, and the sampler's noise then continues
  from that global generator; here every draw comes from ``generator``.
* Only Gaussian measurement noise is supported (``solve_ip`` raises otherwise); ``grad_datafit``,
  ``interpolation_step`` and ``denoiser`` are unused.

Flower needs the operator itself, in image space: it runs on pixel-space models (the analytic priors, pixel
networks) with a pixel-space :class:`~guidance.objectives.MeasurementFidelity` over a linear operator, whose
``weight`` and ``reduction`` do not enter (the data term is the Gaussian likelihood of σ). Each step costs one
network evaluation and at most ``cg_iterations`` applications of AᵀA (twice that for "full"); the network is never
differentiated.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from operators.checks import MAX_STEPS, check_number, check_work
from operators.conjugate_gradient import conjugate_gradient

from ..flow import interpolate, x0_from_velocity
from ..objectives import MeasurementFidelity
from ..sampler import initial_noise, start_state, step_end
from .common import (CountingModel, DivergenceMonitor, MethodResult, check_count, check_nonnegative,
                     measurement_batch_size, reference_scale, require_linear_measurement, require_pixel_model)

__all__ = ["COVARIANCES", "CG_ITERATIONS", "PRESETS", "TIME_GRIDS", "flower",
           "refinement_std", "uniform_grid"]

COVARIANCES = ("isotropic", "full")
TIME_GRIDS = ("model", "uniform")
#: CG iterations of each variant in the official code: flower.py (isotropic) 50, flower_cov.py (full) 100.
CG_ITERATIONS = {"isotropic": 50, "full": 100}
#: The official CG tolerance on the residual norm of (AᵀA / σ² + I / λ) u = b.
CG_TOLERANCE = 1e-5


def uniform_grid(num_steps: int) -> torch.Tensor:
    """The official grid s_k = 1 − k / N, k = 0 .. N (paper time t_k = k δ, δ = 1 / N), float32."""
    steps = torch.arange(num_steps + 1, dtype=torch.float64)
    return (1 - steps / num_steps).float()


def refinement_std(sigma: float) -> float:
    """σ_r = s / sqrt(s² + (1 − s)²), the paper's standard deviation of the destination estimate at time s
    (the official (1 − t) / sqrt(t² + (1 − t)²)); the refinement weighs x̂ by 1 / λ, λ = σ_r²."""
    return sigma / math.sqrt(sigma**2 + (1 - sigma) ** 2)


@torch.no_grad()
def flower(model, objective: MeasurementFidelity, *, num_steps: int = 100, cond=None, height=None, width=None,
           generator=None, callback=None, progress: bool = True, batch_size=None, latents=None,
           decode: bool = True, on_step_end=None, num_samples: int = 1, covariance: str = "isotropic",
           cg_iterations: int | None = None, cg_tolerance: float = CG_TOLERANCE, noise_std: float | None = None,
           time_grid: str = "model", check_divergence: bool = True) -> MethodResult:
    """Flower (Pourya et al., ICLR 2026): destination estimate, proximal refinement by conjugate gradient,
    re-noising to the next time; ``num_samples`` runs averaged (see the module docstring).

    Args:
        model, objective, num_steps, cond, height, width, generator, callback, progress, batch_size, latents,
            decode: the common method arguments (see ``guidance.methods``). ``objective`` must be a pixel-space
            :class:`MeasurementFidelity` with a linear operator; ``num_steps`` is N, the steps of one run (each
            one network evaluation; the paper's 100); ``batch_size`` defaults to the measurement's batch (a
            batch-1 y is shared); ``latents`` is the first run's starting noise (the other runs draw their own);
            ``generator`` draws every noise (None: torch's global generator). The callback gets, per step,
            ``x`` the state the network saw, ``x0_hat`` the refined destination x*, and ``sample`` the run's index.
        num_samples: M >= 1 independent runs whose final states are averaged (the official scripts use 1 and 5;
            M > 1 trades sample diversity for a lower-variance estimate, at M times the cost).
        covariance: "isotropic" (flower.py, γ = 0: x* is the refinement's mean) or "full" (flower_cov.py,
            γ = 1: x* is a sample of the destination's Gaussian posterior, a second CG solve per step).
        cg_iterations: the most CG iterations per solve; None: the official 50 (isotropic) or 100 (full).
        cg_tolerance: a sample's CG stops once its residual norm is <= this (the official eps 1e-5, in the units
            of Aᵀy / σ²); 0 stops only at an exactly zero residual, as the official code does in effect (module
            docstring).
        noise_std: the measurement noise σ > 0 of the data term; None: the objective's ``noise_std``.
        time_grid: "model" (the model's own schedule, ending at 0) or "uniform" (the official s_k = 1 − k / N,
            also for a model whose schedule is shifted; the same grid for an unshifted model).
        check_divergence: stop with a :class:`DivergenceError` naming the step and the state's scale when the
            state becomes NaN/inf or a sample's RMS exceeds ``DIVERGENCE_FACTOR`` (100) times its reference scale;
            read once, after the loop.

    Returns:
        :class:`MethodResult`; ``x`` the average of the runs' final states, ``sigmas`` the N + 1 levels of the
        grid; ``info["cg_iterations"]``: (B,) CG iterations each sample ran, summed over all solves.
    """
    num_samples = check_count(num_samples, "num_samples", minimum=1)
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES} ('isotropic' is flower.py, 'full' "
                         f"flower_cov.py's posterior sample), got {covariance!r}")
    iterations = CG_ITERATIONS[covariance] if cg_iterations is None else check_count(cg_iterations, "cg_iterations",
                                                                                     minimum=1)
    cg_tolerance = check_nonnegative(cg_tolerance, "cg_tolerance")
    if time_grid not in TIME_GRIDS:
        raise ValueError(f"time_grid must be one of {TIME_GRIDS} ('uniform' is the official grid 1 − k/N), "
                         f"got {time_grid!r}")
    check_count(num_steps, "num_steps", 1, MAX_STEPS)
    solves = 2 if covariance == "full" else 1
    check_work({"num_samples": num_samples, "num_steps": num_steps, "cg_iterations": iterations * solves}, "flower")
    require_pixel_model(model, "flower", "its refinement solves a linear system with the operator on the state")
    operator = require_linear_measurement(objective, "flower", "its refinement is a linear least-squares solve, CG "
                                          "on AᵀA / σ² + I / λ").operator
    fix = ("its refinement weighs the data by 1 / σ²; pass noise_std=<the measurement's noise level, e.g. 0.01> "
           "(option) or build the objective with noise_std")
    sigma_noise = check_number(objective.noise_std if noise_std is None else noise_std, "noise_std", minimum=0,
                               strict_minimum=True, fix=fix)

    batch_size = measurement_batch_size(objective, batch_size, latents)
    counted = CountingModel(model)
    state = start_state(counted, cond, num_steps, height, width, generator, batch_size, latents)
    x, cond = state.x, state.cond
    sigmas = state.sigmas if time_grid == "model" else uniform_grid(num_steps).to(x.device)
    objective.bind(model, state.height, state.width)
    y = objective.y.to(device=x.device, dtype=x.dtype)
    if y.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"the measurement has batch {y.shape[0]} but {x.shape[0]} restorations were asked for; "
                         f"give one measurement, or one per sample (batch_size={y.shape[0]})")
    levels = sigmas.double().cpu().tolist()  # the grid's constants on the host, once: no device reads in the loop
    noise_shape = (x.shape[0], *y.shape[1:])
    adjoint_y = operator.adjoint(y) / sigma_noise**2

    monitor = DivergenceMonitor("flower", "check the measurement's noise_std and the operator's scale",
                                check_divergence, reference_scale(model, x))
    cg_ran = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    x_sum = torch.zeros_like(x)
    bar = tqdm(total=num_samples * num_steps, disable=not progress, desc="flower")
    for m in range(num_samples):
        if m > 0:
            x = initial_noise(tuple(x.shape), generator, x.device, model.dtype)  # drawn as start_state draws it
        for i in range(num_steps):
            sigma, sigma_next = sigmas[i], levels[i + 1]
            sigma_r = refinement_std(levels[i])
            lam = sigma_r**2

            def system(u: torch.Tensor) -> torch.Tensor:  # (AᵀA / σ² + I / λ) u
                return operator.adjoint(operator(u)) / sigma_noise**2 + u / lam

            # (1) destination estimate
            v = counted.velocity(x, sigma, cond)
            x_hat = x0_from_velocity(x, v, sigma)
            # (2) refinement: the mean of the destination's Gaussian posterior, plus a draw from it with "full"
            if covariance == "full":
                z1 = initial_noise(tuple(x.shape), generator, x.device)
                z2 = initial_noise(noise_shape, generator, x.device)
            x_star, ran = conjugate_gradient(system, adjoint_y + x_hat / lam, x_hat, max_iters=iterations,
                                          atol=cg_tolerance)
            cg_ran += ran
            if covariance == "full":
                e, ran = conjugate_gradient(system, z1 / sigma_r + operator.adjoint(z2) / sigma_noise,
                                            max_iters=iterations, atol=cg_tolerance)
                x_star, cg_ran = x_star + e, cg_ran + ran
            if callback is not None:
                callback({"step": i, "sigma": sigma, "x": x, "x0_hat": x_star, "sample": m})
            # (3) time progression
            z = initial_noise(tuple(x.shape), generator, x.device)
            x = interpolate(x_star, z, sigma_next)
            x = step_end(on_step_end, i, sigma, sigmas[i + 1], {"x": x})
            monitor.update(x, i)
            bar.update()
        x_sum += x
    bar.close()
    monitor.finish()
    x = x_sum / num_samples

    image = model.decode(x) if decode else None
    return MethodResult(x=x, image=image, nfe=counted.nfe, sigmas=sigmas, info={"cg_iterations": cg_ran})


# The official settings: scripts/script_test_{celeba,afhq}_flower[_cov]_{1,5}_{ot,ind}.sh give steps and
# num_samples per problem ("ot" and "ind" are two trained networks, not method settings: the same values);
# main.py gives each problem's sigma_noise and operator sizes at the dataset's resolution (CelebA 128², AFHQ-Cat
# 256²), pnpflow/degradations.py the operators.
_SOURCE = ("Pourya, El Rawas & Unser, Flower: A Flow-Matching Solver for Inverse Problems, ICLR 2026; "
           "github.com/mehrsapo/Flower @ 6b9eacabfc7c73c3199f379bf7d8726ac6d198e3: {scripts} (steps, num_samples), "
           "pnpflow/methods/{file} (the loop; CG {iterations} iterations, eps 1e-5), main.py (problem, sigma_noise, "
           "sizes), pnpflow/degradations.py (operator)")
_QUIRKS = {"cg_stopping_test": "the official CG test `r_norm.sqrt().all() < eps` compares a bool with eps and never "
                               "stops early: every CG iteration runs (cg_tolerance=0)"}

# preset problem -> (official problem, noise std, operator per dataset)
_PROBLEMS = {
    "denoise": ("denoising", 0.2, {"celeba": "denoise", "afhq": "denoise"}),
    "deblur": ("gaussian_deblurring_FFT", 0.05, {"celeba": "gaussian_blur:kernel_size=61,sigma=1.0,padding=circular",
                                                 "afhq": "gaussian_blur:kernel_size=61,sigma=3.0,padding=circular"}),
    "sr": ("superresolution", 0.05, {"celeba": "sr_avgpool:factor=2", "afhq": "sr_avgpool:factor=4"}),
    "inpaint_box": ("inpainting", 0.05, {"celeba": "inpaint_box:size=40", "afhq": "inpaint_box:size=80"}),
    "inpaint_random": ("random_inpainting", 0.01, {"celeba": "inpaint_random:fraction=0.7",
                                                   "afhq": "inpaint_random:fraction=0.7"}),
}
_NOTES = {
    "denoising": "A = I",
    "gaussian_deblurring_FFT": "a 61-tap Gaussian (σ 1 at 128², 3 at 256²) applied by FFT, i.e. with circular "
                               "padding",
    "superresolution": "the official operator keeps the top-left pixel of each f×f block (×2 at 128², ×4 at 256²), "
                       "which no operator spec offers; f×f averaging stands in (Flower has no step size to rescale: "
                       "its refinement solves the data term of whatever operator it is given)",
    "inpainting": "a centred square hole (half_size_mask 20 at 128², 40 at 256²)",
    "random_inpainting": "the official mask drops each pixel with probability 0.7 (all channels alike, seed 42); "
                         "inpaint_random drops exactly 70 %",
}
_RESOLUTION = {"celeba": 128, "afhq": 256}  # config/dataset_config/{celeba,afhq_cat}.yaml dim_image
# AFHQ-Cat steps per (covariance, num_samples) and problem, as its scripts give them (CelebA: 100 throughout)
_STEPS_AFHQ = {
    ("isotropic", 1): {"denoise": 100, "inpaint_box": 100, "deblur": 500, "sr": 500, "inpaint_random": 200},
    ("isotropic", 5): {"denoise": 100, "inpaint_box": 100, "deblur": 100, "sr": 500, "inpaint_random": 200},
    ("full", 1): {"denoise": 100, "inpaint_box": 100, "deblur": 100, "sr": 500, "inpaint_random": 200},
    ("full", 5): {"denoise": 100, "inpaint_box": 100, "deblur": 100, "sr": 500, "inpaint_random": 200},
}
# AFHQ-Cat settings whose script lines are commented out: (covariance, num_samples) -> problems
_COMMENTED_AFHQ = {("isotropic", 1): ("denoise", "inpaint_box"), ("isotropic", 5): ("denoise", "inpaint_box", "deblur")}


def _preset(dataset: str, problem: str, covariance: str, num_samples: int) -> tuple[str, dict[str, Any]]:
    """One published setting: its name flower_<dataset>_<problem>[_cov][_avg5] and its preset."""
    official, noise, operators = _PROBLEMS[problem]
    steps = 100 if dataset == "celeba" else _STEPS_AFHQ[(covariance, num_samples)][problem]
    method = "flower_cov" if covariance == "full" else "flower"
    note = f"problem {official}: {_NOTES[official]}"
    if dataset == "afhq" and problem in _COMMENTED_AFHQ.get((covariance, num_samples), ()):
        note += ("; its line is commented out in both scripts (ot, ind), the only record of this setting"
                 if num_samples == 5 else "; its line is commented out in the ot script (run in the ind one)")
    label = problem if problem != "sr" else f"sr{operators[dataset][-1]}"
    name = f"flower_{dataset}_{label}" + ("_cov" if covariance == "full" else "") + \
        (f"_avg{num_samples}" if num_samples > 1 else "")
    source = _SOURCE.format(scripts=f"scripts/script_test_{dataset}_{method}_{num_samples}_{{ot,ind}}.sh",
                            file=f"{method}.py", iterations=CG_ITERATIONS[covariance])
    return name, {"method": "flower", "num_steps": steps,
                  "options": {"num_samples": num_samples, "covariance": covariance, "cg_iterations": None,
                              "cg_tolerance": CG_TOLERANCE, "time_grid": "uniform"},
                  "objective": {"space": "pixel", "weight": 1.0, "reduction": "sum"},
                  "operators": [operators[dataset]], "noise_std": noise, "resolution": _RESOLUTION[dataset],
                  "source": source, "note": note, "quirks": dict(_QUIRKS), "parity": {"options": {"cg_tolerance": 0.0}}}


PRESETS: dict[str, dict[str, Any]] = dict(
    _preset(dataset, problem, covariance, num_samples)
    for dataset in _RESOLUTION for problem in _PROBLEMS for covariance in COVARIANCES for num_samples in (1, 5))
