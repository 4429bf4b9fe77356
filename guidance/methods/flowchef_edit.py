"""Inversion-free text-guided editing with FlowChef (Patel et al., ICCV 2025, section on editing).

No inversion of the source image: sampling starts from noise, and FlowChef's gradient-skipping update pulls
the clean estimate toward the encoded source z_src while a masked prompt contrast steers the edited region::

    M = edit mask on the latent grid (1: edit, 0: keep)
    x ~ N(0, I)
    for i in 0 .. N-1:
        v = v_edit + w · M ⊙ (v_edit - v_src)     edit prompt vs source prompt, no grad
        if i is in the guided window:
            R = 1 everywhere if i < source_steps else 1 - M
            repeat K times:
                x0_hat = x - s_i v
                x = optimizer_step(x, ∇ weight · mean(R ⊙ (x0_hat - z_src)²))
        x = x + (s_{i+1} - s_i) v

The first ``source_steps`` steps anchor the whole layout to the source; afterwards only the preserved
region is pulled, and the edit region follows the edit prompt.

``official_quirks`` reproduces, for parity runs, the two official editing codes of FlowChef/FlowChef commit
9b705fc where they differ from the above (see :data:`OFFICIAL_EDIT_QUIRKS`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from operators.checks import MAX_STEPS, check_work

from ..flow import euler_step, x0_from_velocity
from ..objectives import Objective, objective_gradient, official_latent_mask, unshifted_latent
from ..sampler import start_state, step_end
from .common import (CountingModel, DivergenceMonitor, MethodResult, check_count, check_nonnegative, guided_steps,
                     reference_scale)
from .editing import as_pixel_mask, check_source_image, latent_edit_mask, same_batch, text_condition
from .flowchef import InnerOptimizer, check_optimizer, loss_history

__all__ = ["OFFICIAL_EDIT_QUIRKS", "SourcePull", "flowchef_edit", "instaflow_edit_mask", "latent_edit_mask"]

#: ``official_quirks`` values of :func:`flowchef_edit` and the official file each reproduces (commit 9b705fc).
OFFICIAL_EDIT_QUIRKS = {
    "flux": "src/fluxcombined.py, FluxPipeline.edit: source latent a · E(x) without the VAE shift "
            "(guidance.objectives.unshifted_latent); binary edit mask, nearest-neighbour samples of the pixel mask "
            "> 0.1 (guidance.objectives.official_latent_mask)",
    "instaflow": "src/pipeline_rf_inversionfree_edit.py: source latent a · E(x) without a shift; binary edit mask, "
                 "cells where the bilinear downsampling of the pixel mask is not 0 (instaflow_edit_mask); the pull "
                 "evaluates x0_hat = x − s v_src with the source-prompt velocity",
}


class SourcePull(Objective):
    """L(z) = weight · mean(R ⊙ (z − z_src)²) over the latent, with a region R (1 pulls, 0 leaves free):
    the official 1000 · MSE of the editing code, mean over all latent elements."""

    space = "latent"

    def __init__(self, source_latent: torch.Tensor, weight: float = 1000.0):
        self.source_latent, self.weight = source_latent, float(weight)
        self.region: torch.Tensor | None = None  # None: the whole latent

    def loss(self, z: torch.Tensor) -> torch.Tensor:
        squared = (z - self.source_latent) ** 2
        if self.region is not None:
            squared = squared * self.region
        return self.weight * squared.flatten(1).mean(1)


def instaflow_edit_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The official InstaFlow editing mask (1 = edit): bilinear downsampling (align_corners=False, no
    antialiasing) of the pixel mask, a cell edited unless its value is exactly 0
    (``src/pipeline_rf_inversionfree_edit.py``, FlowChef/FlowChef commit 9b705fc). flowsteer's
    :func:`latent_edit_mask` keeps the fraction of edited pixels instead, so that a cell the mask barely
    touches is mostly kept."""
    m = F.interpolate(mask.float(), size=tuple(latent_hw), mode="bilinear", align_corners=False)
    return (m != 0).float()


def _check_quirks(official_quirks) -> str | None:
    """The official code to reproduce: None (flowsteer's own computation), "flux" (also for True) or "instaflow"."""
    if official_quirks is False:
        return None
    if official_quirks is True:
        return "flux"
    if isinstance(official_quirks, str) and official_quirks in OFFICIAL_EDIT_QUIRKS:
        return official_quirks
    raise ValueError(f"official_quirks must be False, True (= 'flux') or one of {tuple(OFFICIAL_EDIT_QUIRKS)}, got "
                     f"{official_quirks!r}")


@torch.no_grad()
def flowchef_edit(
    model,
    objective: Objective | None = None,
    *,
    num_steps: int = 30,
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
    source_image: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    source_prompt: str | list[str] | None = None,
    edit_prompt: str | list[str] | None = None,
    step_size: float = 0.6,
    inner_steps: int = 5,
    source_steps: int = 10,
    edit_guidance: float = 4.5,
    source_weight: float = 1000.0,
    guidance_scale: float | None = None,
    optimizer: str = "gd",
    momentum: float = 0.0,
    window: tuple[int, int] | None = None,
    check_divergence: bool = True,
    official_quirks: bool | str = False,
) -> MethodResult:
    """Edit ``source_image`` inside ``mask`` toward ``edit_prompt``, inversion-free (FlowChef, ICCV 2025).

    v = v_edit + w · M ⊙ (v_edit − v_src) (two network evaluations per step); inside the guided window K times
    x0_hat = x − s v, x ← optimizer_step(x, ∇ source_weight · mean(R ⊙ (x0_hat − z_src)²)) with R = 1 for
    the first ``source_steps`` steps and R = 1 − M afterwards; then Euler with the same v. The defaults are the
    Flux reference (30 steps, lr 0.6, K 5, source_steps 10, w 4.5, 1000 · MSE).

    The pull contracts the gap to the source by 2 · step_size · source_weight / n per inner step (n latent
    elements per image): 0.5 % at 1024² Flux (n = 262144). Small images need a smaller step_size: the pull
    overshoots when that factor exceeds 1, and a step_size that makes it diverge (factor >= 2, or
    2 (1 + momentum) for "sgd") is refused up front.

    Args:
        model: a text-conditioned latent flow model (any pipeline family of guidance.backbones.registry).
        objective: None, or an extra objective whose gradient is added to the source pull.
        num_steps, height, width, generator, progress, batch_size, latents, decode: as in :func:`guidance.sample`
            (height and width default to the source image's size).
        cond: not used: the conditions come from ``source_prompt`` and ``edit_prompt``; must be None.
        callback: called each step before the Euler move with ``{"step", "sigma", "x", "x0_hat", "loss"}``.
        source_image: the image to edit, (1 or B, C, H, W) in [-1, 1], or a PIL image or NumPy array.
        mask: the region to edit, (H, W) or (1 or B, 1, H, W) in [0, 1] (1 = edit, 0 = keep), the image's size;
            averaged over each latent cell.
        source_prompt, edit_prompt: text describing the source and the wanted result (strings or lists of n),
            or conditions from ``model.condition(...)``, used as they are.
        step_size, inner_steps, optimizer, momentum, window: as in :func:`~guidance.methods.flowchef.flowchef`.
        check_divergence: as in :func:`~guidance.methods.flowchef.flowchef`; the reference scale is the larger of
            1, the RMS of the starting noise, of the source latent and of the model's data where known.
        source_steps: steps that pull the whole image toward the source (all steps when larger than num_steps).
        edit_guidance: w, the weight of the prompt contrast inside the mask (0: the edit prompt alone).
        source_weight: scale of the latent MSE pull (1000 in the official code).
        guidance_scale: the adapter's own guidance for both prompts given as text; None keeps the embedded default of
            guidance-distilled models (Flux dev) and turns classifier-free guidance off for the others (give
            e.g. 4.5 for SD3 to keep its usual guidance outside the mask, at twice the cost).
        official_quirks: for parity runs, reproduce an official editing code (FlowChef/FlowChef commit 9b705fc)
            instead of flowsteer's computation: ``"flux"`` (or True) follows ``src/fluxcombined.py``, whose
            source latent lacks the VAE shift (flowsteer pulls toward the latent the flow samples in) and whose
            edit mask is binary, nearest-neighbour > 0.1 (flowsteer averages each latent cell); ``"instaflow"``
            follows ``src/pipeline_rf_inversionfree_edit.py``, whose edit mask is binary, bilinear != 0, and
            whose pull takes x0_hat = x − s v_src with the source velocity although the Euler step moves along
            v (flowsteer pulls the clean estimate of the trajectory it integrates). False (default): none.

    Returns:
        :class:`MethodResult`; ``info`` holds ``loss`` (guided steps, K, B), ``guided_steps``,
        ``source_latent`` and ``edit_mask`` (on the latent grid).
    """
    if cond is not None:
        raise ValueError("flowchef_edit takes its conditions from source_prompt and edit_prompt; leave cond=None")
    if objective is not None and not isinstance(objective, Objective):
        raise ValueError(f"objective must be None or an Objective, got {type(objective).__name__}")
    source_image = check_source_image(source_image, "flowchef_edit", height, width)
    image_h, image_w = int(source_image.shape[-2]), int(source_image.shape[-1])
    if mask is None:
        raise ValueError("flowchef_edit needs mask, the region to edit (H, W) in [0, 1] with 1 = edit")
    pixel_mask = as_pixel_mask(mask, image_h, image_w)
    check_nonnegative(step_size, "step_size")
    check_count(inner_steps, "inner_steps", minimum=1, fix="inner_steps=0 edits nothing: the result would be plain "
                "sampling from the edit prompt")
    check_count(source_steps, "source_steps", minimum=0)
    check_nonnegative(edit_guidance, "edit_guidance")
    check_nonnegative(source_weight, "source_weight")
    check_optimizer(optimizer, momentum)
    check_count(num_steps, "num_steps", 1, MAX_STEPS)
    check_work({"num_steps": num_steps, "inner_steps": inner_steps}, "flowchef_edit")
    guided = guided_steps(window, num_steps)
    quirks = _check_quirks(official_quirks)

    model = CountingModel(model)
    cond_src = text_condition(model, "flowchef_edit", source_prompt, guidance_scale, "source_prompt")
    cond_edit = text_condition(model, "flowchef_edit", edit_prompt, guidance_scale, "edit_prompt")
    same_batch("flowchef_edit", source_prompt=cond_src, edit_prompt=cond_edit)
    if batch_size is None and latents is None:
        batch_size = max(source_image.shape[0], pixel_mask.shape[0], getattr(cond_edit, "batch_size", 1))
    state = start_state(model, cond_edit, num_steps, image_h, image_w, generator, batch_size, latents)
    x, sigmas = state.x, state.sigmas
    batch = x.shape[0]
    for name, t in (("source_image", source_image), ("mask", pixel_mask)):
        if t.shape[0] not in (1, batch):
            raise ValueError(f"{name} has batch {t.shape[0]} but {batch} images are edited; give 1 or {batch}")

    n = x[0].numel()
    contraction = 2 * step_size * source_weight / n  # curvature of the pull times the step: gap *= 1 - contraction
    if optimizer != "adam" and inner_steps and len(guided) and contraction >= 2 * (1 + momentum):
        raise ValueError(
            f"step_size={step_size} is too large for a {state.height}x{state.width} image: each update of the "
            f"source pull scales the gap to the source by 1 - 2·step_size·source_weight/n = {1 - contraction:.3g} "
            f"(n = {n} latent elements) and diverges; use step_size < "
            f"{2 * (1 + momentum) * n / (2 * source_weight):.3g} (the Flux reference's 0.6 is meant for 1024² images)")

    source = source_image.to(device=x.device, dtype=torch.float32)
    pixel_mask = pixel_mask.to(x.device)
    latent_hw = tuple(x.shape[-2:])
    if quirks is None:
        z_src = model.encode(source).expand_as(x)
        M = latent_edit_mask(pixel_mask, latent_hw)
    else:
        z_src = unshifted_latent(model, source).expand_as(x)
        M = 1 - official_latent_mask(pixel_mask, latent_hw) if quirks == "flux" else \
            instaflow_edit_mask(pixel_mask, latent_hw)
    M = M.expand(batch, -1, -1, -1)
    pull = SourcePull(z_src, source_weight)
    if objective is not None:
        objective.bind(model, state.height, state.width)

    losses: list[list[torch.Tensor]] = []
    # the reference scale: max(1, RMS of the starting noise, of the source latent, of the model's data if known)
    monitor = DivergenceMonitor("flowchef_edit", f"use a smaller step_size than {step_size}", check_divergence,
                                reference_scale(model, x, z_src))
    for i in tqdm(range(num_steps), disable=not progress, desc="flowchef edit"):
        s_i, s_next = sigmas[i], sigmas[i + 1]
        v_src = model.velocity(x, s_i, cond_src)
        v_edit = model.velocity(x, s_i, cond_edit)
        v = v_edit + edit_guidance * M * (v_edit - v_src)  # prompt contrast inside the edit mask only
        loss = None
        if i in guided:
            pull.region = None if i < source_steps else 1 - M  # whole source first, then the kept region
            step_losses = []
            opt = InnerOptimizer(optimizer, x, step_size, momentum)
            for _ in range(inner_steps):
                x0_hat = x0_from_velocity(x, v, s_i)
                x0_pull = x0_from_velocity(x, v_src, s_i) if quirks == "instaflow" else x0_hat
                loss, grad = objective_gradient(pull, model, x0_pull)
                if objective is not None:
                    extra_loss, extra_grad = objective_gradient(objective, model, x0_hat)
                    loss, grad = loss + extra_loss, grad + extra_grad
                x = opt.step(grad)
                step_losses.append(loss)
            losses.append(step_losses)
        if callback is not None:
            callback({"step": i, "sigma": s_i, "x": x, "x0_hat": x0_from_velocity(x, v, s_i), "loss": loss})
        x = euler_step(x, v, s_i, s_next)
        x = step_end(on_step_end, i, s_i, s_next, {"x": x})
        monitor.update(x, i)
    monitor.finish()

    image = model.decode(x) if decode else None
    info = {"loss": loss_history(losses, inner_steps, batch), "guided_steps": list(guided),
            "source_latent": z_src[:1] if source_image.shape[0] == 1 else z_src, "edit_mask": M}
    return MethodResult(x=x, image=image, nfe=model.nfe, sigmas=sigmas, info=info)
