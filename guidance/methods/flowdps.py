"""FlowDPS: flow-driven posterior sampling (Kim, Kim and Ye, "FlowDPS: Flow-Driven Posterior Sampling for Inverse
Problems", ICCV 2025).

The flow's one-step clean estimate is pulled toward the measurement by a few gradient steps on the back-projected
residual norm, computed through the decoder only (the network is never differentiated); the pull is mixed in
with weight s, and the state is re-noised with a blend of the flow's own noise estimate and fresh noise::

    x ~ N(0, I)
    for i in 0 .. N-1:
        v       = v_theta(x, s_i, c)                       no grad (classifier-free guidance inside the model)
        x0_hat  = x − s_i v                                z0t in the code
        eps_hat = x + (1 − s_i) v                          z1t
        x0_y    = x0_hat
        repeat K times:                                    gradient through the decoder D only
            r    = ‖B (y − A(D(x0_y)))‖                   the norm, not its square; B = Aᵀ, A⁺ or I
            x0_y = x0_y − η ∇_{x0_y} r
        x0_y    = (1 − s_i) x0_hat + s_i x0_y              the data step fades with s
        noise   = sqrt(s_{i+1}) eps_hat + sqrt(1 − s_{i+1}) ε,   ε ~ N(0, I) fresh
        x       = (1 − s_{i+1}) x0_y + s_{i+1} noise       (the last step, s_N = 0, returns x0_y)
    return D(x)

Official code: FlowDPS-Inverse/FlowDPS at commit 83618433cece8cbcd056344cf11c021c37f5e186, ``sd3_sampler.py``
(``SD3FlowDPS.sample`` and ``SD3FlowDPS.data_consistency``), run by ``solve.py``; the operators are built in
``functions/degradation.py`` from ``functions/svd_operators.py`` and ``functions/measurements.py``. Its time is
ours (the scheduler's sigma; the transformer gets 1000 s), so no conversion is needed: its ``step_size`` is η
here, its hard-coded ``num_iters = 3`` is K (``data_steps``), its ``cfg_scale`` the model's guidance scale.
The back-projection B is A⁺ (``operator.A_pinv``) when the task name contains "sr" and ``operator.At``
otherwise: Aᵀ for its SVD operators (Gaussian deblurring, inpainting), but the identity for its motion blur,
whose ``At`` returns its input (``MotionBlurOperator.transpose``), so that task minimises the plain residual
‖y − A(D(x0))‖. ``back_projection="auto"`` takes A⁺ where the measurement has fewer entries than the image and
the operator has a pseudo-inverse (super-resolution: there Aᵀ would shrink the residual by about the factor²),
Aᵀ for other linear pixel-space operators, and "none" (B = I, the objective's own residual) otherwise; the
motion-blur presets set "none" as the official code does.

For an objective other than a pixel-space :class:`MeasurementFidelity` with a linear operator (a nonlinear
operator, a latent-space fidelity, a classifier, a reward) the data step descends r = sqrt(L) of the objective's
loss L (``back_projection="none"``, ``use_norm=True``) or L itself (``use_norm=False``, the default for
objectives that are not a MeasurementFidelity, whose loss may be negative), as :func:`~guidance.methods.dps.dps`
does. With a pixel-space MeasurementFidelity r is sqrt(weight · Σ (B(A x − y))²) (a mean with reduction
"mean"): the official ‖B(y − A x)‖ for weight 1 and reduction "sum".

Quirks of the official code, and what flowsteer does:

* ``solve.py``'s command line overrides ``sample()``'s defaults: step size 15 (not 30) and CFG scale 2.0 (not
  1.0); the presets take the command line's values, as the published runs did.
* the norm is taken over the whole batch at once (``.view(1, -1)``), coupling the samples' step lengths; the
  official runs use batch 1. flowsteer takes one norm per sample; ``official_quirks=True`` takes the joint norm.
* the gradient is cast to float16 (``.half()``): a no-op there, since the official latents are float16 from the
  start; flowsteer keeps its state and gradients in float32.
* the norm's gradient at an exact fit is whatever the installed torch gives for ``linalg.norm`` at 0 (0 on torch
  2.14); flowsteer differentiates sqrt(max(r², 1e-20)), finite (zero) at an exact fit on every version.
* ``scheduler.config.shift = 4.0`` re-shifts the schedule only on the diffusers the repository pins (0.30.1, whose
  ``set_timesteps`` reads ``config.shift``); later versions keep SD3's shift 3. ``shift=4.0`` reproduces the
  published schedule (the presets set it); the default keeps the model's own.
* the fresh noise ε of the last step is drawn and multiplied by zero (s_N = 0); flowsteer draws it too, so that the
  generator's stream stays aligned with the official loop's.
* its Gaussian deblurring operator (``svd_operators.Deblurring``) is not the Gaussian blur its name says: the taps
  sit one pixel off centre, 1-D singular values below 3e-2 are zeroed, and its singular values are laid out per
  channel (``repeat(1, 3)``) while its singular vectors are interleaved per pixel, so each channel's spectrum is
  applied to the wrong components. The presets use flowsteer's Gaussian blur with zero padding instead.
* the text encoder pads and truncates the T5 prompt to 77 tokens (the diffusers pipeline: 256).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from tqdm.auto import tqdm

from operators.checks import MAX_STEPS, check_number, check_work

from ..flow import eps_from_velocity, expand_sigma, interpolate, x0_from_velocity
from ..objectives import MeasurementFidelity, Objective
from ..sampler import initial_noise, start_state, step_end
from .common import (CountingModel, DivergenceMonitor, MethodResult, check_count, check_flag, check_nonnegative,
                     measurement_batch_size, reference_scale)

__all__ = ["BACK_PROJECTIONS", "DEFAULT_STEP_SIZE", "PRESETS", "back_projected_loss", "flowdps",
           "resolve_back_projection", "shifted_sigmas", "start_shifted"]

BACK_PROJECTIONS = ("auto", "adjoint", "pseudo_inverse", "none")
# η of the data step. The gradient of a residual norm has length at most ‖B A‖ ‖D'‖ whatever the residual's size,
# so η is the length of each update of x0 (in state units), and a good value grows with the state's size. On the
# analytic benchmark (1x8x8 images, 50 steps, noise 0.05) MSE/MMSE falls from 60-140 at η = 0 through 4-12 at 0.5
# to 1.5-1.6 (box inpainting), 1.5-1.6 (SR x2) and 2.8-4.3 (Gaussian blur) at 4-5 (two seeds, 16 pairs), and rises
# again beyond 7 (the blur first); SD3 latents at 768² take the official 15 (the presets).
DEFAULT_STEP_SIZE = 4.0
_TINY = 1e-20  # the squared norm is clamped here before its square root: a finite gradient at an exact fit


def shifted_sigmas(model, num_steps: int, height: int, width: int, shift: float) -> torch.Tensor:
    """The model's schedule with the static time shift s = μ t / (1 + (μ − 1) t), μ = ``shift``, in place of its
    own: for a model driven by a diffusers ``FlowMatchEulerDiscreteScheduler`` without dynamic shifting, a copy of
    the scheduler with ``set_shift(shift)`` (what the official ``scheduler.config.shift = 4.0`` does on diffusers
    0.30.1: the grid between the scheduler's sigma_max and sigma_min, re-shifted); for an analytic flow, whose
    schedule linspace(1, 0, N + 1) is unshifted, that schedule shifted. ``num_steps + 1`` float32 values ending
    at 0."""
    from ..analytic import AnalyticGMMFlow

    scheduler = getattr(model, "scheduler", None)
    if scheduler is not None:
        if scheduler.config.get("use_dynamic_shifting", False) or not hasattr(scheduler, "set_shift"):
            raise ValueError(f"shift={shift:g} replaces a static time shift, and {type(model).__name__}'s scheduler "
                             f"{type(scheduler).__name__} has none (it shifts with the image size, or cannot be "
                             f"re-shifted); leave shift=None to use the model's own schedule")
        scheduler = copy.deepcopy(scheduler)
        scheduler.set_shift(shift)
        scheduler.set_timesteps(num_steps, device="cpu")
        return scheduler.sigmas.to(torch.float32)
    if isinstance(model, AnalyticGMMFlow):
        s = model.sigmas(num_steps, height, width).double()
        return (shift * s / (1 + (shift - 1) * s)).float()
    raise ValueError(f"shift={shift:g} re-shifts a diffusers flow-matching scheduler or an analytic flow's linear "
                     f"schedule, and {type(model).__name__} has neither; leave shift=None to use its own schedule")


def start_shifted(counted, objective: Objective, cond, num_steps: int, height, width, generator, batch_size, latents,
                  shift: float | None):
    """The start of FlowDPS and PSLD: :func:`~guidance.sampler.start_state` (one restoration per measurement by
    default), the schedule (re-shifted by :func:`shifted_sigmas` when ``shift`` is given) and the objective bound to
    the image size. Returns (state, sigmas)."""
    batch_size = measurement_batch_size(objective, batch_size, latents)
    state = start_state(counted, cond, num_steps, height, width, generator, batch_size, latents)
    sigmas = state.sigmas if shift is None else shifted_sigmas(counted.model, num_steps, state.height, state.width,
                                                               shift).to(state.x.device)
    objective.bind(counted.model, state.height, state.width)
    return state, sigmas


def resolve_back_projection(objective: Objective, back_projection: str, image_shape: tuple[int, ...],
                            method: str) -> str:
    """The back-projection B a method applies to the residual: ``back_projection`` checked against the objective,
    "auto" resolved (A⁺ where the measurement has fewer entries than the image of shape ``image_shape`` (C, H, W)
    and the operator has a pseudo-inverse, as the official code does for super-resolution; Aᵀ for other linear
    pixel-space operators; "none" for every other objective)."""
    if back_projection not in BACK_PROJECTIONS:
        raise ValueError(f"back_projection must be one of {BACK_PROJECTIONS}, got {back_projection!r}")
    operator = getattr(objective, "operator", None)
    linear = (isinstance(objective, MeasurementFidelity) and objective.space == "pixel"
              and getattr(operator, "is_linear", False))
    has_pinv = linear and getattr(operator, "has_pseudo_inverse", False)
    if back_projection == "auto":
        if not linear:
            return "none"
        smaller = objective.y[0].numel() < math.prod(image_shape)
        return "pseudo_inverse" if smaller and has_pinv else "adjoint"
    if back_projection != "none" and not linear:
        what = (f"a {objective.space}-space MeasurementFidelity with {type(operator).__name__}"
                if isinstance(objective, MeasurementFidelity) else type(objective).__name__)
        raise ValueError(f"{method}: back_projection={back_projection!r} applies Aᵀ or A⁺ to the residual and needs a "
                         f"pixel-space MeasurementFidelity with a linear operator, got {what}; use "
                         f"back_projection='none' (the objective's own loss)")
    if back_projection == "pseudo_inverse" and not has_pinv:
        raise ValueError(f"{method}: back_projection='pseudo_inverse' needs an operator with a pseudo-inverse, and "
                         f"{type(operator).__name__} has none; use back_projection='adjoint'")
    return back_projection


def back_projected_loss(objective: MeasurementFidelity, image: torch.Tensor, back_projection: str) -> torch.Tensor:
    """(B,) weight · Σ (B (A x − y))² of images x (a mean with the objective's reduction "mean"), B = Aᵀ
    ("adjoint"), A⁺ ("pseudo_inverse") or I ("none", the objective's own loss)."""
    if back_projection == "none":
        return objective.loss(image)
    residual = objective.residual(image)
    operator = objective.operator
    projected = operator.adjoint(residual) if back_projection == "adjoint" else operator.pseudo_inverse(residual)
    squares = projected.square().flatten(1)
    return objective.weight * (squares.sum(1) if objective.reduction == "sum" else squares.mean(1))


def _data_loss(objective: Objective, model, z: torch.Tensor, back_projection: str) -> torch.Tensor:
    if back_projection == "none":
        return objective(model, z)
    return back_projected_loss(objective, model.decode(z), back_projection)


@torch.no_grad()
def flowdps(model, objective: Objective, *, num_steps: int = 28, cond=None, height=None, width=None, generator=None,
            callback=None, progress: bool = True, batch_size=None, latents=None, decode: bool = True,
            on_step_end=None, step_size: float = DEFAULT_STEP_SIZE, data_steps: int = 3,
            back_projection: str = "auto", use_norm: bool | None = None, shift: float | None = None,
            official_quirks: bool = False, check_divergence: bool = True) -> MethodResult:
    """FlowDPS (Kim et al., ICCV 2025): K gradient steps on the back-projected residual norm of the clean estimate
    (through the decoder only), mixed in with weight s, then a re-noising that blends the flow's noise estimate
    with fresh noise (see the module docstring).

    Args:
        model, objective, num_steps, cond, height, width, generator, callback, progress, batch_size, latents,
            decode: the common method arguments (see ``guidance.methods``). ``batch_size`` defaults to the
            measurement's batch for a :class:`MeasurementFidelity` (a batch-1 y is shared); ``generator`` also
            draws the fresh noise ε of every step; the callback gets ``{"step", "sigma", "x", "x0_hat", "x0_y"}``
            (x0_y: the estimate after the data step and the mix).
        step_size: η >= 0 of each data step x0 ← x0 − η ∇r. The gradient of the norm r does not shrink with the
            residual, so η is the length of every update (in state units): it grows with the state's size (the
            official 15 suits SD3 latents at 768², 4 images of 8x8 pixels). 0 leaves the estimate as it is.
        data_steps: K >= 1 gradient steps per sampling step (3, hard-coded in the official code).
        back_projection: B of r = ‖B(y − A(D(x0)))‖: "adjoint" (Aᵀ), "pseudo_inverse" (A⁺), "none" (the residual
            itself, or the objective's own loss), or "auto" (A⁺ for operators that shrink the image and have one,
            i.e. super-resolution, Aᵀ for other linear operators, "none" for every other objective).
        use_norm: descend r = sqrt(L), the norm (True, the default for a MeasurementFidelity), or the loss L itself
            (False, the default for other objectives, such as classifiers and rewards whose loss may be negative).
        shift: None keeps the model's schedule; a number μ > 0 re-shifts it, s = μt / (1 + (μ − 1)t)
            (:func:`shifted_sigmas`; the official run's 4.0 on SD3).
        official_quirks: True takes one norm over the whole batch, as the official code does, instead of one per
            sample (the same at batch 1); it needs ``use_norm``.
        check_divergence: stop with a :class:`~guidance.methods.common.DivergenceError` naming the step and the
            state's scale when the state becomes NaN/inf or a sample's RMS exceeds ``DIVERGENCE_FACTOR`` (100) times
            its reference scale, as in :func:`~guidance.methods.flowchef.flowchef`; read once, after the loop.

    Returns:
        :class:`MethodResult`; ``info["residual"]``: r (or L without ``use_norm``) per sample before the last data
        step, ``info["back_projection"]``: the B used ("auto" resolved).
    """
    if not isinstance(objective, Objective):
        raise ValueError(f"flowdps needs an Objective (e.g. MeasurementFidelity), got {type(objective).__name__}")
    step_size = check_nonnegative(step_size, "step_size")
    check_count(data_steps, "data_steps", minimum=1, fix="data_steps=0 takes no data step: for sampling without "
                "guidance use the method 'unguided'")
    check_count(num_steps, "num_steps", 1, MAX_STEPS)
    check_work({"num_steps": num_steps, "data_steps": data_steps}, "flowdps")
    if use_norm is None:
        use_norm = isinstance(objective, MeasurementFidelity)
    check_flag(use_norm, "use_norm")
    if shift is not None:
        shift = check_number(shift, "shift", minimum=0, strict_minimum=True, fix="the official run uses 4.0")
    if check_flag(official_quirks, "official_quirks") and not use_norm:
        raise ValueError("official_quirks=True takes the residual norm over the whole batch, and use_norm=False "
                         "takes no norm; drop one of them")
    counted = CountingModel(model)
    state, sigmas = start_shifted(counted, objective, cond, num_steps, height, width, generator, batch_size, latents,
                                  shift)
    x, cond = state.x, state.cond
    back_projection = resolve_back_projection(objective, back_projection,
                                              (model.image_channels, state.height, state.width), "flowdps")
    # a general objective's loss may be negative, where its square root is undefined: recorded on the device
    # and read once after the loop
    watch_sign = use_norm and not isinstance(objective, MeasurementFidelity)
    negative = torch.zeros((), dtype=torch.bool, device=x.device)

    residual = None
    monitor = DivergenceMonitor("flowdps", f"use a smaller step_size than {step_size}", check_divergence,
                                reference_scale(model, x))
    for i in tqdm(range(num_steps), disable=not progress, desc="flowdps"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = counted.velocity(x, sigma, cond)
        x0_hat = x0_from_velocity(x, v, sigma)
        eps_hat = eps_from_velocity(x, v, sigma)
        x0_y = x0_hat
        for _ in range(data_steps):
            with torch.enable_grad():
                z = x0_y.detach().requires_grad_(True)
                loss = _data_loss(objective, model, z, back_projection)
                if watch_sign:
                    negative = negative | (loss.detach() < 0).any()
                residual = loss.clamp_min(_TINY).sqrt() if use_norm else loss
                total = loss.sum().clamp_min(_TINY).sqrt() if official_quirks else residual.sum()
                (grad,) = torch.autograd.grad(total, z)
            x0_y = x0_y - step_size * grad.to(x0_y.dtype)
            residual = residual.detach()
        x0_y = interpolate(x0_hat, x0_y, sigma)  # (1 − s) x0_hat + s x0_y
        eps = initial_noise(tuple(x.shape), generator, x.device)
        s_next = expand_sigma(sigma_next, x)
        noise = s_next.sqrt() * eps_hat + (1 - s_next).sqrt() * eps
        if callback is not None:
            callback({"step": i, "sigma": sigma, "x": x, "x0_hat": x0_hat, "x0_y": x0_y})
        x = interpolate(x0_y, noise, sigma_next)
        x = step_end(on_step_end, i, sigma, sigma_next, {"x": x})
        monitor.update(x, i)

    if watch_sign and bool(negative):
        raise ValueError(f"use_norm=True takes the square root of the loss, but {type(objective).__name__} returned "
                         f"a negative loss; pass use_norm=False to descend the loss itself")
    monitor.finish()
    image = model.decode(x) if decode else None
    return MethodResult(x=x, image=image, nfe=counted.nfe, sigmas=sigmas,
                        info={"residual": residual, "back_projection": back_projection})


# The published settings: solve.py's command line (NFE 28, cfg_scale 2.0, img_size 768, step_size 15, deg_scale 12
# for SR) with the README's tasks and examples (deg_scale 61 for deblurring, the kernel size), SD3-medium
# (StableDiffusion3Base's model_key), measurement noise 0.03 in [-1, 1] (solve.py: y + 0.03 randn), the schedule's
# shift 4.0 (SD3FlowDPS.sample), one image at a time.
OFFICIAL_COMMIT = "83618433cece8cbcd056344cf11c021c37f5e186"
OFFICIAL_SOURCE = ("Kim et al., FlowDPS: Flow-Driven Posterior Sampling for Inverse Problems, ICCV 2025; "
           f"github.com/FlowDPS-Inverse/FlowDPS @ {OFFICIAL_COMMIT}: sd3_sampler.py (SD3FlowDPS), solve.py "
           "(command-line defaults), README.md (tasks, prompts), functions/degradation.py and "
           "functions/svd_operators.py, functions/measurements.py (operators)")
SD3_MEDIUM = "stabilityai/stable-diffusion-3-medium-diffusers"
NOISE_STD = 0.03
# the README's example prompts (the SR x12 bicubic one was extracted by DAPE from that example's measurement)
DOG_PROMPT = "a photo of a closed face of a dog"
ANIMAL_PROMPT = ("a high quality photo of animal, bush, close-up, fox, grass, green, greenery, hide, panda, red, "
                 "red panda, stare")
FACE_PROMPT = "a photo of a closed face"

# what every FlowDPS and PSLD preset shares; the last entries say how each task's operator stands in
COMMON_NOTE = ("solve.py's command line (step_size 15, cfg_scale 2.0) overrides sample()'s defaults (30, 1.0); "
               "scheduler.config.shift = 4.0 takes effect on the pinned diffusers 0.30.1 only (shift=4.0 here); "
               "the T5 prompt is cut to 77 tokens there (the pipeline: 256)")
TASKS = {
    "sr_avgpool": {
        "operators": ["sr_avgpool:factor=12"], "back_projection": "pseudo_inverse", "prompt": DOG_PROMPT,
        "note": "task sr_avgpool, deg_scale 12 (README example 1): svd_operators.SuperResolution, 12x12 block means, "
                "the same operator; back-projection A_pinv (the task name contains 'sr')"},
    "sr_bicubic": {
        "operators": ["sr:factor=12,padding=symmetric"], "back_projection": "pseudo_inverse", "prompt": ANIMAL_PROMPT,
        "note": "task sr_bicubic, deg_scale 12 (README example 2): svd_operators.SRConv with Keys-bicubic taps and "
                "half-sample reflection, equal to sr:padding=symmetric at even factors (no 1-D singular value "
                "falls below the 3e-2 cut at x12); back-projection A_pinv"},
    "deblur_gauss": {
        "operators": ["gaussian_blur:kernel_size=61,sigma=3.0,padding=constant"], "back_projection": "adjoint",
        "prompt": None,
        "note": "task deblur_gauss, deg_scale 61 (the kernel size, as in the README's deblurring example), sigma 3.0: "
                "svd_operators.Deblurring is no Gaussian blur: its taps sit one pixel off centre, 1-D singular "
                "values below 3e-2 are zeroed and its singular values are laid out per channel (repeat) against "
                "singular vectors interleaved per pixel; a centred 61-tap Gaussian of sigma 3 with zero padding "
                "(the official boundary) stands in; back-projection At. The README gives "
                "no prompt for this task"},
    "deblur_motion": {
        "operators": ["motion_blur:kernel_size=61,intensity=0.5,generator=official,seed=0"],
        "back_projection": "none", "prompt": FACE_PROMPT,
        "note": "task deblur_motion, deg_scale 61, intensity 0.5 (README example 3): LeviBorodenko/motionblur "
                "kernels from numpy's global state after solve.py's set_seed(0), the second draw (Blurkernel's "
                "initial weights take the first), applied with reflect padding; its At is the identity, so the "
                "data term is the plain residual (back_projection 'none')"},
    "inpainting": {
        "operators": ["inpaint_box:fraction=0.5"], "back_projection": "adjoint", "prompt": None,
        "note": "task inpainting: functions/degradation.py loads exp/inp_masks/mask_768_half.npy, which the "
                "repository does not contain (its name and comment say a block covering half the image); a "
                "centred box of half the area stands in; At is the zero fill (= A_pinv). The README lists no "
                "inpainting example and no prompt"},
}


def _preset(task: str) -> dict[str, Any]:
    setting = TASKS[task]
    preset = {"method": "flowdps", "num_steps": 28,
              "options": {"step_size": 15.0, "data_steps": 3, "back_projection": setting["back_projection"],
                          "shift": 4.0},
              "objective": {"space": "pixel", "weight": 1.0, "reduction": "sum"},
              "operators": setting["operators"], "noise_std": NOISE_STD, "resolution": 768, "model": SD3_MEDIUM,
              "guidance_scale": 2.0, "negative_prompt": "", "seed": 0, "source": OFFICIAL_SOURCE,
              "note": f"{setting['note']}; {COMMON_NOTE}",
              "quirks": {"joint_batch_norm": "the residual norm is taken over the whole batch (the same at the "
                                             "official batch 1)"},
              "parity": {"options": {"official_quirks": True}}}
    if setting["prompt"] is not None:
        preset["prompt"] = setting["prompt"]
    return preset


PRESETS: dict[str, dict[str, Any]] = {f"flowdps_{task}": _preset(task) for task in TASKS}
