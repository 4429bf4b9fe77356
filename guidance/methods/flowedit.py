"""FlowEdit: inversion-free text-based editing with a pre-trained flow model (Kulikov, Kleiner,
Huberman-Spiegelglas and Michaeli, "FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained Flow Models",
ICCV 2025).

No inversion: an ODE runs directly from the source latent X_src to the edited latent. At each level s it moves
along the difference between the edit prompt's velocity at a noisy target point and the source prompt's velocity
at the matching noisy source point (both share the noise), averaged over n_avg noise draws; the last n_min steps
may finish as plain sampling under the edit prompt (SDEdit-style)::

    X_src = E(source image)                              the latent the flow samples in
    Z_FE  = X_src
    for i = N − n_max .. N − n_min − 1:                   the first N − n_max steps are skipped
        ΔV = 0
        repeat n_avg times:
            ε     ~ N(0, I)
            Z_src = (1 − s_i) X_src + s_i ε
            Z_tar = Z_FE + Z_src − X_src
            ΔV   += (v(Z_tar, s_i, c_edit) − v(Z_src, s_i, c_src)) / n_avg
        Z_FE  = Z_FE + (s_{i+1} − s_i) M ⊙ ΔV               M = 1 without a mask
    if n_min > 0:                                        the last n_min steps
        ε     ~ N(0, I)                                  at i = N − n_min
        X_tar = Z_FE + (1 − s_i) X_src + s_i ε − X_src
        for i = N − n_min .. N − 1:
            X_tar = X_tar + (s_{i+1} − s_i) v(X_tar, s_i, c_edit)
            with a mask: X_tar = M ⊙ X_tar + (1 − M) ⊙ ((1 − s_{i+1}) X_src + s_{i+1} ε)
    return Z_FE (n_min = 0) or X_tar

v applies the model's own guidance from each condition (classifier-free guidance with the source and edit scales
for SD3, FLUX.1-dev's embedded guidance values). With identical prompts and scales ΔV vanishes and the result is
X_src itself. The masked variant (asked for in the official repository's issues; not in the paper) multiplies ΔV
by the latent edit mask M (the fraction of edited pixels of each latent cell): Z_FE keeps X_src exactly where
M = 0, and in the n_min phase the state outside the mask is reset after every step to the source noised with the
same ε, so that the output equals X_src there too.

Official code: fallenshock/FlowEdit at commit 457f40239845d41391ef04d294bb0f1c02525fcf, ``FlowEdit_utils.py``
(``FlowEditSD3``, ``FlowEditFLUX``), run by ``run_script.py`` with ``SD3_exp.yaml`` / ``FLUX_exp.yaml`` (the
published settings, :data:`PRESETS`). Its time t_i is our s_i (``t / 1000`` of the SD3 scheduler's timesteps,
``scheduler.sigmas`` for FLUX), so no conversion is needed. Correspondence of the names:

    official (FlowEdit_utils.py / *_exp.yaml)    flowsteer
    T_steps                                      num_steps
    n_max, n_min, n_avg                          n_max, n_min, n_avg
    src_guidance_scale, tar_guidance_scale       source_guidance_scale, guidance_scale
    src_prompt, tar_prompt                       source_prompt, edit_prompt
    negative_prompt ("" in run_script.py)        the model's default negative prompt (""), via model.condition
    x_src (VAE mode, shifted and scaled)         X_src = model.encode(source_image) (the posterior mean = mode)
    zt_edit, zt_src, zt_tar, V_delta_avg         Z_FE, Z_src, Z_tar, ΔV
    xt_src, xt_tar (the n_min phase)             the noised source, X_tar
    fwd_noise (torch.randn_like, global RNG)     ε from ``generator`` (initial_noise)

Defaults by family (None): n_max is the published fraction of the steps, rounded half up: 33/50 for models with
classifier-free guidance (SD3_exp.yaml) and 24/28 for guidance-distilled ones (FLUX_exp.yaml,
``model.has_guidance_embedding``); the guidance scales are 3.5 / 13.5 (SD3, CFG) and 1.5 / 5.5 (FLUX, embedded).

Quirks of the official code, and what flowsteer does:

* ``FlowEditSD3``'s n_min > 0 branch casts its result to ``noise_pred_tar.dtype``, a variable that does not exist
  there, and would crash; with CFG it also feeds ``xt_tar`` for the (unused) source half of its batch of four.
  flowsteer runs the n_min phase as the paper and ``FlowEditFLUX`` intend: plain Euler steps under the edit prompt.
* ``FlowEditSD3`` without CFG passes a tuple ``(zt_src, zt_tar)`` to the transformer and leaves the source
  velocity undefined: it needs both scales above 1. flowsteer takes any scale (1 or less: no CFG for that prompt).
* ``FlowEditSD3`` evaluates source and edit velocities in one batch of four ([uncond, cond] of each),
  ``FlowEditFLUX`` in two calls; flowsteer makes two calls (numerically the same).
* the noise comes from torch's global RNG (``torch.randn_like``); flowsteer draws it from ``generator``.
  ``FlowEditFLUX`` draws it in the packed token shape (B, hw/4, 4C), flowsteer in the latent shape (B, C, h, w):
  the same distribution, arranged differently for one seed.
* the official state is rounded to the pipeline's float16 after every step; flowsteer keeps it in float32.
* ``run_script.py`` encodes with ``latent_dist.mode()`` (the posterior mean, as ``model.encode`` without a
  generator) and crops the image to a multiple of 16 pixels; flowsteer refuses a size the model does not take
  (``height`` and ``width`` are the source image's) instead of cropping.
* ``FlowEditFLUX`` unpacks its output at ``x_src.shape * vae_scale_factor // 2`` pixels, right for the diffusers
  the README pins (0.30, ``vae_scale_factor`` 16) and half the size on later versions (8).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from operators.checks import MAX_BATCH, MAX_STEPS, check_work

from ..flow import euler_step, interpolate, x0_from_velocity
from ..noise import initial_noise
from ..sampler import check_model, start_state, step_end
from .common import (CountingModel, DivergenceMonitor, MethodResult, check_count, check_flag, check_nonnegative,
                     reference_scale)
from .editing import (as_pixel_mask, check_source_image, is_text, latent_edit_mask, refuse_scale_for_condition,
                      same_batch, text_condition)

__all__ = ["PRESETS", "default_guidance_scales", "default_n_max", "flowedit"]

#: The published share of the steps FlowEdit runs (n_max / T_steps): SD3_exp.yaml (50 steps, n_max 33) for models
#: with classifier-free guidance, FLUX_exp.yaml (28 steps, n_max 24) for guidance-distilled ones.
N_MAX_FRACTION = {"cfg": Fraction(33, 50), "embedded": Fraction(24, 28)}
#: The published (source, edit) guidance scales: SD3_exp.yaml (CFG) and FLUX_exp.yaml (embedded guidance).
GUIDANCE_SCALES = {"cfg": (3.5, 13.5), "embedded": (1.5, 5.5)}


def _family(model) -> str:
    return "embedded" if getattr(model, "has_guidance_embedding", False) else "cfg"


def default_n_max(model, num_steps: int) -> int:
    """The published share of ``num_steps`` for the model's family, rounded half up: 33/50 with classifier-free
    guidance, 24/28 for guidance-distilled models (at least 1)."""
    return max(1, int(N_MAX_FRACTION[_family(model)] * num_steps + Fraction(1, 2)))


def default_guidance_scales(model) -> tuple[float, float]:
    """The published (source, edit) guidance scales of the model's family: (3.5, 13.5) with classifier-free
    guidance (SD3), (1.5, 5.5) for guidance-distilled models (FLUX.1-dev's embedded guidance)."""
    return GUIDANCE_SCALES[_family(model)]


def _condition(model, prompt, guidance_scale: float | None, default: float, role: str, scale_name: str):
    """The condition of one prompt: text with ``guidance_scale`` (None: the family's published ``default``), or a
    condition from ``model.condition(...)``, which carries its own guidance and refuses an explicit scale."""
    if guidance_scale is not None:
        guidance_scale = check_nonnegative(guidance_scale, scale_name)
        refuse_scale_for_condition("flowedit", prompt, guidance_scale, scale_name, role)
    scale = default if guidance_scale is None else guidance_scale
    return text_condition(model, "flowedit", prompt, scale, role), (scale if is_text(prompt) else None)


@torch.no_grad()
def flowedit(
    model,
    objective: Any = None,
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
    source_image: torch.Tensor | None = None,
    source_prompt: str | list[str] | None = None,
    edit_prompt: str | list[str] | None = None,
    mask: torch.Tensor | None = None,
    n_max: int | None = None,
    n_min: int = 0,
    n_avg: int = 1,
    source_guidance_scale: float | None = None,
    guidance_scale: float | None = None,
    check_divergence: bool = True,
) -> MethodResult:
    """Edit ``source_image`` from ``source_prompt`` toward ``edit_prompt`` with FlowEdit (ICCV 2025), without
    inversion (see the module docstring for the algorithm and the official code).

    Each FlowEdit step costs 2 · n_avg network evaluations (each doubled inside the model with classifier-free
    guidance), each of the last n_min steps one.

    Args:
        model: a text-conditioned latent flow model (any pipeline family of guidance.backbones.registry).
        objective: not used (FlowEdit edits with prompts only); must be None.
        num_steps: N, the length of the model's schedule (``model.sigmas``); FlowEdit runs its last n_max steps.
        cond: not used: the conditions come from ``source_prompt`` and ``edit_prompt``; must be None.
        height, width: the source image's size (default); other values are refused.
        generator: draws every noise ε (a list: one per image). None: torch's global generator.
        callback: called each step before the update with ``{"step", "sigma", "x", "x0_hat"}``: in the FlowEdit
            steps ``x`` and ``x0_hat`` are Z_FE (a clean latent itself) and ``"delta_v"`` holds ΔV (masked);
            in the last n_min steps ``x`` is X_tar and ``x0_hat`` = X_tar − s v.
        progress, decode, on_step_end: the common method arguments (see ``guidance.methods``).
        batch_size: images edited; default: the largest batch of source_image, mask, the prompts and a list of
            generators (a batch-1 source is edited with a different noise stream per image).
        latents: refused: FlowEdit starts from the encoded source_image, not from noise.
        source_image: the image to edit, (1 or B, C, H, W) in [-1, 1], or a PIL image or NumPy array.
        source_prompt, edit_prompt: text describing the source and the wanted result (strings or lists of n),
            or conditions from ``model.condition(...)``, used as they are.
        mask: optional region to edit, (H, W) or (1 or B, 1, H, W) in [0, 1] (1 = edit, 0 = keep), the image's
            size; averaged over each latent cell (M). The result equals the source latent where M = 0.
        n_max: steps FlowEdit runs, 1 <= n_max <= num_steps (it starts at s_{N − n_max}); None: the published
            share of the steps for the family (33/50 with CFG, 24/28 guidance-distilled), rounded half up.
        n_min: the last steps taken as plain sampling under the edit prompt, 0 <= n_min <= n_max (0, the
            published value: none).
        n_avg: noise draws averaged per FlowEdit step, >= 1 (1, the published value).
        source_guidance_scale, guidance_scale: the model's guidance for each prompt given as text
            (classifier-free guidance weight, 1 or less: none; FLUX.1-dev's embedded guidance value); None: the
            published values of the family, 3.5 / 13.5 with CFG (SD3), 1.5 / 5.5 embedded (FLUX). Refused for a
            prompt given as a condition (set its guidance in ``model.condition``).
        check_divergence: stop with a :class:`DivergenceError` when the state becomes NaN/inf or a sample's RMS
            exceeds 100 times its reference scale (the larger of 1 and the RMS of the source latent); read once,
            after the loop.

    Returns:
        :class:`MethodResult`; ``x`` is Z_FE (n_min = 0) or X_tar, ``sigmas`` the whole schedule; ``info`` holds
        ``source_latent`` (X_src, the source image's batch), ``edit_mask`` (M, or None), ``steps`` (the indices
        of the steps run), ``n_max``, ``n_min``, ``source_guidance_scale`` and ``guidance_scale`` (None for
        a prompt given as a condition).
    """
    if objective is not None:
        raise ValueError(f"flowedit edits with prompts only and takes no objective, got {type(objective).__name__}; "
                         f"leave objective=None (restoration solvers take objectives)")
    if cond is not None:
        raise ValueError("flowedit takes its conditions from source_prompt and edit_prompt; leave cond=None")
    if latents is not None:
        raise ValueError("flowedit starts from the encoded source_image, not from noise: latents has no role; pass "
                         "source_image (and a generator for the noise it draws)")
    check_model(model)
    source_image = check_source_image(source_image, "flowedit", height, width)
    image_h, image_w = int(source_image.shape[-2]), int(source_image.shape[-1])
    pixel_mask = None if mask is None else as_pixel_mask(mask, image_h, image_w)
    num_steps = check_count(num_steps, "num_steps", 1, MAX_STEPS)
    n_max = default_n_max(model, num_steps) if n_max is None else check_count(
        n_max, "n_max", 1, num_steps, fix=f"n_max counts steps of the {num_steps}-step schedule (n_max=0 would "
                                          f"return the source)")
    n_min = check_count(n_min, "n_min", 0, n_max, fix=f"n_min counts the last of the n_max={n_max} steps")
    n_avg = check_count(n_avg, "n_avg", 1)
    check_work({"num_steps": num_steps, "n_avg": n_avg}, "flowedit")
    check_flag(check_divergence, "check_divergence")

    model = CountingModel(model)
    src_default, edit_default = default_guidance_scales(model)
    c_src, src_scale = _condition(model, source_prompt, source_guidance_scale, src_default, "source_prompt",
                                  "source_guidance_scale")
    c_edit, edit_scale = _condition(model, edit_prompt, guidance_scale, edit_default, "edit_prompt",
                                    "guidance_scale")
    n_cond = same_batch("flowedit", source_prompt=c_src, edit_prompt=c_edit)
    if batch_size is not None:
        check_count(batch_size, "batch_size", 1, MAX_BATCH)
    else:
        n_gen = len(generator) if isinstance(generator, (list, tuple)) else 1  # one image per generator
        batch_size = max(source_image.shape[0], 1 if pixel_mask is None else pixel_mask.shape[0], n_cond, n_gen)
    for name, t in (("source_image", source_image), ("mask", pixel_mask)):
        if t is not None and t.shape[0] not in (1, batch_size):
            raise ValueError(f"{name} has batch {t.shape[0]} but {batch_size} images are edited; give 1 or "
                             f"{batch_size}")

    X_src = model.encode(source_image.to(model.device))
    # the encoded source is the starting state: start_state checks the batch, the generator and the memory
    state = start_state(model, c_edit, num_steps, image_h, image_w, generator, batch_size,
                        X_src.expand(batch_size, -1, -1, -1))
    sigmas = state.sigmas
    X_src = state.x.contiguous()
    M = None if pixel_mask is None else latent_edit_mask(pixel_mask.to(X_src.device), tuple(X_src.shape[-2:]))

    Z_FE = X_src.clone()
    X_tar = eps = None
    start, sdedit = num_steps - n_max, num_steps - n_min
    monitor = DivergenceMonitor("flowedit", "lower guidance_scale or n_max", check_divergence,
                                reference_scale(model, X_src))
    for i in tqdm(range(start, num_steps), disable=not progress, desc="flowedit"):
        s_i, s_next = sigmas[i], sigmas[i + 1]
        if i < sdedit:
            delta_v = torch.zeros_like(X_src)
            for _ in range(n_avg):
                eps = initial_noise(tuple(X_src.shape), generator, X_src.device)
                Z_src = interpolate(X_src, eps, s_i)
                # Z_FE + Z_src − X_src, summed so that Z_tar is Z_src exactly while Z_FE = X_src
                Z_tar = Z_src + (Z_FE - X_src)
                delta_v += (model.velocity(Z_tar, s_i, c_edit) - model.velocity(Z_src, s_i, c_src)) / n_avg
            if M is not None:
                delta_v = M * delta_v
            if callback is not None:
                callback({"step": i, "sigma": s_i, "x": Z_FE, "x0_hat": Z_FE, "delta_v": delta_v})
            Z_FE = euler_step(Z_FE, delta_v, s_i, s_next)
            Z_FE = step_end(on_step_end, i, s_i, s_next, {"x": Z_FE})
            monitor.update(Z_FE, i)
        else:  # the last n_min steps: plain sampling under the edit prompt
            if i == sdedit:  # from the edited latent, re-noised to s_i
                eps = initial_noise(tuple(X_src.shape), generator, X_src.device)
                X_tar = interpolate(X_src, eps, s_i) + (Z_FE - X_src)
            v = model.velocity(X_tar, s_i, c_edit)
            if callback is not None:
                callback({"step": i, "sigma": s_i, "x": X_tar, "x0_hat": x0_from_velocity(X_tar, v, s_i)})
            X_tar = euler_step(X_tar, v, s_i, s_next)
            if M is not None:  # outside the mask: the source, noised at the new level with the same ε
                X_tar = M * X_tar + (1 - M) * interpolate(X_src, eps, s_next)
            X_tar = step_end(on_step_end, i, s_i, s_next, {"x": X_tar})
            monitor.update(X_tar, i)
    monitor.finish()

    x = Z_FE if n_min == 0 else X_tar
    image = model.decode(x) if decode else None
    info = {"source_latent": X_src[:1] if source_image.shape[0] == 1 else X_src, "edit_mask": M,
            "steps": list(range(start, num_steps)), "n_max": n_max, "n_min": n_min,
            "source_guidance_scale": src_scale, "guidance_scale": edit_scale}
    return MethodResult(x=x, image=image, nfe=model.nfe, sigmas=sigmas, info=info)


_PAPER = ("Kulikov et al., FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained Flow Models, ICCV 2025; "
          "fallenshock/FlowEdit commit 457f40239845d41391ef04d294bb0f1c02525fcf")
_NOTE = ("prompts: the repository's edits.yaml (example_images/gas_station.png and lighthouse.png; the paper's "
         "evaluation set is Data/flowedit.yaml over Data/Images, 1024x1024); negative prompt '' (run_script.py); "
         "the official run draws its noise from torch's global RNG seeded with the seed, and rounds its state to "
         "float16 after every step (flowsteer: the generator, float32)")

PRESETS: dict[str, dict[str, Any]] = {
    "flowedit_sd3": {
        "method": "flowedit",
        "num_steps": 50,
        "options": {"n_max": 33, "n_min": 0, "n_avg": 1, "source_guidance_scale": 3.5, "guidance_scale": 13.5},
        "objective": None,
        "operators": None,
        "model": "stabilityai/stable-diffusion-3-medium-diffusers",  # run_script.py loads it in float16
        "dtype": "float16",
        "resolution": 1024,
        "negative_prompt": "",
        "seed": 42,
        "source": f"{_PAPER}: SD3_exp.yaml, FlowEdit_utils.py (FlowEditSD3), run_script.py. SD3 medium 1024, "
                  f"T_steps 50, n_max 33, n_min 0, n_avg 1, CFG 3.5 (source) / 13.5 (target), seed 42",
        "note": _NOTE,
    },
    "flowedit_flux": {
        "method": "flowedit",
        "num_steps": 28,
        "options": {"n_max": 24, "n_min": 0, "n_avg": 1, "source_guidance_scale": 1.5, "guidance_scale": 5.5},
        "objective": None,
        "operators": None,
        "model": "black-forest-labs/FLUX.1-dev",  # run_script.py loads it in float16
        "dtype": "float16",
        "resolution": 1024,
        "negative_prompt": "",
        "seed": 10,
        "source": f"{_PAPER}: FLUX_exp.yaml, FlowEdit_utils.py (FlowEditFLUX), run_script.py. FLUX.1-dev 1024, "
                  f"T_steps 28, n_max 24, n_min 0, n_avg 1, embedded guidance 1.5 (source) / 5.5 (target), seed 10",
        "note": f"{_NOTE}; FlowEditFLUX ignores the negative prompt",
    },
}
