"""DPS-style guidance: backpropagate the data residual through the flow network (Chung et al., ICLR 2023).

Diffusion posterior sampling adapted to rectified flow (time convention of ``guidance.flow``)::

    x ~ N(0, I)
    for i in 0 .. N-1:
        v      = v_theta(x, s_i, c)                  with autograd through the network
        x0_hat = x - s_i v
        r      = ‖y − A(D(x0_hat))‖                  the norm, not its square, as in DPS
        x      = x + (s_{i+1} − s_i) v − ζ ∇_x r     Euler step, then the DPS correction
    return D(x)

The gradient ∇_x r = (∂x0_hat/∂x)ᵀ ∇_{x0_hat} r runs through the transformer's Jacobian: every guided step
costs one forward and one backward pass of the network (with activation memory), which is what gradient
skipping (FlowChef) avoids. The network's parameters are never differentiated (``torch.autograd.grad`` with
respect to x only), so no parameter accumulates a ``.grad``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from ..flow import euler_step, x0_from_velocity
from ..objectives import MeasurementFidelity, Objective
from ..sampler import start_state, step_end
from .common import (CountingModel, DivergenceMonitor, MethodResult, check_nonnegative,
                     guided_steps, measurement_batch_size, reference_scale)

__all__ = ["dps", "activation_checkpointing"]

_NETWORK_ATTRIBUTES = ("transformer", "network", "unet")


def _checkpointable(model) -> list[torch.nn.Module]:
    """The model's networks that implement diffusers' gradient checkpointing switch."""
    found = []
    for name in _NETWORK_ATTRIBUTES:
        module = getattr(model, name, None)
        if (isinstance(module, torch.nn.Module) and getattr(module, "_supports_gradient_checkpointing", False)
                and hasattr(module, "enable_gradient_checkpointing") and module not in found):
            found.append(module)
    return found


@contextmanager
def activation_checkpointing(model, enabled: bool = True):
    """Turn on activation (gradient) checkpointing on the model's network for the duration of the block, when
    the network supports it (diffusers ``ModelMixin``); the previous state is restored afterwards."""
    switched = []
    try:
        if enabled:
            for module in _checkpointable(model):
                if not module.is_gradient_checkpointing:
                    module.enable_gradient_checkpointing()
                    switched.append(module)
        yield switched
    finally:
        for module in switched:
            module.disable_gradient_checkpointing()


def _residual(objective: Objective, model, x0_hat: torch.Tensor, use_norm: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(r, negative): r = sqrt(L) with ``use_norm`` (L itself without), and with ``use_norm`` a 0-d bool tensor that
    holds when some loss is negative, where the square root is undefined (None without); no host read."""
    loss = objective(model, x0_hat)
    if not use_norm:
        return loss, None
    # ‖·‖ = sqrt of the squared residual; the clamp keeps the gradient finite at an exact fit
    return loss.clamp_min(1e-20).sqrt(), (loss.detach() < 0).any()


@torch.no_grad()
def dps(model, objective: Objective, *, num_steps: int = 28, cond=None, height=None, width=None, generator=None,
        callback=None, progress: bool = True, batch_size=None, latents=None, decode: bool = True,
        on_step_end=None,
        step_size: float = 0.5, window: tuple[int, int] | None = None, use_norm: bool | None = None,
        gradient_checkpointing: bool = True, check_divergence: bool = True) -> MethodResult:
    """Diffusion posterior sampling (Chung et al., ICLR 2023) on a rectified flow: an Euler step followed by
    x ← x − ζ ∇_x r(x0_hat(x)), differentiating through the network (see the module docstring).

    Args:
        model, objective, num_steps, cond, height, width, generator, callback, progress, batch_size, latents,
            decode: the common method arguments (see ``guidance.methods``). ``batch_size`` defaults to the
            measurement's batch for a :class:`MeasurementFidelity` (a batch-1 y is shared).
        step_size: ζ >= 0, constant over the guided steps, as in DPS. The gradient of the norm r does not shrink
            with the residual (‖∇r‖ <= ‖A‖ ‖∂x0_hat/∂x‖ for a linear A in pixel space), so ζ sets the length of each
            correction in x; it does not adapt to the image size, and large images may need a larger ζ.
        window: ``(start, stop)`` step indices that are guided (default: all); the others are plain Euler steps
            without any gradient.
        use_norm: r = sqrt(L), the residual norm ‖y − A(D(x0_hat))‖ for a squared-error :class:`MeasurementFidelity`
            (sqrt(weight) times it), as DPS does; False uses r = L, the objective's loss itself (classifiers,
            rewards, losses that may be negative). Default: True for a MeasurementFidelity, False otherwise.
        gradient_checkpointing: recompute the network's activations in the backward pass (diffusers models that
            support it) to cut the activation memory; the previous setting is restored after the run.
        check_divergence: stop with a :class:`DivergenceError` naming the step and the state's scale when the
            residual or the state becomes NaN/inf, or a sample's RMS exceeds ``DIVERGENCE_FACTOR`` (100) times
            its reference scale, as in :func:`~guidance.methods.flowchef.flowchef`. Recorded on the device and read
            once, after the loop (a run that diverges finishes its steps first), as is the sign of the loss under
            ``use_norm``: the loop reads nothing back from the device.

    Returns:
        :class:`MethodResult`; ``info["residual"]``: r at the last guided step per sample (None without one),
        ``info["network_backward_passes"]``: the number of backward passes through the network.
    """
    step_size = check_nonnegative(step_size, "step_size")
    if not isinstance(objective, Objective):
        raise ValueError(f"dps needs an Objective (e.g. MeasurementFidelity), got {type(objective).__name__}")
    if use_norm is None:
        use_norm = isinstance(objective, MeasurementFidelity)
    batch_size = measurement_batch_size(objective, batch_size, latents)
    counted = CountingModel(model)
    state = start_state(counted, cond, num_steps, height, width, generator, batch_size, latents)
    x, cond, sigmas = state.x, state.cond, state.sigmas
    guided = set(guided_steps(window, num_steps))
    objective.bind(model, state.height, state.width)

    residual = None
    hint = f"use a smaller step_size than {step_size}"
    monitor = DivergenceMonitor("dps", hint, check_divergence, reference_scale(model, x))
    # recorded on the device, read once after the loop: a negative loss under use_norm
    negative = torch.zeros((), dtype=torch.bool, device=x.device)
    with activation_checkpointing(model, gradient_checkpointing):
        for i in tqdm(range(num_steps), disable=not progress, desc="dps"):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            if i in guided:
                with torch.enable_grad():
                    x_in = x.detach().requires_grad_(True)
                    v = counted.velocity(x_in, sigma, cond, grad=True)
                    x0_hat = x0_from_velocity(x_in, v, sigma)
                    r, below = _residual(objective, model, x0_hat, use_norm)
                    (grad,) = torch.autograd.grad(r.sum(), x_in)
                v, x0_hat, residual = v.detach(), x0_hat.detach(), r.detach()
                if below is not None:
                    negative = negative | below
                monitor.watch("the residual r", i, residual)
            else:
                v = counted.velocity(x, sigma, cond)
                x0_hat, grad = x0_from_velocity(x, v, sigma), None
            if callback is not None:
                callback({"step": i, "sigma": sigma, "x": x, "x0_hat": x0_hat})
            x = euler_step(x, v, sigma, sigma_next)
            if grad is not None:
                x = x - step_size * grad.to(x.dtype)
            x = step_end(on_step_end, i, sigma, sigma_next, {"x": x})
            monitor.update(x, i)

    if use_norm and bool(negative):
        raise ValueError(f"use_norm=True takes the square root of the loss, but {type(objective).__name__} returned a "
                         f"negative loss; pass use_norm=False to differentiate the loss itself")
    monitor.finish()
    image = model.decode(x) if decode else None
    return MethodResult(x=x, image=image, nfe=counted.nfe, sigmas=sigmas,
                        info={"residual": residual, "network_backward_passes": len(guided)})
