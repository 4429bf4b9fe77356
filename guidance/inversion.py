"""Inversion: an image (or its latent) mapped to the noise at s = 1 by integrating the flow's ODE upward along the
model's own schedule, with the solvers of :mod:`guidance.solvers`.

    z_0 = E(image)                                  (or the latent given)
    for k = N-1, ..., N-n:   z_{s_k} = step(z_{s_{k+1}}, s_{k+1} -> s_k)      s_N = 0 < ... < s_0 = 1

:func:`guidance.sample` with the same ``solver``, ``num_steps`` and ``strength`` integrates the same schedule
back down, so ``sample(model, cond, latents=invert(model, image, cond).noise)`` reconstructs the image up to the
solvers' discretisation error (order 1 for Euler, 2 for RF-Solver and FireFlow, whose papers invert this way:
the schedule reversed, the network evaluated at the lower end of each step first). ``strength`` < 1 stops partway,
at the level where an image-to-image run of that strength starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .loading.images import image_tensor
from .sampler import check_model, start_state, start_step, step_end
from .solvers import check_solver, evaluations, integrate

__all__ = ["InversionResult", "invert"]


@dataclass
class InversionResult:
    """What :func:`invert` found: ``noise``, the state at ``sigmas[start_step]`` (s = 1 for strength 1: the
    ``latents`` to sample from); ``latent``, the clean latent it started from; ``sigmas``, the descending schedule
    of ``num_steps`` (what :func:`guidance.sample` integrates); ``start_step``, where sampling resumes;
    ``nfe``, network evaluations (CFG counted once); ``trajectory``, on request, the states at
    ``sigmas[N], sigmas[N-1], ..., sigmas[start_step]`` (from the clean latent up to ``noise``)."""

    noise: torch.Tensor
    latent: torch.Tensor
    sigmas: torch.Tensor
    start_step: int
    nfe: int
    solver: str
    trajectory: list[torch.Tensor] | None = None


@torch.no_grad()
def invert(
    model,
    image: Any = None,
    cond: Any = None,
    *,
    num_steps: int = 28,
    solver: str = "euler",
    latents: torch.Tensor | None = None,
    strength: float = 1.0,
    return_trajectory: bool = False,
    progress: bool = True,
    on_step_end: Callable | None = None,
) -> InversionResult:
    """Invert ``image`` (a tensor in [-1, 1], a PIL image or a NumPy array; encoded by the model) or a clean
    latent ``latents`` (B, C, h, w) to the noise from which the ODE generates it.

    Args:
        model: a :class:`~guidance.backbones.base.FlowModel`.
        image: the image to invert; give it or ``latents``, not both.
        cond: the condition along which to invert (``model.condition(...)``, e.g. the source prompt); None: the
            model's default (the empty prompt without classifier-free guidance on text models).
        num_steps: steps of the model's schedule (the same count as :func:`guidance.sample`'s).
        solver: "euler", "rf_solver" or "fireflow" (:mod:`guidance.solvers`).
        latents: a clean latent instead of ``image``.
        strength: the fraction of the schedule to invert (1: up to pure noise); sampling with the same strength
            resumes where this stops.
        return_trajectory: keep every state in ``result.trajectory``.
        progress: show a progress bar.
        on_step_end: ``(step, sigma, state) -> state`` after each step, counted as in sampling
            (:func:`guidance.sampler.step_end`).
    """
    check_model(model)
    check_solver(solver)
    start = start_step(num_steps, strength)
    if not isinstance(return_trajectory, bool):
        raise ValueError(f"return_trajectory must be True or False, got {return_trajectory!r}")
    if (image is None) == (latents is None):
        raise ValueError("invert needs the image to invert or its clean latents (one of them): "
                         "invert(model, image) or invert(model, latents=z)")
    if image is not None:
        if not isinstance(image, torch.Tensor):
            image = image_tensor(image)
        if image.ndim != 4 or image.shape[1] != model.image_channels:
            raise ValueError(f"image must be (B, {model.image_channels}, H, W) in [-1, 1], got {tuple(image.shape)}")
        if not bool(torch.isfinite(image).all()):
            raise ValueError("image contains NaN or infinite values; pass a finite image in [-1, 1]")
        model.check_size(int(image.shape[-2]), int(image.shape[-1]))
        latents = model.encode(image.to(device=model.device, dtype=torch.float32))
    state = start_state(model, cond, num_steps, latents=latents)
    z0, cond = state.x, state.cond
    ascending = state.sigmas.flip(0)[: num_steps - start + 1]  # s_N = 0, s_{N-1}, ..., s_start

    trajectory: list[torch.Tensor] | None = [] if return_trajectory else None
    noise = integrate(lambda x, s: model.velocity(x, s, cond), z0, ascending, solver, progress=progress,
                      desc="inverting", trajectory=trajectory,
                      step_end=lambda i, s, s_next, x: step_end(on_step_end, num_steps - 1 - i, s, s_next,
                                                                   {"x": x}))
    return InversionResult(noise=noise, latent=z0, sigmas=state.sigmas, start_step=start, nfe=evaluations(solver, num_steps - start),
                           solver=solver, trajectory=trajectory)
