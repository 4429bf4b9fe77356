"""PSLD on a rectified flow: DPS through the network with a "gluing" term that keeps the clean latent a fixed
point of the autoencoder (Rout et al., "Solving Linear Inverse Problems Provably via Posterior Sampling with
Latent Diffusion Models", NeurIPS 2023), in the flow port of the FlowDPS repository (Kim et al., "FlowDPS:
Flow-Driven Posterior Sampling for Inverse Problems", ICCV 2025)::

    x ~ N(0, I)
    for i in 0 .. N-1:
        v      = v_theta(x, s_i, c)                  with autograd through the network
        x0_hat = x − s_i v                           z0t in the code
        x̂      = D(x0_hat)
        r_y    = ‖A(x̂) − y‖                          the measurement term (the norm, not its square)
        x̃      = x̂ − B (A(x̂) − y)                    = B y + (I − B A) x̂,  B = Aᵀ, A⁺ or I
        r_g    = ‖x0_hat − E(x̃)‖                     the gluing term, in the latent
        x      = x + (s_{i+1} − s_i) v − η ∇_x (w_y r_y + w_g r_g)      official w_y = 1, w_g = 0.1
    return D(x)

Both norms are differentiated with respect to the state x: through the decoder, the encoder and the network's
Jacobian (one network backward pass per step, as :func:`~guidance.methods.dps.dps`, with the same activation
checkpointing). On a pixel model (E = D = I) the gluing term does not vanish: x0_hat − x̃ = B(A x0_hat − y), so
r_g = ‖B(A x0_hat − y)‖ becomes a second, back-projected data term (FlowDPS's); the fixed-point part of PSLD
exists on latent models only.

Official code: FlowDPS-Inverse/FlowDPS at commit 83618433cece8cbcd056344cf11c021c37f5e186, ``sd3_sampler.py``
(``SD3PSLD.sample``), run by ``solve.py`` (``--method psld``). Its time is ours (the scheduler's sigma): its
``step_size`` is η, its residue ``1.0 * y_residue + 0.1 * z0_residue`` gives w_y and w_g, its update
``z0t + (sigma - delta) * (z1t - z0t) - step_size * grad`` is the Euler step minus η ∇. B is chosen as in
:func:`~guidance.methods.flowdps.flowdps` (``back_projection``: A⁺ for the "sr" tasks, ``At`` otherwise, which
is the identity for its motion blur). With a pixel-space :class:`MeasurementFidelity` of weight w and
reduction "sum", r_y = sqrt(w) ‖A(x̂) − y‖ (the official term for w = 1); the gluing norm is a plain Euclidean
norm over the latent.

Quirks of the official code, and what flowsteer does:

* ``solve.py``'s command line sets the step size 15 and the CFG scale 2.0 (``sample()``'s defaults: 50 and 1.0);
  the presets take the command line's values.
* the encoder samples its posterior at every step (``latent_dist.sample()``, from torch's global generator);
  flowsteer encodes with the posterior mean by default and draws a sample from ``generator`` with
  ``posterior_sample=True``.
* it works on one image at a time: the projection is reshaped to (1, 3, H, W) and both norms are taken over the
  whole tensor; flowsteer takes them per sample, which is the same at batch 1.
* the projected image is cast to float16 before the encoder (the official run is float16 throughout); flowsteer
  encodes in the model's own precision.
* the state is never detached (``z.detach()`` is discarded), so each step's graph keeps the previous steps'
  alive; the values are unaffected, and flowsteer detaches.
* the schedule's shift 4.0 and its diffusers dependence are FlowDPS's (``shift``, see
  :func:`~guidance.methods.flowdps.shifted_sigmas`).
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from operators.checks import MAX_STEPS, check_number

from ..flow import euler_step, x0_from_velocity
from ..objectives import MeasurementFidelity, Objective
from ..sampler import step_end
from .common import (CountingModel, DivergenceMonitor, MethodResult, check_count, check_flag,
                     check_nonnegative, is_pixel_model, reference_scale)
from .dps import activation_checkpointing
from .flowdps import (COMMON_NOTE, NOISE_STD, OFFICIAL_SOURCE, SD3_MEDIUM, TASKS, resolve_back_projection,
                      start_shifted)

__all__ = ["DEFAULT_STEP_SIZE", "PRESETS", "psld"]

# η of the update x ← Euler(x) − η ∇_x r. The gradient of the norms does not shrink with the residual, so η is the
# length of each correction in x and grows with the state's size. On the analytic benchmark (1x8x8 images, 50
# steps, noise 0.05; box inpainting, SR x2, Gaussian blur) MSE/MMSE is 1.1-1.6 at η = 0.3 (two seeds, 16 pairs),
# 1.5-2.0 at 0.2, 1.4-1.9 at 0.5, up to 4 at 1.0 and 32 at 3.0; SD3 latents at 768² take the official 15 (the
# presets).
DEFAULT_STEP_SIZE = 0.3
_TINY = 1e-20  # squared norms are clamped here before their square root: a finite gradient at an exact fit


def _norm(squares: torch.Tensor) -> torch.Tensor:
    return squares.clamp_min(_TINY).sqrt()


@torch.no_grad()
def psld(model, objective: Objective, *, num_steps: int = 28, cond=None, height=None, width=None, generator=None,
         callback=None, progress: bool = True, batch_size=None, latents=None, decode: bool = True,
         on_step_end=None, step_size: float = DEFAULT_STEP_SIZE, measurement_weight: float = 1.0,
         gluing_weight: float = 0.1, back_projection: str = "auto", posterior_sample: bool = False,
         shift: float | None = None, gradient_checkpointing: bool = True,
         check_divergence: bool = True) -> MethodResult:
    """PSLD in the flow port of the FlowDPS repository: an Euler step followed by x ← x − η ∇_x (w_y ‖A(D(x0_hat)) − y‖
    + w_g ‖x0_hat − E(x̃)‖), differentiating through the network (see the module docstring).

    Args:
        model, objective, num_steps, cond, height, width, generator, callback, progress, batch_size, latents,
            decode: the common method arguments (see ``guidance.methods``). ``objective`` is a pixel-space
            :class:`MeasurementFidelity` (the gluing term projects with its operator); ``batch_size`` defaults to
            the measurement's batch (a batch-1 y is shared). The callback gets ``{"step", "sigma", "x",
            "x0_hat"}``.
        step_size: η >= 0, constant over the steps. The norms' gradient does not shrink with the residual, so η
            sets the length of each correction; it grows with the state's size.
        measurement_weight: w_y >= 0 of the measurement norm (official 1.0).
        gluing_weight: w_g >= 0 of the gluing norm (official 0.1).
        back_projection: B of x̃ = x̂ − B(A(x̂) − y): "adjoint" (Aᵀ), "pseudo_inverse" (A⁺), "none" (I, for an
            operator whose measurement has the image's shape) or "auto" (A⁺ for operators that shrink the image
            and have one, Aᵀ for other linear operators, I for nonlinear ones), as in
            :func:`~guidance.methods.flowdps.flowdps`.
        posterior_sample: encode x̃ with a sample of the autoencoder's posterior drawn from ``generator`` at every
            step, as the official code does (from torch's global generator); False (default) encodes with its mean.
            Latent models with a stochastic encoder only.
        shift: None keeps the model's schedule; a number μ > 0 re-shifts it (the official run's 4.0 on SD3; see
            :func:`~guidance.methods.flowdps.shifted_sigmas`).
        gradient_checkpointing: recompute the network's activations in the backward pass (diffusers models that
            support it), as :func:`~guidance.methods.dps.dps`; the previous setting is restored afterwards.
        check_divergence: stop with a :class:`DivergenceError` naming the step and the state's scale when the
            norms or the state become NaN/inf, or a sample's RMS exceeds ``DIVERGENCE_FACTOR`` (100) times its
            reference scale; recorded on the device and read once, after the loop (a run that diverges finishes
            its steps first): the loop reads nothing back from the device.

    Returns:
        :class:`MethodResult`; ``info["measurement_residual"]`` and ``info["gluing_residual"]``: r_y and r_g at the
        last step (per sample), ``info["back_projection"]``: the B used, ``info["network_backward_passes"]``.
    """
    if not isinstance(objective, MeasurementFidelity) or objective.space != "pixel":
        got = (f"a {objective.space}-space MeasurementFidelity" if isinstance(objective, MeasurementFidelity)
               else type(objective).__name__)
        raise ValueError(f"psld needs a pixel-space MeasurementFidelity (its gluing term projects the decoded image "
                         f"with the operator), got {got}; use flowdps or dps for other objectives")
    step_size = check_nonnegative(step_size, "step_size")
    measurement_weight = check_nonnegative(measurement_weight, "measurement_weight")
    gluing_weight = check_nonnegative(gluing_weight, "gluing_weight")
    if measurement_weight == 0 and gluing_weight == 0:
        raise ValueError("measurement_weight and gluing_weight are both 0, so psld would guide nothing; give one of "
                         "them a positive weight (official: 1.0 and 0.1), or use the method 'unguided'")
    check_count(num_steps, "num_steps", 1, MAX_STEPS)
    check_flag(gradient_checkpointing, "gradient_checkpointing")
    if shift is not None:
        shift = check_number(shift, "shift", minimum=0, strict_minimum=True, fix="the official run uses 4.0")
    if check_flag(posterior_sample, "posterior_sample"):
        if is_pixel_model(model):
            raise ValueError(f"posterior_sample=True samples the autoencoder's posterior, and {type(model).__name__} "
                             f"is a pixel model without one; drop posterior_sample")
        if gluing_weight == 0:
            raise ValueError("posterior_sample=True samples the encoder of the gluing term, which gluing_weight=0 "
                             "switches off; drop one of them")
        if generator is None:
            raise ValueError("posterior_sample=True draws the encoder's posterior sample from the generator: pass "
                             "generator=torch.Generator().manual_seed(0)")
    counted = CountingModel(model)
    state, sigmas = start_shifted(counted, objective, cond, num_steps, height, width, generator, batch_size, latents,
                                  shift)
    x, cond = state.x, state.cond
    image_shape = (model.image_channels, state.height, state.width)
    back_projection = resolve_back_projection(objective, back_projection, image_shape, "psld")
    if back_projection == "none" and tuple(objective.y.shape[1:]) != image_shape:
        raise ValueError(f"psld: back_projection='none' subtracts the residual A(x) − y from the image, and the "
                         f"measurement's shape {tuple(objective.y.shape[1:])} is not the image's {image_shape}; use "
                         f"back_projection 'adjoint' or 'pseudo_inverse' (a linear operator)")
    encoder_generator = generator if posterior_sample else None

    r_y = r_g = None
    hint = f"use a smaller step_size than {step_size}"
    monitor = DivergenceMonitor("psld", hint, check_divergence, reference_scale(model, x))
    with activation_checkpointing(model, gradient_checkpointing):
        for i in tqdm(range(num_steps), disable=not progress, desc="psld"):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                v = counted.velocity(x_in, sigma, cond, grad=True)
                x0_hat = x0_from_velocity(x_in, v, sigma)
                image = model.decode(x0_hat)
                r_y = _norm(objective.loss(image))
                glued = model.encode(image - _back_project(objective, image, back_projection), encoder_generator)
                r_g = _norm((x0_hat - glued).square().flatten(1).sum(1))
                total = (measurement_weight * r_y + gluing_weight * r_g).sum()
                (grad,) = torch.autograd.grad(total, x_in)
            v, x0_hat, r_y, r_g = v.detach(), x0_hat.detach(), r_y.detach(), r_g.detach()
            if callback is not None:
                callback({"step": i, "sigma": sigma, "x": x, "x0_hat": x0_hat})
            x = euler_step(x, v, sigma, sigma_next) - step_size * grad.to(x.dtype)
            x = step_end(on_step_end, i, sigma, sigma_next, {"x": x})
            monitor.watch("the residual norms", i, r_y, r_g)
            monitor.update(x, i)

    monitor.finish()  # reads the state's and the norms' first bad steps once, after the loop
    image = model.decode(x) if decode else None
    return MethodResult(x=x, image=image, nfe=counted.nfe, sigmas=sigmas,
                        info={"measurement_residual": r_y, "gluing_residual": r_g, "back_projection": back_projection,
                              "network_backward_passes": num_steps})


def _back_project(objective: MeasurementFidelity, image: torch.Tensor, back_projection: str) -> torch.Tensor:
    """B (A(x) − y) for images x, B = Aᵀ, A⁺ or I ("none")."""
    residual = objective.residual(image)
    if back_projection == "none":
        return residual
    operator = objective.operator
    return operator.adjoint(residual) if back_projection == "adjoint" else operator.pseudo_inverse(residual)


# The published settings: solve.py's command line with --method psld (NFE 28, cfg_scale 2.0, img_size 768,
# step_size 15), the tasks and operators of the FlowDPS presets, SD3PSLD.sample's weights 1.0 and 0.1 and shift 4.0.
_SOURCE = OFFICIAL_SOURCE.replace("SD3FlowDPS", "SD3PSLD") + (
    "; PSLD: Rout et al., Solving Linear Inverse Problems Provably via Posterior Sampling with Latent Diffusion "
    "Models, NeurIPS 2023")


def _preset(task: str) -> dict[str, Any]:
    setting = TASKS[task]
    preset = {"method": "psld", "num_steps": 28,
              "options": {"step_size": 15.0, "measurement_weight": 1.0, "gluing_weight": 0.1,
                          "back_projection": setting["back_projection"], "shift": 4.0},
              "objective": {"space": "pixel", "weight": 1.0, "reduction": "sum"},
              "operators": setting["operators"], "noise_std": NOISE_STD, "resolution": 768, "model": SD3_MEDIUM,
              "guidance_scale": 2.0, "negative_prompt": "", "seed": 0, "source": _SOURCE,
              "note": (f"{setting['note']}; {COMMON_NOTE}; the encoder samples its posterior at every step "
                       f"(posterior_sample=True draws it from the generator; the preset keeps the mean)")}
    if setting["prompt"] is not None:
        preset["prompt"] = setting["prompt"]
    return preset


PRESETS: dict[str, dict[str, Any]] = {f"psld_{task}": _preset(task) for task in TASKS}
