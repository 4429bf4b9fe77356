"""PnP-Flow: plug-and-play restoration with a flow model as denoiser (Martin et al., ICLR 2025).

Forward-backward splitting whose "backward" step is the flow's one-step clean estimate, run over a
decreasing time grid s_0 = 1 > ... > s_{N-1} > 0 (paper time t = 1 − s)::

    x ~ N(0, I)                                      (discarded by the first step, where s_0 = 1)
    for i in 0 .. N-1:
        γ_i = γ · s_i^α  (/ ‖A‖² with normalize_step)  the paper's (1 − t)^α step schedule
        z   = x − γ_i ∇_x F(x)                       gradient step on the data term
        x   = (1/M) Σ_m [x̃_m − s_i v_theta(x̃_m, s_i)],   x̃_m = (1 − s_i) z + s_i ε_m,  ε_m ~ N(0, I) fresh
    return D(x)

The grid is the model's own schedule (``time_grid="model"``; uniform for an unshifted model) or the official
one, ``time_grid="uniform"``: t_i = i / N, i.e. s_i = 1 − i / N for i = 0 .. N−1 (it holds s = 1, not s = 0),
whatever the model's shift.

Correspondence with the official code (annegnx/PnP-Flow, pnpflow/methods/pnp_flow.py and
config/method_config/pnp_flow.yaml, scripts/script_test.sh; commit ee5b159e6edff4d585ebf36c9a5333ffa85e066c):
its Gaussian data gradient is Hᵀ(H x − y) / σ² and its step lr_pnp · σ² · (1 − t)^α, so the step taken is
lr_pnp (1 − t)^α Hᵀ(H x − y), independent of σ. Here F = ‖A x − y‖² (``MeasurementFidelity``, reduction
"sum", weight 1) has gradient 2 Aᵀ(A x − y), hence γ = lr_pnp / 2 (the published lr_pnp = 1 is γ = 0.5; with
reduction "mean" over m measured values, γ = m · lr_pnp / 2). Its denoiser x + (1 − t) v_t, with its velocity
pointing to the data, is x_s − s v here; its initial image Aᵀ1 is discarded by the first step, as the noise is
here; it neither clips nor rescales inside the loop. The published settings (:data:`PRESETS`) are N = 100,
lr_pnp = 1, M = 5 and a per-problem α. Only the Gaussian-noise data term is covered (not its Laplace one).

The network is only evaluated, never differentiated. For a latent model the data step is taken on the
latent: ∇_x F(x) is the gradient of the objective at x (through the decoder for a pixel-space objective,
``objective_gradient``), rather than on the decoded image followed by re-encoding. It applies to any
objective (not only those with an image-space proximal point), costs one decoder backward per step instead
of an encoder pass, and never leaves the latent space, where the re-noising and the clean estimate live.
For a pixel model (the paper's setting) both readings coincide.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from operators.checks import MAX_STEPS, check_work

from ..flow import interpolate, x0_from_velocity
from ..objectives import Objective, objective_gradient
from ..sampler import initial_noise, start_state, step_end
from .common import (CountingModel, DivergenceMonitor, MethodResult, check_count, check_flag, check_nonnegative,
                     data_term_gain, measurement_batch_size, reference_scale)

__all__ = ["PRESETS", "TIME_GRIDS", "pnp_flow", "uniform_grid"]

TIME_GRIDS = ("model", "uniform")


def uniform_grid(num_steps: int) -> torch.Tensor:
    """The official grid s_i = 1 − i / N, i = 0 .. N−1 (paper time t_i = i / N), float32."""
    steps = torch.arange(num_steps, dtype=torch.float64)
    return (1 - steps / num_steps).float()


@torch.no_grad()
def pnp_flow(model, objective: Objective, *, num_steps: int = 28, cond=None, height=None, width=None,
             generator=None, callback=None, progress: bool = True, batch_size=None, latents=None,
             decode: bool = True, on_step_end=None, step_size: float = 0.5, step_exponent: float = 0.0,
             num_draws: int = 2, normalize_step: bool = False, time_grid: str = "model",
             check_divergence: bool = True) -> MethodResult:
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
            a mask and is stable for any ‖A‖ <= 1. The official learning rate lr_pnp (its step on ½‖A x − y‖²)
            is 2γ.
        step_exponent: α >= 0 of the paper's schedule γ (1 − t)^α = γ s^α; 0, a constant step, by default.
        num_draws: M >= 1 noise draws averaged per step.
        normalize_step: divide γ by ‖A‖² (:func:`~guidance.methods.common.data_term_gain`, computed once): the
            paper tunes its step per problem, and most of that spread is the operator's gain (‖A‖² = 1 for a mask
            or a normalised blur, about 1/16 for SR×4), so one normalised γ serves them all. No effect on
            objectives without a linear pixel-space operator.
        time_grid: "model" (the model's own schedule without its final 0) or "uniform" (the official
            s_i = 1 − i / N, also for a model whose schedule is shifted).
        check_divergence: stop with a :class:`DivergenceError` naming the step and the state's scale when the
            state becomes NaN/inf or a sample's RMS exceeds ``DIVERGENCE_FACTOR`` (100) times its reference scale,
            as in :func:`~guidance.methods.flowchef.flowchef`; read once, after the loop.

    Returns:
        :class:`MethodResult`; ``x`` is the last averaged clean estimate, ``sigmas`` the N levels used;
        ``info["loss"]``: F at the input of the last data step, per sample.
    """
    step_size = check_nonnegative(step_size, "step_size")
    step_exponent = check_nonnegative(step_exponent, "step_exponent")
    num_draws = check_count(num_draws, "num_draws", minimum=1)
    check_count(num_steps, "num_steps", 1, MAX_STEPS)
    check_work({"num_steps": num_steps, "num_draws": num_draws}, "pnp_flow")
    check_flag(normalize_step, "normalize_step")
    if time_grid not in TIME_GRIDS:
        raise ValueError(f"time_grid must be one of {TIME_GRIDS} ('uniform' is the official grid 1 − i/N), "
                         f"got {time_grid!r}")
    if not isinstance(objective, Objective):
        raise ValueError(f"pnp_flow needs an Objective (e.g. MeasurementFidelity), got {type(objective).__name__}")
    batch_size = measurement_batch_size(objective, batch_size, latents)
    counted = CountingModel(model)
    state = start_state(counted, cond, num_steps, height, width, generator, batch_size, latents)
    x, cond = state.x, state.cond
    sigmas = state.sigmas[:num_steps] if time_grid == "model" else uniform_grid(num_steps).to(x.device)
    levels = sigmas.tolist()  # the step sizes' levels on the host, read once: no device read in the loop
    objective.bind(model, state.height, state.width)
    image_shape = (1, model.image_channels, state.height, state.width)
    gain = data_term_gain(objective, image_shape, x.device) if normalize_step else 1.0

    loss = None
    hint = f"use a smaller step_size than {step_size}" + ("" if normalize_step else
                                                           ", or normalize_step=True (the step divided by ‖A‖²)")
    monitor = DivergenceMonitor("pnp_flow", hint, check_divergence, reference_scale(model, x))
    for i in tqdm(range(num_steps), disable=not progress, desc="pnp_flow"):
        sigma = sigmas[i]
        gamma = step_size / gain * levels[i] ** step_exponent
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
        x = step_end(on_step_end, i, sigma, sigma, {"x": x})
        monitor.update(x, i)
    monitor.finish()

    image = model.decode(x) if decode else None
    return MethodResult(x=x, image=image, nfe=counted.nfe, sigmas=sigmas, info={"loss": loss})


# The official CelebA settings (128×128 images in [-1, 1], an OT flow-matching U-Net): scripts/script_test.sh gives
# lr_pnp 1, num_samples 5, steps_pnp 100 and α per problem (config/method_config/pnp_flow.yaml: gamma_style
# 'alpha_1_minus_t'); main.py gives the degradations and noise levels, pnpflow/degradations.py the operators.
_SOURCE = ("Martin et al., PnP-Flow, ICLR 2025; github.com/annegnx/PnP-Flow @ "
           "ee5b159e6edff4d585ebf36c9a5333ffa85e066c: scripts/script_test.sh (lr_pnp, alpha, num_samples, "
           "steps_pnp), config/method_config/pnp_flow.yaml (gamma_style alpha_1_minus_t), main.py (problem, "
           "sigma_noise), pnpflow/degradations.py (operator)")


def _preset(operators: list[str], alpha: float, noise_std: float, note: str, normalize_step: bool = False) -> dict:
    return {"method": "pnp_flow", "num_steps": 100,
            "options": {"step_size": 0.5, "step_exponent": alpha, "num_draws": 5, "normalize_step": normalize_step,
                        "time_grid": "uniform"},
            "objective": {"space": "pixel", "weight": 1.0, "reduction": "sum"}, "operators": operators,
            "noise_std": noise_std, "resolution": 128, "source": _SOURCE, "note": note}


PRESETS: dict[str, dict[str, Any]] = {
    "pnp_flow_celeba_denoise": _preset(["denoise"], 0.8, 0.2, "problem denoising: A = I"),
    "pnp_flow_celeba_deblur": _preset(
        ["gaussian_blur:kernel_size=61,sigma=1.0,padding=circular"], 0.01, 0.05,
        "problem gaussian_deblurring_FFT: a 61-tap Gaussian of σ 1 applied by FFT, i.e. with circular padding"),
    "pnp_flow_celeba_sr2": _preset(
        ["sr_avgpool:factor=2"], 0.3, 0.05,
        "problem superresolution (×2 at 128²): the official operator keeps the top-left pixel of each 2×2 block "
        "(‖A‖² = 1), which no operator spec offers; 2×2 averaging (‖A‖² = 1/4) stands in, with normalize_step so "
        "that the step relative to ‖A‖² is the official one", normalize_step=True),
    "pnp_flow_celeba_inpaint_box": _preset(
        ["inpaint_box:size=40"], 0.5, 0.05, "problem inpainting: a centred 40×40 hole (half_size_mask 20)"),
    "pnp_flow_celeba_inpaint_freeform": _preset(
        ["inpaint_freeform"], 0.5, 0.05,
        "problem paintbrush_inpainting: the official brush-stroke masks come from their own generator (seed 42); "
        "inpaint_freeform's strokes stand in"),
    "pnp_flow_celeba_inpaint_random": _preset(
        ["inpaint_random:fraction=0.7"], 0.01, 0.01,
        "problem random_inpainting: the official mask drops each pixel with probability 0.7 (all channels alike); "
        "inpaint_random drops exactly 70 %"),
}
