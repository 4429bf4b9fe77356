"""D-Flow: optimise the source noise through the flow map (Ben-Hamu et al., "D-Flow: Differentiating through
Flows for Controlled Generation", ICML 2024).

The sample T(z) is the flow's ODE solution from the noise z (s = 1) to the data (s = 0); D-Flow minimises the
loss of that sample over z, backpropagating through the whole ODE trajectory, with the χ_d negative
log-likelihood of ‖z‖ keeping z where noise lives. The start is the (inverted) back-projection of the
measurement, blended with fresh noise::

    z_inv = T⁻¹(E(Aᵀ y))                      integrate dx/ds = v_theta(x, s) from s = 0 to s = 1 (dopri5, no grad)
    z     = sqrt(α) z_inv + sqrt(1 − α) ε,     ε ~ N(0, I)            (z = ε without a linear operator)
    repeat max_iter times:
        L-BFGS (strong Wolfe, history 100, lbfgs_iter iterations) on
            J(z) = Σ_b [ L(T(z)_b) + λ R(z_b) ],   R(z) = ½ ‖z‖² − (d − 1) log(‖z‖ + 1e-5)
    return D(T(z))

    T(z): x = z; for i in 0 .. N−1 (s_0 = 1 > s_1 > ... > s_N = 0, h = s_{i+1} − s_i):
        x = x + h v_theta(x + (h/2) v_theta(x, s_i), s_i + h/2)             explicit midpoint rule

L is the objective's per-sample loss of the state (``objective(model, x)``, which decodes for a pixel-space
objective): for ``MeasurementFidelity(op, y, reduction="sum", weight=1)`` it is ‖A D(x) − y‖², the official
loss. R is −log χ_d(‖z‖) up to a constant (d = the number of elements of one z), with the official clamp of
‖z‖² to [−10⁶, 10⁶] and the 1e-5 inside the logarithm.

Correspondence with the official code (annegnx/PnP-Flow at commit ee5b159e6edff4d585ebf36c9a5333ffa85e066c,
pnpflow/methods/d_flow.py: ``D_FLOW.solve_ip``, ``forward_flow_matching``, ``inverse_flow_matching``, class
``cnf``; config/method_config/d_flow.yaml; scripts/script_test.sh; main.py). Their time runs t = 0 noise →
t = 1 data with x_t = t x1 + (1 − t) x0 (x0 noise), so s = 1 − t and their velocity is −v here.

* steps_euler = num_steps + 1: their ``forward_flow_matching`` takes steps_euler − 1 midpoint steps of
  δ = (1 − start_time) / (steps_euler − 1) from t = start_time; the published steps_euler = 6 is num_steps = 5,
  and start_time = 0 is s_0 = 1. Their grid t_i = i δ is ``time_grid="uniform"`` (s_i = 1 − i / N); the
  default ``"model"`` takes the model's own schedule, the same grid for an unshifted model (the analytic
  priors, the PnP-Flow networks) and the shifted one an SD3 / Flux model samples with.
* lmbda, alpha, max_iter, LBFGS_iter = ``lmbda``, ``alpha``, ``max_iter``, ``lbfgs_iter``; yaml defaults 0.01,
  0.1, 20, 20, and the published runs (scripts/script_test.sh) lmbda 0.001, alpha 0.1 and max_iter 3 / 7 / 10 /
  9 / 9 for denoising / deblurring / SR / box / paintbrush inpainting (:data:`PRESETS`). The optimiser is the
  same ``torch.optim.LBFGS(max_iter=LBFGS_iter, history_size=100, line_search_fn="strong_wolfe")``, stepped
  max_iter times with its state (history) kept across the outer iterations. flowsteer's defaults: N = 5,
  λ = 0.01, α = 0.1, max_iter = 5, lbfgs_iter = 20 (see the arguments).
* The inversion is torchdiffeq's ``odeint_adjoint(..., [1.0, 0.0], method="dopri5", atol=1e-5, rtol=1e-5)`` from
  H_adj(y) = Aᵀy: :func:`dopri5` reimplements its Dormand–Prince 5(4) pair with its defaults (Hairer's initial
  step selection, the RMS error norm over the whole batch with tolerance atol + rtol · max(|y0|, |y1|), safety
  0.9, growth at most 10×, shrinking at most 5× and only after a rejected step).

Official-code quirks, and what flowsteer does:

* torchdiffeq's last step overshoots the end time and interpolates back to it, so the network is evaluated past
  t = 0 (s > 1, outside its training range; the analytic priors refuse it). NOT copied: the last step is
  shortened to land on s = 1. Measured on the analytic 1×8×8 prior (Aᵀy of box inpainting, SR×2 and blur, batch
  16), where torchdiffeq's last step reached s = 1.01 to 1.31: the two inversions differ by at most 2e-5, far
  below the blend noise √(1 − α) ε, √(1 − α) = 0.95. torchdiffeq also casts the times to the state's dtype and nudges the
  end time of a step by one ulp ("perturb"): not copied, immaterial for a continuous velocity.
* The batch is ONE optimisation: the loss is summed over the samples and one L-BFGS (one line search, one
  history) runs on the whole batch, so a sample's result depends on the others in its batch. Copied (parity);
  run samples in separate calls for independent results.
* ``loss.backward()`` also accumulates gradients into the network's parameters (wasted memory and work). NOT
  copied: the gradient is taken with respect to z only.
* The regulariser's clamp of ‖z‖² at 10⁶ zeroes the gradient of its quadratic term once ‖z‖² > 10⁶, i.e. for z of
  more than about 10⁶ elements (a 16×256×256 latent), leaving −(d − 1) log‖z‖ to push ‖z‖ up. Copied.
* After each outer iteration the official loop evaluates T(z) and discards it (its metrics are commented out).
  Here T(z) is evaluated after each outer iteration only when a ``callback`` is given, which costs 2N NFE.
* The "rectified" (CelebA-HQ) models get t · 999 as time, the OT models t; both are the model's own convention
  (the adapter's business here). Only the Gaussian-noise problems are covered, not the Laplace ones.

Beyond the official code: latent models (the paper's latent experiments): z is the latent, T(z) decoded by the
objective, and the inversion starts from E(Aᵀy); any :class:`~guidance.objectives.Objective` (classifier,
reward): without a linear operator there is nothing to invert and z starts from pure noise ε.

Gradient checkpointing (``gradient_checkpointing=True``): each midpoint step of T runs under
``torch.utils.checkpoint`` (non-reentrant), so the backward pass keeps only the N step inputs and recomputes one
step's network activations at a time: memory flat in N, at the price of one more forward pass of T per
gradient. Peak allocated CPU memory of one evaluation of J and its gradient, measured with torch's profiler
(``profile_memory=True``: the running sum of the allocation records), on the analytic 3×16×16 prior with six
components, batch 8, float32 state:

    =========  ===================  ================
    num_steps  without checkpoints  with checkpoints
    =========  ===================  ================
    5          282 MiB              57 MiB
    50         2814 MiB             59 MiB
    =========  ===================  ================

The time is one more forward pass of T per gradient: about 4/3 of forward + backward when a backward pass costs
two forward passes (each checkpointed step counts its 2 recomputed evaluations in ``nfe``). Wall-clock ratios
on the shared 2-core test machine scattered between 0.6 and 2.2 over repeated runs, too noisy to quote.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from operators.checks import MAX_STEPS, check_number, check_work

from ..objectives import MeasurementFidelity, Objective
from ..sampler import start_state, step_end
from .common import (CountingModel, DivergenceMonitor, MethodResult, check_count, check_flag, check_nonnegative,
                     is_pixel_model, measurement_batch_size, reference_scale)

__all__ = ["DEFAULT_ALPHA", "DEFAULT_TOLERANCE", "INVERSIONS", "PRESETS", "TIME_GRIDS", "chi_regularizer", "d_flow",
           "dopri5", "flow_map", "midpoint_step"]

INVERSIONS = ("dopri5", "midpoint")
TIME_GRIDS = ("model", "uniform")
DEFAULT_ALPHA = 0.1  # the blend of the official config and of every published run
DEFAULT_TOLERANCE = 1e-5  # the official atol = rtol of the dopri5 inversion
HISTORY_SIZE = 100  # L-BFGS memory, as in the official code
DOPRI5_MAX_STEPS = 10_000  # step attempts of one inversion before it is declared stiff

# Dormand–Prince 5(4) (Shampine's coefficients, as torchdiffeq's dopri5): the nodes c_i, the stage weights a_ij,
# the 5th-order solution b (the FSAL 7th stage is evaluated at it) and b − b̂, the error estimate's weights.
_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = ((1 / 5,),
      (3 / 40, 9 / 40),
      (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
      (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_E = (35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
      -2187 / 6784 - -12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60)
_SAFETY, _GROW, _SHRINK, _ORDER = 0.9, 10.0, 0.2, 5


def _rms(x: torch.Tensor) -> float:
    """Root mean square over all elements (torchdiffeq's ``_rms_norm``); a host read: step control needs it."""
    return float(x.abs().pow(2).mean().sqrt())


def _initial_step(func: Callable, t0: float, y0: torch.Tensor, f0: torch.Tensor, atol: float, rtol: float) -> float:
    """The first step of Hairer, Nørsett & Wanner (Sec. II.4), as torchdiffeq's ``_select_initial_step`` with
    order 4 (one function evaluation)."""
    scale = atol + y0.abs() * rtol
    d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = func(t0 + h0, y0 + h0 * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / _ORDER)
    return min(100 * h0, h1)


def dopri5(func: Callable[[float, torch.Tensor], torch.Tensor], y0: torch.Tensor, t0: float, t1: float,
           atol: float = DEFAULT_TOLERANCE, rtol: float = DEFAULT_TOLERANCE,
           max_steps: int = DOPRI5_MAX_STEPS) -> tuple[torch.Tensor, int]:
    """Integrate dy/dt = func(t, y) from t0 to t1 > t0 with the adaptive Dormand–Prince 5(4) pair and the step
    control of torchdiffeq's ``dopri5`` defaults (see the module docstring), the last step shortened to end on
    t1. The error of a step is the RMS over all of y (the whole batch at once, as torchdiffeq) of
    err / (atol + rtol · max(|y_n|, |y_{n+1}|)); a step is accepted when it is <= 1.

    Returns (y(t1), the number of step attempts). A ValueError when ``max_steps`` attempts do not reach t1 or
    the step underflows (a stiff or non-finite field)."""
    if not t1 > t0:
        raise ValueError(f"dopri5 integrates forward in time: need t1 > t0, got t0={t0}, t1={t1}")
    f = func(t0, y0)
    h = _initial_step(func, t0, y0, f, atol, rtol)
    t, y = t0, y0
    attempts = 0
    while t < t1:
        if attempts >= max_steps:
            raise ValueError(f"dopri5 did not reach t={t1} in {max_steps} steps (stuck at t={t:.6g}, step {h:.3g}): "
                             f"the velocity field is stiff or not finite; use inversion='midpoint' or looser atol/rtol")
        last = t + h >= t1
        step = t1 - t if last else h
        if not t + step > t:
            raise ValueError(f"dopri5 step underflow at t={t:.6g} (step {step:.3g}): the velocity field is not finite "
                             f"or too stiff; use inversion='midpoint' or looser atol/rtol")
        k = [f]
        for c, row in zip(_C, _A):
            stage = y + step * sum(a * k_j for a, k_j in zip(row, k) if a != 0.0)
            k.append(func(t + c * step if c != 1.0 else t + step, stage))
        y_new = stage  # the last stage's input is the 5th-order solution (first same as last)
        error = step * sum(e * k_j for e, k_j in zip(_E, k) if e != 0.0)
        ratio = _rms(error / (atol + rtol * torch.maximum(y.abs(), y_new.abs())))
        attempts += 1
        if ratio <= 1:
            t, y, f = (t1 if last else t + step), y_new, k[-1]
        # torchdiffeq's _optimal_step_size: an accepted step never shrinks the next one
        if ratio == 0:
            factor = _GROW
        else:
            floor = 1.0 if ratio < 1 else _SHRINK
            factor = min(_GROW, max(_SAFETY / ratio ** (1.0 / _ORDER), floor))
        if not math.isfinite(factor):
            raise ValueError(f"dopri5: the error estimate is not finite at t={t:.6g}: the velocity field is not finite")
        h = step * factor
    return y, attempts


def midpoint_step(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                  s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
    """One explicit midpoint step from s to s_next: x + h v(x + (h/2) v(x, s), s + h/2), h = s_next − s (two
    evaluations); the official ``forward_flow_matching`` step."""
    h = s_next - s
    x_mid = x + (h / 2) * velocity(x, s)
    return x + h * velocity(x_mid, s + h / 2)


def flow_map(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor,
             sigmas: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
    """T(z): midpoint steps over ``sigmas`` (s_0 > s_1 > ... > s_N). With ``checkpointing`` and autograd on, each
    step runs under ``torch.utils.checkpoint``: the backward pass keeps the step inputs only and recomputes the
    step's activations, so the memory of a gradient through T does not grow with N."""
    x = z
    for i in range(len(sigmas) - 1):
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(midpoint_step, velocity, x, sigmas[i], sigmas[i + 1], use_reentrant=False)
        else:
            x = midpoint_step(velocity, x, sigmas[i], sigmas[i + 1])
    return x


def chi_regularizer(z: torch.Tensor) -> torch.Tensor:
    """(B,) −log χ_d(‖z‖) up to a constant, as the official closure writes it:
    ½ clamp(‖z‖², −10⁶, 10⁶) − (d − 1) log(‖z‖ + 1e-5), d = the number of elements of one sample."""
    d = z[0].numel()
    norm = torch.sqrt(z.square().flatten(1).sum(1))
    return 0.5 * torch.clamp(norm**2, min=-1e6, max=1e6) - (d - 1) * torch.log(norm + 1e-5)


def _grid(model, num_steps: int, time_grid: str, height: int, width: int, device) -> torch.Tensor:
    """s_0 = 1 > ... > s_N = 0 (float32): the model's schedule or the official uniform one, 1 − i / N."""
    if time_grid == "model":
        return model.sigmas(num_steps, height, width).to(device=device, dtype=torch.float32)
    steps = torch.arange(num_steps + 1, dtype=torch.float64)
    return (1 - steps / num_steps).float().to(device)


def _linear_operator(objective: Objective):
    """The objective's linear operator A, or None when it has none (D-Flow then starts from pure noise)."""
    if isinstance(objective, MeasurementFidelity) and getattr(objective.operator, "is_linear", False):
        return objective.operator
    return None


def _back_projection(model, objective: MeasurementFidelity, batch: int, shape: tuple[int, ...]) -> torch.Tensor:
    """E(Aᵀ y) (B, C, h, w): the measurement's back-projection, encoded for a latent model."""
    y = objective.y.to(model.device)
    start = objective.operator.adjoint(y)
    if not is_pixel_model(model):
        start = model.encode(start.contiguous())
    start = start.to(torch.float32)
    if start.shape[0] == 1 and batch > 1:
        start = start.expand(batch, *start.shape[1:])
    if tuple(start.shape) != (batch, *shape):
        raise ValueError(f"the back-projection Aᵀy has shape {tuple(start.shape)} but the run's state has "
                         f"{(batch, *shape)}; give one measurement per sample (or a single shared one)")
    return start


@torch.no_grad()
def d_flow(model, objective: Objective, *, num_steps: int = 5, cond=None, height=None, width=None, generator=None,
           callback=None, progress: bool = True, batch_size=None, latents=None, decode: bool = True,
           on_step_end=None, lmbda: float = 0.01, alpha: float | None = None, max_iter: int = 5,
           lbfgs_iter: int = 20, inversion: str | None = None, inversion_steps: int | None = None,
           atol: float | None = None, rtol: float | None = None, time_grid: str = "model",
           gradient_checkpointing: bool = True, check_divergence: bool = True) -> MethodResult:
    """D-Flow (Ben-Hamu et al., ICML 2024): L-BFGS on the source noise z of the midpoint flow map T, from the
    inverted back-projection of the measurement blended with noise (see the module docstring).

    Args:
        model, objective, num_steps, cond, height, width, generator, callback, progress, batch_size, latents,
            decode: the common method arguments (see ``guidance.methods``). ``num_steps`` is N, the number of
            midpoint steps of T (2N network evaluations per evaluation of T; the official steps_euler is N + 1).
            ``latents`` is the blend noise ε (fresh noise from ``generator`` by default); ``batch_size``
            defaults to the measurement's batch for a :class:`MeasurementFidelity`. The callback runs after each
            outer iteration with ``x`` = z and ``x0_hat`` = T(z) (2N extra evaluations each);
            ``on_step_end`` gets and may replace z.
        lmbda: λ >= 0, the weight of the χ regulariser R(z) against the objective's loss; default 0.01, the
            official config's value (the published runs: 0.001), both for ``MeasurementFidelity(reduction="sum",
            weight=1)``; with another weight or reduction, scale λ alike.
        alpha: α in [0, 1], the blend z = √α z_inv + √(1 − α) ε (default 0.1, the published value). Only for an
            objective with a linear operator: without one z starts from ε and α has no effect (refused). α = 0
            skips the inversion.
        max_iter: outer iterations (L-BFGS ``step`` calls), >= 1; default 5, inside the published 3 to 10
            (config: 20). The fit of the measurement keeps improving with more iterations and overfits its noise:
            on the analytic benchmark (1×8×8, noise 0.05, N = 50, 16 pairs) MSE / MMSE was 1.2–2.0 over its three
            operators at 5, 1.4–3.3 at 10 and 1.4–3.1 at 2 (λ = 0.01).
        lbfgs_iter: L-BFGS iterations per outer iteration, >= 1; an outer iteration evaluates J (T and its
            gradient) at most ⌊1.25 lbfgs_iter⌋ times, the line search included (torch's ``max_eval``).
        inversion: how z_inv = T⁻¹(E(Aᵀy)) is computed: "dopri5" (default; the official adaptive Dormand–Prince
            integration, :func:`dopri5`) or "midpoint" (fixed midpoint steps over the reversed grid, 2 ×
            ``inversion_steps`` evaluations). Refused where there is no inversion (no linear operator, α = 0).
        inversion_steps: midpoint steps of the "midpoint" inversion (default ``num_steps``: the same grid as T).
        atol, rtol: > 0, the dopri5 tolerances (default 1e-5, the official); "dopri5" only.
        time_grid: "model" (the model's schedule) or "uniform" (the official s_i = 1 − i / N, also for a shifted
            model); for T and the midpoint inversion.
        gradient_checkpointing: checkpoint each midpoint step of T (memory flat in N, one more forward pass of
            T per gradient; see the module docstring for measured figures).
        check_divergence: stop with a :class:`DivergenceError` when z becomes NaN/inf or a sample's RMS exceeds
            ``DIVERGENCE_FACTOR`` (100) times its reference scale; checked after each outer iteration.

    Returns:
        :class:`MethodResult`: ``x`` = T(z) at the final z (float32), ``sigmas`` the grid of T (N + 1 values);
        ``nfe`` counts every network evaluation: the inversion's, the L-BFGS evaluations' (with checkpointing
        the recomputation in the backward pass too) and the final T(z). ``info``: ``"loss"`` (B,) the objective's
        loss of the result, ``"start_loss"`` (B,) that of T(z) at the start z, ``"z"`` the optimised noise,
        ``"inversion_nfe"``, ``"evaluations"`` (evaluations of the L-BFGS objective J).
    """
    lmbda = check_nonnegative(lmbda, "lmbda")
    max_iter = check_count(max_iter, "max_iter", minimum=1)
    lbfgs_iter = check_count(lbfgs_iter, "lbfgs_iter", minimum=1)
    check_count(num_steps, "num_steps", 1, MAX_STEPS)
    check_work({"max_iter": max_iter, "lbfgs_iter": lbfgs_iter, "num_steps": num_steps}, "d_flow")
    check_flag(gradient_checkpointing, "gradient_checkpointing")
    if time_grid not in TIME_GRIDS:
        raise ValueError(f"time_grid must be one of {TIME_GRIDS} ('uniform' is the official grid 1 − i/N), "
                         f"got {time_grid!r}")
    if not isinstance(objective, Objective):
        raise ValueError(f"d_flow needs an Objective (e.g. MeasurementFidelity), got {type(objective).__name__}")
    operator = _linear_operator(objective)
    if operator is None and alpha is not None:
        raise ValueError(f"alpha={alpha!r} blends the inverted Aᵀy into the start, but {type(objective).__name__} "
                         f"has no linear operator, so d_flow starts from pure noise; drop alpha")
    alpha = DEFAULT_ALPHA if alpha is None else check_number(alpha, "alpha", 0.0, 1.0)
    inverts = operator is not None and alpha > 0
    if not inverts and inversion is not None:
        why = "alpha=0 discards the inversion" if operator is not None else \
            f"{type(objective).__name__} has no linear operator (the start is pure noise)"
        raise ValueError(f"inversion={inversion!r} does nothing here: {why}; drop inversion")
    inversion = "dopri5" if inversion is None else inversion
    if inversion not in INVERSIONS:
        raise ValueError(f"inversion must be one of {INVERSIONS}, got {inversion!r}")
    if (atol is not None or rtol is not None) and not (inverts and inversion == "dopri5"):
        raise ValueError("atol and rtol set the dopri5 inversion's tolerances; this run does not use dopri5 "
                         "(inversion='midpoint', alpha=0 or no linear operator): drop them")
    if inversion_steps is not None and not (inverts and inversion == "midpoint"):
        raise ValueError("inversion_steps counts the steps of inversion='midpoint'; this run does not use it: drop "
                         "inversion_steps (or pass inversion='midpoint')")
    atol = DEFAULT_TOLERANCE if atol is None else check_number(atol, "atol", 0.0, strict_minimum=True)
    rtol = DEFAULT_TOLERANCE if rtol is None else check_number(rtol, "rtol", 0.0, strict_minimum=True)
    inversion_steps = num_steps if inversion_steps is None else check_count(inversion_steps, "inversion_steps", 1,
                                                                           MAX_STEPS)

    batch_size = measurement_batch_size(objective, batch_size, latents)
    counted = CountingModel(model)
    state = start_state(counted, cond, num_steps, height, width, generator, batch_size, latents)
    eps, cond = state.x, state.cond
    objective.bind(model, state.height, state.width)
    sigmas = _grid(model, num_steps, time_grid, state.height, state.width, eps.device)

    def velocity(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return counted.velocity(x, s, cond, grad=torch.is_grad_enabled())

    # z_inv = T⁻¹(E(Aᵀy)): the ODE from the data (s = 0) back to the noise (s = 1), without autograd
    z = eps
    if inverts:
        start = _back_projection(model, objective, eps.shape[0], tuple(eps.shape[1:]))
        if inversion == "dopri5":
            def field(s: float, x: torch.Tensor) -> torch.Tensor:
                return velocity(x, torch.tensor(s, dtype=x.dtype, device=x.device))
            z_inv, _ = dopri5(field, start, 0.0, 1.0, atol, rtol)
        else:
            back = _grid(model, inversion_steps, time_grid, state.height, state.width, eps.device).flip(0)
            z_inv = flow_map(velocity, start, back)
        z = math.sqrt(alpha) * z_inv + math.sqrt(1 - alpha) * eps
    inversion_nfe = counted.nfe

    z = z.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)
    optimizer = torch.optim.LBFGS([z], max_iter=lbfgs_iter, history_size=HISTORY_SIZE, line_search_fn="strong_wolfe")
    evaluations, start_loss = 0, None

    def closure() -> torch.Tensor:
        nonlocal evaluations, start_loss
        evaluations += 1
        fidelity = objective(model, flow_map(velocity, z, sigmas, gradient_checkpointing))
        if start_loss is None:
            start_loss = fidelity.detach()
        loss = (fidelity + lmbda * chi_regularizer(z)).sum()
        # z only: no network parameter accumulates a gradient; L-BFGS flattens it with view(), so contiguous
        z.grad = torch.autograd.grad(loss, z)[0].contiguous()
        return loss.detach()

    hint = f"use a larger lmbda than {lmbda} (it keeps ‖z‖ near that of noise) or fewer max_iter"
    monitor = DivergenceMonitor("d_flow", hint, check_divergence, reference_scale(model, eps, z))
    for iteration in tqdm(range(max_iter), disable=not progress, desc="d_flow"):
        optimizer.step(closure)  # L-BFGS reads the loss on the host in its line search: syncs are inherent
        if callback is not None:
            callback({"step": iteration, "sigma": sigmas[0], "x": z.detach(), "x0_hat": flow_map(velocity, z, sigmas)})
        if on_step_end is not None:
            z.copy_(step_end(on_step_end, iteration, sigmas[0], sigmas[0], {"x": z.detach()}))
        monitor.update(z, iteration)
        monitor.check()  # the optimiser synchronises anyway; stop before more evaluations of T
    monitor.finish()

    z = z.detach()
    x = flow_map(velocity, z, sigmas)
    loss = objective(model, x)
    image = model.decode(x) if decode else None
    return MethodResult(x=x, image=image, nfe=counted.nfe, sigmas=sigmas,
                        info={"loss": loss, "start_loss": start_loss, "z": z, "inversion_nfe": inversion_nfe,
                              "evaluations": evaluations})


# The official CelebA settings (128×128 images in [-1, 1], an OT flow-matching U-Net): scripts/script_test.sh gives
# lmbda 0.001, alpha 0.1 and max_iter per problem (the D FLow block), config/method_config/d_flow.yaml steps_euler 6,
# LBFGS_iter 20, start_time 0; main.py the degradations and noise levels, pnpflow/degradations.py the operators.
_SOURCE = ("Ben-Hamu et al., D-Flow, ICML 2024; as run by Martin et al., PnP-Flow, ICLR 2025: "
           "github.com/annegnx/PnP-Flow @ ee5b159e6edff4d585ebf36c9a5333ffa85e066c: scripts/script_test.sh (lmbda, "
           "alpha, max_iter), config/method_config/d_flow.yaml (steps_euler, LBFGS_iter, start_time), "
           "pnpflow/methods/d_flow.py (loop, dopri5 inversion atol = rtol = 1e-5), main.py (problem, sigma_noise), "
           "pnpflow/degradations.py (operator)")


def _preset(operators: list[str], max_iter: int, noise_std: float, note: str) -> dict:
    return {"method": "d_flow", "num_steps": 5,
            "options": {"lmbda": 0.001, "alpha": 0.1, "max_iter": max_iter, "lbfgs_iter": 20, "inversion": "dopri5",
                        "atol": 1e-5, "rtol": 1e-5, "time_grid": "uniform"},
            "objective": {"space": "pixel", "weight": 1.0, "reduction": "sum"}, "operators": operators,
            "noise_std": noise_std, "resolution": 128, "source": _SOURCE,
            "note": f"{note}; steps_euler 6 = 5 midpoint steps"}


PRESETS: dict[str, dict[str, Any]] = {
    "d_flow_celeba_denoise": _preset(["denoise"], 3, 0.2, "problem denoising: A = I"),
    "d_flow_celeba_deblur": _preset(
        ["gaussian_blur:kernel_size=61,sigma=1.0,padding=circular"], 7, 0.05,
        "problem gaussian_deblurring_FFT: a 61-tap Gaussian of σ 1 applied by FFT, i.e. with circular padding"),
    "d_flow_celeba_sr2": _preset(
        ["sr_avgpool:factor=2"], 10, 0.05,
        "problem superresolution (×2 at 128²): the official operator keeps the top-left pixel of each 2×2 block, "
        "whose adjoint puts y back on those pixels and zeros elsewhere; no operator spec offers it, and 2×2 "
        "averaging stands in (its adjoint spreads y / 4 over each block, so the inversion starts from a dimmer, "
        "smoother Aᵀy)"),
    "d_flow_celeba_inpaint_box": _preset(
        ["inpaint_box:size=40"], 9, 0.05, "problem inpainting: a centred 40×40 hole (half_size_mask 20)"),
    "d_flow_celeba_inpaint_freeform": _preset(
        ["inpaint_freeform"], 9, 0.05,
        "problem paintbrush_inpainting: the official brush-stroke masks come from their own generator (seed 42); "
        "inpaint_freeform's strokes stand in"),
}
