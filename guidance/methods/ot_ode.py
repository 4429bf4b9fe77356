"""OT-ODE: training-free linear inverse problems with a flow prior through a Gaussian-posterior correction of the
velocity (Pokle, Muckley, Chen, Karrer, "Training-free Linear Image Inverses via Flows", TMLR 2024).

Each Euler step adds to the velocity the gradient of log p(y | x_s) under a Gaussian approximation of
p(x0 | x_s) with mean x0_hat and covariance r_s² I, taken through the network's Jacobian. In flowsteer's time
(s = 1 − t, paper time t; v = ε − x0, the paper's velocity is −v) on the uniform grid s_k = 1 − k / N::

    k_0 = max(1, ⌊N · t_0⌋),  s = 1 − k_0 / N
    x   = (1 − s) Aᵀy + s ε,  ε ~ N(0, I)                   the paper's x_{t0} = t_0 Aᵀy + (1 − t_0) ε
    for k = k_0 .. N−1:   s = 1 − k / N,  s' = s − 1 / N
        v      = v_theta(x, s)                             with autograd (one forward)
        x0_hat = x − s v
        r²     = s² / (s² + (1 − s)²)
        u      = (r² A Aᵀ + σ² I)⁻¹ (y − A x0_hat)        conjugate gradients (r² A Aᵀ + σ² I is SPD)
        g      = (∂x0_hat / ∂x)ᵀ Aᵀ u                     one vector-Jacobian product through the network
        γ      = 1 ("constant") or sqrt((1 − s) / ((1 − s)² + s²))  ("gamma_t", the paper's sqrt(t / (t² + (1 − t)²)))
        x      = x + (s' − s) v + (s − s') · s / (1 − s) · γ · g
    return x

σ is the measurement noise std (``objective.noise_std``, or the ``noise_std`` option). Each step costs one
network forward and one backward (with respect to x only); the operator enters through A, Aᵀ and the solve.

Correspondence with the official code (annegnx/PnP-Flow at commit ee5b159e6edff4d585ebf36c9a5333ffa85e066c,
pnpflow/methods/ot_ode.py ``OT_ODE.solve_ip``; config/method_config/ot_ode.yaml; scripts/script_test.sh): its
time is t = 1 − s with the velocity towards the data (v_theirs = −v), x1_hat = x + (1 − t) v_theirs is our
x0_hat, its ``vec + (1 − t) · vjp(v_theirs, vec)`` is our (∂x0_hat/∂x)ᵀ vec, its step ``x + delta · (vt + (1 − t)
/ t · gamma · g)`` with delta = 1/N is the update above. Its ``steps_ode`` is ``num_steps``, ``start_time`` t_0,
``gamma`` the same two rules, ``sigma_noise`` σ. The official code solves the linear system by a closed form per
problem (denoising: d / (r² + σ²); masks: d / (r² · mask + σ²); decimation SR: d / (r² diag(D Dᵀ) + σ²);
circular blur: a division in Fourier space) and by GMRES otherwise; here conjugate gradients on the symmetric
positive-definite system serve every linear operator (exact for masks and SR in one or two iterations). The
official code evaluates the network twice per step (a forward without autograd, then again inside
``torch.autograd.functional.vjp``); here one forward with autograd gives both v and the vector-Jacobian product.
The objective's weight and reduction are not read: the correction is defined by A, y and σ alone. Only the
Gaussian-noise setting exists in the official OT-ODE.

Official-code quirks:

* The superresolution branch computes r² as ``(1 − delta·iteration)² / ((1 − delta·iteration)² +
  delta*iteration**2)``: by operator precedence delta·k² = k²/N instead of (k/N)² = t², i.e. r² = s² / (s² +
  N (1 − s)²), far smaller than the other branches' r² except at the first steps (the published SR numbers were
  made with it). Not copied; ``official_sr_weight=True`` reproduces it, whatever the operator.
* The initial image is mixed at t_0 = ``start_time`` while the first step runs at t = int(N · t_0) / N; the two
  differ when N · t_0 is not an integer (never for the published settings). Here x starts at the level of its
  first step. ⌊N · t_0⌋ is taken after rounding away the float error (the official int(100 · 0.29) is 28), and a
  start at t = 0, where the official weight (1 − t) / t is infinite (NaN output), begins at k_0 = 1 instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from operators.checks import MAX_STEPS, check_number, check_work
from operators.conjugate_gradient import conjugate_gradient

from ..flow import euler_step, interpolate, x0_from_velocity
from ..objectives import MeasurementFidelity
from ..sampler import start_state, step_end
from .common import (CountingModel, DivergenceMonitor, MethodResult, check_count, check_flag, check_nonnegative,
                     measurement_batch_size, reference_scale, require_linear_measurement, require_pixel_model)

__all__ = ["GAMMAS", "PRESETS", "first_step", "ot_ode"]

GAMMAS = ("constant", "gamma_t")


def first_step(num_steps: int, start_time: float) -> int:
    """k_0 = max(1, ⌊N · t_0⌋), the first step's index on the grid t_k = k / N (the official int(N · t_0), with
    its float error rounded away and t = 0 excluded)."""
    return max(1, math.floor(round(num_steps * start_time, 9)))


@torch.no_grad()
def ot_ode(model, objective: MeasurementFidelity, *, num_steps: int = 100, cond=None, height=None, width=None,
           generator=None, callback=None, progress: bool = True, batch_size=None, latents=None, decode: bool = True,
           on_step_end=None, start_time: float = 0.2, gamma: str = "constant",
           noise_std: float | None = None, cg_iterations: int = 50, official_sr_weight: bool = False,
           check_divergence: bool = True) -> MethodResult:
    """OT-ODE (Pokle et al., TMLR 2024): Euler steps on the uniform grid from t_0, each velocity corrected by the
    Gaussian-posterior gradient (see the module docstring).

    Args:
        model, objective, num_steps, cond, height, width, generator, callback, progress, batch_size, latents,
            decode: the common method arguments (see ``guidance.methods``). ``model`` must be a pixel-space model;
            ``objective`` a pixel-space :class:`MeasurementFidelity` with a linear operator (its weight and
            reduction are not read). ``num_steps`` is N of the grid t_k = k / N; the run takes the N − k_0 steps
            from k_0 = max(1, ⌊N · start_time⌋), each one forward and one backward pass of the network.
            ``latents``: the noise ε mixed into the start (default: drawn from ``generator``). The callback gets
            ``{"step", "sigma", "x", "x0_hat"}`` before each update.
        start_time: t_0 in (0, 1), the paper time the run starts from: x = t Aᵀy + (1 − t) ε at the first step's
            t = k_0 / N (t_0 itself when N · t_0 is an integer); the official settings use 0.1 to 0.4.
        gamma: "constant" (γ = 1) or "gamma_t" (γ = sqrt(t / (t² + (1 − t)²)), t = 1 − s).
        noise_std: σ of the solve (r² A Aᵀ + σ² I)⁻¹, >= 0; None takes ``objective.noise_std``. σ = 0 is refused
            for an operator with structural zeros (an inpainting hole), where A Aᵀ is singular.
        cg_iterations: the most conjugate-gradient iterations per solve (>= 1); a sample stops at a relative
            residual of 1e-6 (1e-12 in float64), and the solve when all have (one device read per iteration).
            Masks and SR converge in one or two, deblurring needs about sqrt(‖A‖² r² / σ²) times a few.
        official_sr_weight: use the official SR branch's r² = s² / (s² + N (1 − s)²) (its operator-precedence
            slip, for parity runs) instead of s² / (s² + (1 − s)²).
        check_divergence: stop with a :class:`DivergenceError` naming the step and the state's scale when the
            state becomes NaN/inf or a sample's RMS exceeds ``DIVERGENCE_FACTOR`` (100) times its reference scale;
            read once, after the loop.

    Returns:
        :class:`MethodResult`; ``sigmas`` holds the levels s_k of the steps taken and the final 0;
        ``info["cg_iterations"]``: the conjugate-gradient iterations each sample ran over the whole run,
        ``info["network_backward_passes"]``: the number of backward passes through the network.
    """
    check_count(num_steps, "num_steps", 1, MAX_STEPS)
    start_time = check_number(start_time, "start_time", 0, 1, strict_minimum=True)
    if start_time >= 1:
        raise ValueError(f"start_time must be below 1 (the paper time t_0 of the first step; 0.1 to 0.4 in the "
                         f"official runs), got {start_time:g}")
    if gamma not in GAMMAS:
        raise ValueError(f"gamma must be one of {GAMMAS} (the official 'constant' or 'gamma_t'), got {gamma!r}")
    if noise_std is not None:
        noise_std = check_nonnegative(noise_std, "noise_std")
    check_count(cg_iterations, "cg_iterations", minimum=1)
    check_flag(official_sr_weight, "official_sr_weight")
    first = first_step(num_steps, start_time)
    check_work({"num_steps": num_steps - first, "cg_iterations": cg_iterations}, "ot_ode")
    objective = require_linear_measurement(objective, "ot_ode", "it applies A and Aᵀ to images")
    require_pixel_model(model, "ot_ode", "its correction applies A and Aᵀ to the state and differentiates the "
                        "network's clean estimate")
    operator = objective.operator
    sigma_y = objective.noise_std if noise_std is None else noise_std
    if sigma_y == 0 and operator.structural_zeros:
        raise ValueError(f"ot_ode with noise_std 0 solves (r² A Aᵀ) u = y − A x0_hat, singular for "
                         f"{type(operator).__name__} (A Aᵀ is 0 on its unmeasured entries); pass noise_std > 0, e.g. "
                         f"1e-3, or a measurement objective with its noise level")
    if first >= num_steps:
        raise ValueError(f"start_time {start_time:g} with num_steps {num_steps} starts at the last grid point "
                         f"(t = {first}/{num_steps}) and takes no step; lower start_time or raise num_steps")

    batch_size = measurement_batch_size(objective, batch_size, latents)
    counted = CountingModel(model)
    state = start_state(counted, cond, num_steps, height, width, generator, batch_size, latents)
    eps, cond = state.x, state.cond
    objective.bind(model, state.height, state.width)
    y = objective.y.to(device=eps.device, dtype=eps.dtype)
    sigmas = torch.tensor([1 - k / num_steps for k in range(first, num_steps + 1)], dtype=torch.float32,
                          device=eps.device)

    def normal_matrix(r2: float):
        return lambda u: r2 * operator(operator.adjoint(u)) + sigma_y**2 * u

    x = interpolate(operator.adjoint(y), eps, 1 - first / num_steps)
    cg_ran = 0
    monitor = DivergenceMonitor("ot_ode", f"use a later start_time than {start_time:g} (the correction weighs "
                                f"(1 − t) / t) or a larger noise_std", check_divergence, reference_scale(model, eps))
    for i, k in enumerate(tqdm(range(first, num_steps), disable=not progress, desc="ot_ode")):
        s, s_next = 1 - k / num_steps, 1 - (k + 1) / num_steps
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            v = counted.velocity(x_in, s, cond, grad=True)
            x0_hat = x0_from_velocity(x_in, v, s)
        r2 = s**2 / (s**2 + (num_steps if official_sr_weight else 1) * (1 - s) ** 2)
        u, ran = conjugate_gradient(normal_matrix(r2), y - operator(x0_hat.detach()), max_iters=cg_iterations,
                                    rtol=1e-12 if x.dtype == torch.float64 else 1e-6)
        cg_ran = cg_ran + ran
        (g,) = torch.autograd.grad(x0_hat, x_in, grad_outputs=operator.adjoint(u))
        v, x0_hat = v.detach(), x0_hat.detach()
        if callback is not None:
            callback({"step": i, "sigma": s, "x": x, "x0_hat": x0_hat})
        t = 1 - s
        weight = 1.0 if gamma == "constant" else math.sqrt(t / (t**2 + s**2))
        x = euler_step(x, v, s, s_next) + (s - s_next) * s / t * weight * g
        x = step_end(on_step_end, i, s, s_next, {"x": x})
        monitor.update(x, i)
    monitor.finish()

    image = model.decode(x) if decode else None
    return MethodResult(x=x, image=image, nfe=counted.nfe, sigmas=sigmas,
                        info={"cg_iterations": cg_ran, "network_backward_passes": num_steps - first})


# The official CelebA settings (128×128 images in [-1, 1], the OT flow-matching U-Net, "model ot"):
# scripts/script_test.sh gives start_time and gamma per problem, config/method_config/ot_ode.yaml steps_ode 100,
# main.py the noise levels and pnpflow/degradations.py the operators (the same stand-ins as pnp_flow's presets).
_SOURCE = ("Pokle et al., Training-free Linear Image Inverses via Flows, TMLR 2024; run as in Martin et al., "
           "PnP-Flow, ICLR 2025: github.com/annegnx/PnP-Flow @ ee5b159e6edff4d585ebf36c9a5333ffa85e066c: "
           "scripts/script_test.sh (start_time, gamma), config/method_config/ot_ode.yaml (steps_ode), main.py "
           "(problem, sigma_noise), pnpflow/degradations.py (operator), pnpflow/methods/ot_ode.py (the loop)")
QUIRKS = {
    "sr_weight_precedence": "the superresolution branch's r² = (1 − t)² / ((1 − t)² + delta*iteration**2), i.e. "
                            "k²/N instead of t² in the denominator (ot_ode(official_sr_weight=True))",
}


def _preset(operators: list[str], start_time: float, gamma: str, noise_std: float, note: str,
            **extra: Any) -> dict:
    return {"method": "ot_ode", "num_steps": 100, "options": {"start_time": start_time, "gamma": gamma},
            "objective": {"space": "pixel", "weight": 1.0, "reduction": "sum"}, "operators": operators,
            "noise_std": noise_std, "resolution": 128, "source": _SOURCE, "note": note, **extra}


PRESETS: dict[str, dict[str, Any]] = {
    "ot_ode_celeba_denoise": _preset(["denoise"], 0.3, "gamma_t", 0.2, "problem denoising: A = I"),
    "ot_ode_celeba_deblur": _preset(
        ["gaussian_blur:kernel_size=61,sigma=1.0,padding=circular"], 0.4, "gamma_t", 0.05,
        "problem gaussian_deblurring_FFT: a 61-tap Gaussian of σ 1 applied by FFT, i.e. with circular padding; the "
        "official closed-form Fourier solve is replaced by conjugate gradients"),
    "ot_ode_celeba_sr2": _preset(
        ["sr_avgpool:factor=2"], 0.1, "constant", 0.05,
        "problem superresolution (×2 at 128²): the official operator keeps the top-left pixel of each 2×2 block, "
        "which no operator spec offers; 2×2 averaging stands in (the Gaussian-posterior solve adapts to its A Aᵀ = "
        "I/4 by itself). The published numbers were made with the SR branch's operator-precedence r² (quirk "
        "sr_weight_precedence; get_preset(name, official_quirks=True) switches it on)",
        quirks=dict(QUIRKS), parity={"options": {"official_sr_weight": True}}),
    "ot_ode_celeba_inpaint_box": _preset(
        ["inpaint_box:size=40"], 0.1, "gamma_t", 0.05, "problem inpainting: a centred 40×40 hole (half_size_mask 20)"),
    "ot_ode_celeba_inpaint_freeform": _preset(
        ["inpaint_freeform"], 0.1, "gamma_t", 0.05,
        "problem paintbrush_inpainting: the official brush-stroke masks come from their own generator (seed 42); "
        "inpaint_freeform's strokes stand in"),
    "ot_ode_celeba_inpaint_random": _preset(
        ["inpaint_random:fraction=0.7"], 0.1, "constant", 0.01,
        "problem random_inpainting: the official mask drops each pixel with probability 0.7 (all channels alike); "
        "inpaint_random drops exactly 70 %"),
}
