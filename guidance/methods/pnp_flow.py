"""PnP-Flow: plug-and-play restoration with a flow model as denoiser (Martin et al., ICLR 2025).

Forward-backward splitting whose "backward" step is the flow's one-step clean estimate, run over a
decreasing time grid (paper time t = 1 − s; the grid is the model's own schedule s_0 = 1 > ... > s_{N-1} > 0,
uniform for an unshifted model, as in the paper)::

    x ~ N(0, I)                                      (discarded by the first step, where s_0 = 1)
    for i in 0 .. N-1:
        γ_i = γ · s_i^α  (/ ‖A‖² with normalize_step)  the paper's (1 − t)^α step schedule
        z   = x − γ_i ∇_x F(x)                       gradient step on the data term
        x   = (1/M) Σ_m [x̃_m − s_i v_theta(x̃_m, s_i)],   x̃_m = (1 − s_i) z + s_i ε_m,  ε_m ~ N(0, I) fresh
    return D(x)

The network is only evaluated, never differentiated. For a latent model the data step is taken on the
latent: ∇_x F(x) is the gradient of the objective at x (through the decoder for a pixel-space objective,
``objective_gradient``), rather than on the decoded image followed by re-encoding. It applies to any
objective (not only those with an image-space proximal point), costs one decoder backward per step instead
of an encoder pass, and never leaves the latent space, where the re-noising and the clean estimate live.
For a pixel model (the paper's setting) both readings coincide.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..flow import interpolate, x0_from_velocity
from ..objectives import Objective, objective_gradient
from ..sampler import initial_noise, start_state, step_end
from .common import (CountingModel, DivergenceMonitor, MethodResult, check_count, check_flag, check_nonnegative,
                     data_term_gain, measurement_batch_size)

__all__ = ["pnp_flow"]


@torch.no_grad()
def pnp_flow(model, objective: Objective, *, num_steps: int = 28, cond=None, height=None, width=None,
             generator=None, callback=None, progress: bool = True, batch_size=None, latents=None,
             decode: bool = True, callback_on_step_end=None, step_size: float = 0.5, step_exponent: float = 0.0, num_draws: int = 2,
             normalize_step: bool = False, check_divergence: bool = True) -> MethodResult:
    """PnP-Flow (Martin et al., ICLR 2025): data gradient step, re-noising to level s, one-step clean estimate
    averaged over ``num_draws`` noise draws (see the module docstring).

    Args:
        model, objective, num_steps, cond, height, width, generator, callback, progress, batch_size, latents,
            decode: the common method arguments (see ``guidance.methods``). ``num_steps`` is the number of
            iterations N (each costs ``num_draws`` network evaluations); ``batch_size`` defaults to the
            measurement's batch for a :class:`MeasurementFidelity` (a batch-1 y is shared); ``generator`` also
            draws the re-noising ε at every step (None: torch's global generator, as in :func:`guidance.sample`);
            the callback's ``x`` is the last re-noised x̃ and its ``x0_hat`` the averaged estimate.
        step_size: γ >= 0 of the data step x − γ s^α ∇F(x). For F = ‖A x − y‖² (``MeasurementFidelity``,
            reduction "sum", weight 1) the gradient is 2 Aᵀ(A x − y): γ = 0.5 projects exactly onto A x = y for
            a mask and is stable for any ‖A‖ <= 1. The paper's step on ½‖A x − y‖² (its learning rate) is 2γ.
        step_exponent: α >= 0 of the paper's schedule γ (1 − t)^α = γ s^α; 0, a constant step, by default.
        num_draws: M >= 1 noise draws averaged per step.
        normalize_step: divide γ by ‖A‖² (:func:`~guidance.methods.common.data_term_gain`, computed once): the
            paper tunes its step per problem, and most of that spread is the operator's gain (‖A‖² = 1 for a mask
            or a normalised blur, about 1/16 for SR×4), so one normalised γ serves them all. No effect on
            objectives without a linear pixel-space operator.
        check_divergence: stop with a :class:`DivergenceError` naming the step when the state becomes NaN/inf.

    Returns:
        :class:`MethodResult`; ``x`` is the last averaged clean estimate, ``sigmas`` the N levels used (the
        schedule without its final 0); ``info["loss"]``: F at the input of the last data step, per sample.
    """
    step_size = check_nonnegative(step_size, "step_size")
    step_exponent = check_nonnegative(step_exponent, "step_exponent")
    num_draws = check_count(num_draws, "num_draws", minimum=1)
    check_flag(normalize_step, "normalize_step")
    if not isinstance(objective, Objective):
        raise ValueError(f"pnp_flow needs an Objective (e.g. MeasurementFidelity), got {type(objective).__name__}")
    batch_size = measurement_batch_size(objective, batch_size, latents)
    counted = CountingModel(model)
    state = start_state(counted, cond, num_steps, height, width, generator, batch_size, latents)
    x, cond, sigmas = state.x, state.cond, state.sigmas
    objective.bind(model, state.height, state.width)
    image_shape = (1, model.image_channels, state.height, state.width)
    gain = data_term_gain(objective, image_shape, x.device) if normalize_step else 1.0

    loss = None
    monitor = DivergenceMonitor("pnp_flow", f"use a smaller step_size than {step_size}", check_divergence)
    for i in tqdm(range(num_steps), disable=not progress, desc="pnp_flow"):
        sigma = sigmas[i]
        gamma = step_size / gain * float(sigma) ** step_exponent
        loss, grad = objective_gradient(objective, model, x)
        z = x - gamma * grad.to(x.dtype)
        estimate = torch.zeros_like(x)
        for _ in range(num_draws):
            eps = initial_noise(tuple(x.shape), generator, x.device)
            x_s = interpolate(z, eps, sigma)
            v = counted.velocity(x_s, sigma, cond)
            estimate += x0_from_velocity(x_s, v, sigma)
        x = estimate / num_draws
        if callback is not None:
            callback({"step": i, "sigma": sigma, "x": x_s, "x0_hat": x})
        x = step_end(callback_on_step_end, i, sigma, {"x": x})
        monitor.update(x, i)
    monitor.check()

    image = model.decode(x) if decode else None
    return MethodResult(x=x, image=image, nfe=counted.nfe, sigmas=sigmas[:num_steps],
                        info={"loss": loss})
