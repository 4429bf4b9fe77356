"""Editing by inversion: invert the source image partway to noise, then regenerate the inverted part under an edit
prompt, an objective (a classifier label, a reward, a measurement), or both, optionally only inside a mask.

    z_0 = E(source)
    z_{s_k}, k = N, ..., n0: the inversion of z_0 with ``solver`` under c_src    (guidance.invert; n0 from strength)
    x = z_{s_n0}
    for i = n0 .. N-1:
        x', v = solver step of x from s_i to s_{i+1} under c_edit                    (v: the step's first velocity)
        x' = x' - step_size · ∇_z L(z)|_{z = x - s_i v}                              (with an objective: FlowChef's
                                                                                     gradient skipping)
        x = M ⊙ x' + (1 - M) ⊙ z_{s_{i+1}}                                            (with a mask: outside, the
                                                                                     inverted trajectory)

``strength`` is the fraction of the schedule that is inverted and regenerated (1: from pure noise): low values keep
the layout and colours of the source, high values let the edit change more. Without a mask the result keeps what
the objective or prompt does not change only through the inversion; with a mask the outside ends on z_0 exactly.

On text-to-image families with ``strength`` 1 and the RF-Solver, this is RF-Solver editing (see
:mod:`guidance.methods.rf_solver_edit`); on models without text (the default model) it edits toward an objective,
the guidance the FlowChef paper applies to generation (Patel et al., "FlowChef: Steering of Rectified Flow Models
for Controlled Generations", ICCV 2025) applied from the inverted source: the gradient of the objective at the clean
estimate moves the state without differentiating through the network.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from operators.checks import MAX_STEPS

from ..flow import x0_from_velocity
from ..inversion import invert
from ..objectives import Objective, objective_gradient
from ..sampler import condition_batch, step_end
from ..solvers import SOLVERS, check_solver
from .common import CountingModel, DivergenceMonitor, MethodResult, check_count, check_nonnegative, reference_scale
from .editing import (as_pixel_mask, check_source_image, latent_edit_mask, refuse_scale_for_condition, same_batch,
                      text_condition)

__all__ = ["inversion_edit", "run_inversion_edit"]


def _conditions(model, method: str, source_prompt, edit_prompt, source_guidance_scale, guidance_scale):
    """(c_src, c_edit): text conditions of the prompts on text models (source "" when only an edit prompt is
    given); the model's default condition for both on models without text, which refuse prompts."""
    if source_prompt is None and edit_prompt is None:
        if guidance_scale is not None or source_guidance_scale is not None:
            raise ValueError(f"{method}: guidance scales act on the prompts; give source_prompt and edit_prompt or "
                             f"drop the guidance scales")
        cond = model.condition()
        return cond, cond
    if edit_prompt is None:
        raise ValueError(f"{method}: source_prompt describes the source for an edit_prompt; give the edit_prompt too")
    refuse_scale_for_condition(method, source_prompt, source_guidance_scale, "source_guidance_scale", "source_prompt")
    refuse_scale_for_condition(method, edit_prompt, guidance_scale, "guidance_scale", "edit_prompt")
    c_src = text_condition(model, method, "" if source_prompt is None else source_prompt, source_guidance_scale,
                           "source_prompt")
    c_edit = text_condition(model, method, edit_prompt, guidance_scale, "edit_prompt")
    same_batch(method, source_prompt=c_src, edit_prompt=c_edit)
    return c_src, c_edit


def run_inversion_edit(method: str, model, objective: Objective | None, *, num_steps: int, cond: Any, height, width,
                       generator, callback, progress: bool, batch_size, latents, decode: bool,
                       on_step_end, source_image, source_prompt, edit_prompt, mask, strength: float,
                       solver: str, step_size: float, source_guidance_scale, guidance_scale,
                       check_divergence: bool) -> MethodResult:
    """The loop of :func:`inversion_edit`, shared with :func:`~guidance.methods.rf_solver_edit.rf_solver_edit`
    (``method`` names the caller in errors)."""
    if cond is not None:
        raise ValueError(f"{method} takes its conditions from source_prompt and edit_prompt; leave cond=None")
    if latents is not None:
        raise ValueError(f"{method} starts from the inversion of source_image; leave latents=None (pass the image)")
    if generator is not None:
        raise ValueError(f"{method} is deterministic (an ODE inversion and regeneration): leave generator=None")
    if objective is not None and not isinstance(objective, Objective):
        raise ValueError(f"objective must be None or an Objective, got {type(objective).__name__}")
    check_count(num_steps, "num_steps", 1, MAX_STEPS)
    check_solver(solver)
    check_nonnegative(step_size, "step_size")
    if objective is not None and step_size == 0:
        raise ValueError(f"{method}: step_size=0 ignores the objective; give a positive step_size or no objective")
    source = check_source_image(source_image, method, height, width)
    image_h, image_w = int(source.shape[-2]), int(source.shape[-1])
    pixel_mask = None if mask is None else as_pixel_mask(mask, image_h, image_w)
    if objective is None and edit_prompt is None:
        raise ValueError(f"{method} with neither an objective nor an edit_prompt regenerates the source: give one "
                         f"(guidance.invert then guidance.sample reconstructs an image)")

    model = CountingModel(model)
    c_src, c_edit = _conditions(model, method, source_prompt, edit_prompt, source_guidance_scale, guidance_scale)
    prompts = condition_batch(c_edit)
    batch = max(source.shape[0], prompts, 1 if pixel_mask is None else pixel_mask.shape[0])
    if batch_size is not None and batch_size != batch:
        raise ValueError(f"batch_size={batch_size} differs from the {batch} image(s) that source_image, the prompts "
                         f"and the mask give; leave it unset")
    for name, t in (("source_image", source), ("mask", pixel_mask)):
        if t is not None and t.shape[0] not in (1, batch):
            raise ValueError(f"{name} has batch {t.shape[0]} but {batch} images are edited; give 1 or {batch}")
    if prompts not in (1, batch):
        raise ValueError(f"the prompts give {prompts} conditions but {batch} images are edited; give 1 or {batch}")

    source = source.to(device=model.device, dtype=torch.float32).expand(batch, -1, -1, -1)
    inverted = invert(model, source, c_src, num_steps=num_steps, solver=solver, strength=strength,
                      return_trajectory=pixel_mask is not None, progress=progress)
    z0, sigmas, start = inverted.latent, inverted.sigmas, inverted.start_step
    M = None if pixel_mask is None else \
        latent_edit_mask(pixel_mask.to(z0.device), tuple(z0.shape[-2:])).expand(batch, -1, -1, -1)
    if objective is not None:
        objective.bind(model, image_h, image_w)

    def velocity(x, s):
        return model.velocity(x, s, c_edit)

    step = SOLVERS[solver]
    monitor = DivergenceMonitor(method, f"use a smaller step_size than {step_size}", check_divergence,
                                reference_scale(model, inverted.noise, z0))
    x, carried, losses = inverted.noise, None, []
    for i in tqdm(range(start, num_steps), disable=not progress, desc=method):
        s_i, s_next = sigmas[i], sigmas[i + 1]
        x_next, v, carried = step(velocity, x, s_i, s_next, carried)
        if objective is not None:
            loss, grad = objective_gradient(objective, model, x0_from_velocity(x, v, s_i))
            x_next = x_next - step_size * grad
            losses.append(loss)
        if M is not None:  # outside the mask: the inverted trajectory at s_{i+1} (index N-1-i of the ascending list)
            x_next = M * x_next + (1 - M) * inverted.trajectory[num_steps - 1 - i]
        if callback is not None:
            callback({"step": i, "sigma": s_i, "x": x, "x0_hat": x0_from_velocity(x, v, s_i)})
        x = step_end(on_step_end, i, s_i, s_next, {"x": x_next})
        monitor.update(x, i)
    monitor.finish()

    image = model.decode(x) if decode else None
    info = {"source_latent": z0, "inverted": inverted.noise, "start_step": start, "solver": solver,
            "edit_mask": M, "loss": torch.stack(losses) if losses else None}
    return MethodResult(x=x, image=image, nfe=model.nfe, sigmas=sigmas, info=info)


@torch.no_grad()
def inversion_edit(
    model,
    objective: Objective | None = None,
    *,
    num_steps: int = 28,
    cond: Any = None,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    latents: torch.Tensor | None = None,
    decode: bool = True,
    on_step_end: Callable | None = None,
    source_image: Any = None,
    source_prompt: str | list[str] | None = None,
    edit_prompt: str | list[str] | None = None,
    mask: torch.Tensor | None = None,
    strength: float = 0.7,
    solver: str = "fireflow",
    step_size: float = 0.3,
    source_guidance_scale: float | None = None,
    guidance_scale: float | None = None,
    check_divergence: bool = True,
) -> MethodResult:
    """Edit ``source_image`` by inverting ``strength`` of the schedule and regenerating it toward ``objective``
    and / or ``edit_prompt``, inside ``mask`` when given.

    Args:
        model: any flow model (text prompts need a text-conditioned one).
        objective: what the edit raises: a ClassifierObjective (a label), a RewardObjective, a MeasurementFidelity,
            ...; None with an ``edit_prompt``.
        num_steps: steps of the whole schedule; ``int(num_steps * strength)`` of them are inverted and regenerated.
        cond, latents, generator: not used (the conditions come from the prompts, the start from the inversion,
            and the method is deterministic): must be None.
        height, width: default to the source image's size (which they must equal).
        batch_size: the number of images, from the source image, prompts and mask; may be given only as that.
        source_image: (1 or B, C, H, W) in [-1, 1], a PIL image or a NumPy array.
        source_prompt, edit_prompt: text (strings or lists) or conditions from ``model.condition``; the source
            prompt defaults to "" when an edit prompt is given. Models without text take neither.
        mask: (H, W) or (1 or B, 1, H, W) in [0, 1], 1 = edit; averaged over each latent cell. Outside it the
            result follows the inverted trajectory and ends on the source latent.
        strength: the fraction of the schedule inverted and regenerated, in (0, 1].
        solver: "euler", "rf_solver" or "fireflow" (:mod:`guidance.solvers`), for both directions.
        step_size: the gradient step of the objective per regenerated step (latent units per unit of loss
            gradient; the default suits the default model's classifier with weight 1).
        source_guidance_scale, guidance_scale: the adapter's guidance for the source (inversion) and edit
            (regeneration) prompts; None keeps the embedded guidance of guidance-distilled models and turns CFG off
            elsewhere.
        check_divergence: stop with a DivergenceError when the state leaves every scale of the data.

    Returns:
        :class:`MethodResult`; ``info`` holds ``source_latent``, ``inverted`` (the noise the regeneration starts
        from), ``start_step``, ``solver``, ``edit_mask`` (latent grid, or None) and ``loss`` (regenerated steps, B)
        with an objective.
    """
    return run_inversion_edit(
        "inversion_edit", model, objective, num_steps=num_steps, cond=cond, height=height, width=width,
        generator=generator, callback=callback, progress=progress, batch_size=batch_size, latents=latents,
        decode=decode, on_step_end=on_step_end, source_image=source_image,
        source_prompt=source_prompt, edit_prompt=edit_prompt, mask=mask, strength=strength, solver=solver,
        step_size=step_size, source_guidance_scale=source_guidance_scale, guidance_scale=guidance_scale,
        check_divergence=check_divergence)
