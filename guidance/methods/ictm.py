"""ICTM: iterative corrupted trajectory matching (Zhang, Zhang, Xu, Zhang, Gu, "Flow Priors for Linear Inverse
Problems via Iterative Corrupted Trajectory Matching", NeurIPS 2024).

A MAP estimate along the flow: at every step the state x is optimised (a few Adam iterations) so that its Euler
prediction x' matches, through A, the corrupted measurement trajectory y' = t' y + (1 − t') A x_init, while the
prior term −log p(x') is kept by the instantaneous change of variables, −log p_s(x) + h · div v (a Hutchinson
estimate of the divergence). In flowsteer's time (s = 1 − t, paper time t; v = ε − x0, the paper's velocity is
−v), on the grid t_i = t_ε + i (1 − t_ε) / N, s_i = 1 − t_i, with the step h = (1 − t_ε) / N::

    x_init = ε ~ N(0, I),  x = x_init
    for i = 0 .. N−1:   s = s_i,  s' = s − h
        Adam on x, learning rate η, new at every step; K times:
            v    = v_theta(x, s)                            with autograd
            x'   = x + (s' − s) v                           the Euler prediction
            y'   = (1 − s') y + s' A x_init                 the corrupted trajectory of the measurement
            z    ~ Rademacher (±1)
            L    = λ ‖A x' − y'‖² − h · zᵀ (∂v/∂x) z         (+ ½ ‖x‖² at i = 0: −log p_1(x), x at the noise)
            ∇    = ∇_x L  (through v and the Hutchinson term)  (+ (x + (1 − s) v) / s at i > 0: −∇ log p_s(x)
                                                              = ε_hat / s with v held fixed)
            x    = Adam step with ∇
        x = x + (s' − s) v_theta(x, s)
    return x

Each Adam iteration costs one forward of the network and a second-order backward (the gradient of the
Hutchinson term zᵀ J z runs through the network twice); each step adds one forward without autograd.

Correspondence with the official code (annegnx/PnP-Flow at commit ee5b159e6edff4d585ebf36c9a5333ffa85e066c,
pnpflow/methods/flow_priors.py ``FLOW_PRIORS.solve_ip``, pnpflow/utils.py ``hut_estimator``;
config/method_config/flow_priors.yaml; scripts/script_test.sh): its time is t = 1 − s with the velocity towards the
data (v_theirs = −v); ``x + model_forward(x, t) * dt`` is the Euler prediction above, ``trace_term * dt`` with
trace_term = zᵀ J_theirs z is −h zᵀ (∂v/∂x) z, ``grad_xt_lik = −(−x + t · pred) / (1 − t)`` is (x + (1 − s) v) / s.
N, K, ``lmbda`` (λ), ``eta`` (η) are ``num_steps``, ``inner_steps``, ``data_weight``, ``step_size``; its
``start_time`` > 0 is t_ε, its start_time 0 (the published setting) means t_ε = 1e-3. ``hut_estimator`` draws
Rademacher noise (``(torch.rand(...) < 0.5) * 2 − 1``, one probe) and differentiates the estimate
(``torch.autograd.functional.jvp(..., create_graph=True)``); here the probe is the sign of a standard normal draw
from ``generator`` (the same distribution, and a stream a float64 transcription can replay), and the estimate is
the vector-Jacobian product zᵀ Jᵀ z = zᵀ J z of the same forward that gives v (the official code runs the network
once more for it). The data term is λ times the objective's own form, weight · ‖A x' − y'‖² summed (or averaged,
with reduction "mean") over the measurement; the official λ ‖·‖² is weight 1, reduction "sum". Only the Gaussian
data term is covered, not the official ``noise_type: laplace`` variant (λ ‖·‖₁).

Official-code quirk: with start_time 0 (every published run) the grid starts at t_ε = 1e-3 but the step is
dt = 1 / N, not the grid spacing (1 − t_ε) / N, so the last step ends at t = 1 + t_ε / N. Not copied;
``official_dt=True`` reproduces it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from operators.checks import MAX_STEPS, check_number, check_work

from ..flow import euler_step, x0_from_velocity
from ..objectives import MeasurementFidelity
from ..sampler import initial_noise, start_state, step_end
from .common import (CountingModel, DivergenceMonitor, MethodResult, check_count, check_flag, check_nonnegative,
                     measurement_batch_size, reference_scale, require_linear_measurement, require_pixel_model)

__all__ = ["PRESETS", "ictm", "ictm_grid", "rademacher"]


def ictm_grid(num_steps: int, start_time: float, official_dt: bool = False) -> tuple[list[float], float]:
    """The levels s_i = 1 − t_i, t_i = i / N · (1 − t_ε) + t_ε (i = 0 .. N−1), and the step h = (1 − t_ε) / N
    (1 / N with ``official_dt``), as Python floats."""
    times = [i / num_steps * (1 - start_time) + start_time for i in range(num_steps)]
    return [1 - t for t in times], (1 / num_steps if official_dt else (1 - start_time) / num_steps)


def rademacher(shape: tuple[int, ...], generator, device: torch.device | str) -> torch.Tensor:
    """±1 entries with equal probability (float32): the signs of one standard normal draw of ``initial_noise``."""
    return torch.where(initial_noise(shape, generator, device) >= 0, 1.0, -1.0)


@torch.no_grad()
def ictm(model, objective: MeasurementFidelity, *, num_steps: int = 100, cond=None, height=None, width=None,
         generator=None, callback=None, progress: bool = True, batch_size=None, latents=None, decode: bool = True,
         on_step_end=None, inner_steps: int = 1, step_size: float = 0.02, data_weight: float = 1000.0,
         start_time: float = 1e-3, official_dt: bool = False, check_divergence: bool = True) -> MethodResult:
    """ICTM (Zhang et al., NeurIPS 2024): at each step, ``inner_steps`` Adam iterations on the state against the
    corrupted measurement trajectory and the flow's change-of-variables prior, then an Euler step (see the module
    docstring).

    Args:
        model, objective, num_steps, cond, height, width, generator, callback, progress, batch_size, latents,
            decode: the common method arguments (see ``guidance.methods``). ``model`` must be a pixel-space model
            whose velocity is twice differentiable; ``objective`` a pixel-space :class:`MeasurementFidelity` with
            a linear operator. ``num_steps`` is N (each step costs ``inner_steps`` forward and second-order
            backward passes of the network and one more forward); ``latents``: x_init (default: drawn from
            ``generator``, which also draws the Hutchinson probes, one per Adam iteration, after it). The callback
            gets ``{"step", "sigma", "x", "x0_hat"}`` after the Adam iterations, before the Euler step.
        inner_steps: K >= 1, Adam iterations per step.
        step_size: η >= 0, Adam's learning rate. Adam is new at every step, so its first update moves every pixel
            by about η whatever the loss scale, and x can travel about N · K · η in all: the official 0.01 (0.1 for
            SR) is tuned for N = 100, K = 1; the default 0.02 serves 50 to 100 steps (on the analytic benchmark
            at 50 steps, 0.01 leaves MSE/MMSE 6.5 to 16, 0.02 gives 1.2 to 1.8).
        data_weight: λ >= 0 of the data term λ · ‖A x' − y'‖² (the objective's weight and reduction apply too).
        start_time: t_ε in [0, 1), the paper time of the first step (the official default, start_time 0, means
            1e-3).
        official_dt: step by h = 1 / N instead of the grid spacing (1 − t_ε) / N, as the official code does with
            its start_time 0 (for parity runs).
        check_divergence: stop with a :class:`DivergenceError` naming the step and the state's scale when the
            state becomes NaN/inf or a sample's RMS exceeds ``DIVERGENCE_FACTOR`` (100) times its reference scale;
            read once, after the loop.

    Returns:
        :class:`MethodResult`; ``sigmas`` the N levels s_i and the final s_{N−1} − h; ``info["loss"]``: L at the
        last Adam iteration per sample, ``info["network_backward_passes"]``: N · K.
    """
    check_count(num_steps, "num_steps", 1, MAX_STEPS)
    check_count(inner_steps, "inner_steps", minimum=1, fix="inner_steps=0 leaves plain sampling: use the "
                "'unguided' method for that")
    check_work({"num_steps": num_steps, "inner_steps": inner_steps}, "ictm")
    step_size = check_nonnegative(step_size, "step_size")
    data_weight = check_nonnegative(data_weight, "data_weight")
    start_time = check_number(start_time, "start_time", 0, 1)
    if start_time >= 1:
        raise ValueError(f"start_time must be below 1 (t_ε, the paper time of the first step; 1e-3 officially), got "
                         f"{start_time:g}")
    if check_flag(official_dt, "official_dt") and start_time == 0:
        raise ValueError("official_dt=True changes nothing with start_time 0 (the grid spacing is then 1/N already); "
                         "the official runs are start_time=1e-3 with official_dt=True")
    objective = require_linear_measurement(objective, "ictm", "its corrupted trajectory (1 − s) y + s A x_init is A x_s "
                                                            "only for a linear A")
    require_pixel_model(model, "ictm", "it matches A x to a corrupted measurement trajectory in image space and "
                        "differentiates the network's divergence")
    operator = objective.operator

    batch_size = measurement_batch_size(objective, batch_size, latents)
    counted = CountingModel(model)
    state = start_state(counted, cond, num_steps, height, width, generator, batch_size, latents)
    x_init, cond = state.x, state.cond
    objective.bind(model, state.height, state.width)
    y = objective.y.to(device=x_init.device, dtype=x_init.dtype)
    A_x_init = operator(x_init)
    levels, h = ictm_grid(num_steps, start_time, official_dt)
    sigmas = torch.tensor([*levels, levels[-1] - h], dtype=torch.float32, device=x_init.device)
    dims = tuple(range(1, x_init.ndim))
    reduce = torch.sum if objective.reduction == "sum" else torch.mean
    lam = data_weight * objective.weight

    x, loss = x_init, None
    monitor = DivergenceMonitor("ictm", f"use a smaller step_size than {step_size:g}", check_divergence,
                                reference_scale(model, x_init))
    for i in tqdm(range(num_steps), disable=not progress, desc="ictm"):
        s, s_next = levels[i], levels[i] - h
        y_next = (1 - s_next) * y + s_next * A_x_init
        x = x.detach().clone().requires_grad_(True)
        adam = torch.optim.Adam([x], lr=step_size)
        for _ in range(inner_steps):
            # the gradient of the Hutchinson term differentiates the network twice: the fused attention kernels
            # (flash, memory-efficient) have no second derivative, the math kernel has
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                v = counted.velocity(x, s, cond, grad=True)
                x_next = euler_step(x, v, s, s_next)
                z = rademacher(tuple(x.shape), generator, x.device)
                (jz,) = torch.autograd.grad(v, x, grad_outputs=z, create_graph=True)
                divergence = (jz * z).sum(dim=dims)
                loss = lam * reduce((operator(x_next) - y_next).square(), dim=dims) - h * divergence
                if i == 0:
                    loss = loss + 0.5 * x.square().sum(dim=dims)
                (grad,) = torch.autograd.grad(loss.sum(), x)
            if i > 0:
                grad = grad + (x.detach() + (1 - s) * v.detach()) / s
            x.grad = grad
            adam.step()
        x = x.detach()
        v = counted.velocity(x, s, cond)
        if callback is not None:
            callback({"step": i, "sigma": s, "x": x, "x0_hat": x0_from_velocity(x, v, s)})
        x = euler_step(x, v, s, s_next)
        x = step_end(on_step_end, i, s, s_next, {"x": x})
        monitor.update(x, i)
    monitor.finish()

    image = model.decode(x) if decode else None
    return MethodResult(x=x, image=image, nfe=counted.nfe, sigmas=sigmas,
                        info={"loss": loss.detach(), "network_backward_passes": num_steps * inner_steps})


# The official CelebA settings (128×128 images in [-1, 1], the OT flow-matching U-Net, "model ot"):
# scripts/script_test.sh gives eta and lmbda per problem, config/method_config/flow_priors.yaml N 100, K 1 and
# start_time 0 (t_ε = 1e-3 with dt = 1/N), main.py the noise levels, pnpflow/degradations.py the operators (the same
# stand-ins as pnp_flow's presets).
_SOURCE = ("Zhang et al., Flow Priors for Linear Inverse Problems via Iterative Corrupted Trajectory Matching, "
           "NeurIPS 2024; run as in Martin et al., PnP-Flow, ICLR 2025: github.com/annegnx/PnP-Flow @ "
           "ee5b159e6edff4d585ebf36c9a5333ffa85e066c: scripts/script_test.sh (eta, lmbda), "
           "config/method_config/flow_priors.yaml (N, K, start_time), main.py (problem, sigma_noise), "
           "pnpflow/degradations.py (operator), pnpflow/methods/flow_priors.py and pnpflow/utils.py hut_estimator "
           "(the loop)")
QUIRKS = {
    "step_not_grid_spacing": "with start_time 0 the grid starts at t = 1e-3 (spacing (1 − 1e-3)/N) but each step "
                             "is dt = 1/N (ictm(official_dt=True))",
}


def _preset(operators: list[str], eta: float, lmbda: float, noise_std: float, note: str) -> dict:
    return {"method": "ictm", "num_steps": 100,
            "options": {"inner_steps": 1, "step_size": eta, "data_weight": lmbda, "start_time": 1e-3},
            "objective": {"space": "pixel", "weight": 1.0, "reduction": "sum"}, "operators": operators,
            "noise_std": noise_std, "resolution": 128, "source": _SOURCE,
            "note": note + "; the official start_time 0 is t_ε = 1e-3 (quirk step_not_grid_spacing: "
                           "get_preset(name, official_quirks=True) steps by 1/N as the official code)",
            "quirks": dict(QUIRKS), "parity": {"options": {"official_dt": True}}}


PRESETS: dict[str, dict[str, Any]] = {
    "ictm_celeba_denoise": _preset(["denoise"], 0.01, 100.0, 0.2, "problem denoising: A = I"),
    "ictm_celeba_deblur": _preset(
        ["gaussian_blur:kernel_size=61,sigma=1.0,padding=circular"], 0.01, 1000.0, 0.05,
        "problem gaussian_deblurring_FFT: a 61-tap Gaussian of σ 1 applied by FFT, i.e. with circular padding"),
    "ictm_celeba_sr2": _preset(
        ["sr_avgpool:factor=2"], 0.1, 10000.0, 0.05,
        "problem superresolution (×2 at 128²): the official operator keeps the top-left pixel of each 2×2 block, "
        "which no operator spec offers; 2×2 averaging stands in (on smooth images both give about the same "
        "residual, so λ is kept)"),
    "ictm_celeba_inpaint_box": _preset(
        ["inpaint_box:size=40"], 0.01, 10000.0, 0.05, "problem inpainting: a centred 40×40 hole (half_size_mask 20)"),
    "ictm_celeba_inpaint_freeform": _preset(
        ["inpaint_freeform"], 0.01, 10000.0, 0.05,
        "problem paintbrush_inpainting: the official brush-stroke masks come from their own generator (seed 42); "
        "inpaint_freeform's strokes stand in"),
    "ictm_celeba_inpaint_random": _preset(
        ["inpaint_random:fraction=0.7"], 0.01, 10000.0, 0.01,
        "problem random_inpainting: the official mask drops each pixel with probability 0.7 (all channels alike); "
        "inpaint_random drops exactly 70 %"),
}
