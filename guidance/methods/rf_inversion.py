"""Real-image editing with RF-Inversion: controlled forward and reverse rectified-flow ODEs (or the reverse SDE).

Rout et al., "Semantic Image Inversion and Editing using Rectified Stochastic Differential Equations", ICLR 2025.
The source latent y0 is carried up to noise by the flow's ODE pulled toward a fixed noise y1 (Algorithm 1, the
controlled forward ODE, Eq. 8), then carried back down by the edit prompt's ODE pulled, during the first steps,
toward the straight path through y0 (Algorithm 2, the controlled reverse ODE; Eq. 17 for its SDE). In this
toolkit's time (s = 1 noise, s = 0 data, v = eps - x0, dx/ds = v), with s_0 = 1 > s_1 > ... > s_N = 0 the model's
schedule and n the first step that a run of ``strength`` takes::

    y0 = E(source),  y1 ~ N(0, I),  Y = y0
    for k = N-1, ..., n:                                  controlled forward ODE, upward from s_N = 0 to s_n
        s, s' = s_{k+1}, s_k
        u      = v(Y, s, c_src)                           source prompt ("" in the paper), guidance off
        u_cond = (y1 - Y) / (1 - s)                       the straight path from Y to y1
        u_hat  = u + gamma (u_cond - u)
        Y      = Y + (s' - s) u_hat
    X = Y                                                 (the inverted noise)
    for i = n, ..., N-1  (j = i - n, the j-th of the n_run = N - n steps run):
        v      = v(X, s_i, c_edit)                        edit prompt, the model's own guidance
        v_cond = (X - y0) / s_i                           the straight path from X to y0
        eta_j  = eta (1 - j / n_run)^p  if start_step <= j < stop_step  else 0      (p: decay_eta only)
        v_hat  = v + eta_j (v_cond - v)
        X      = X + (s_{i+1} - s_i) v_hat                ODE
    return D(X)

``stochastic=True`` takes the repository's reverse SDE (Eq. 17) instead of the ODE step, from the second step on:

        X = X + (s_{i+1} - s_i) (2 v_hat + X / (1 - s_i)) + sqrt(2 s_i / (1 - s_i) (s_i - s_{i+1})) z,   z ~ N(0, I)

the marginal-preserving SDE of :mod:`guidance.sde` with diffusion g² = 2 s / (1 - s) (its noise_scale
η = 1 / (1 - s)) and the score taken from v_hat; the first step (singular at s = 1) is the ODE step. flowsteer
takes the last step, onto s = 0, as the ODE step as well (as :func:`guidance.sde.sde_step` does): there no later
step could remove the injected noise. With eta = 1 on every step the ODE lands exactly on y0, since
X - y0 shrinks by s_{i+1} / s_i per step, and so does flowsteer's SDE, whose last step X - s (X - y0) / s is the
ODE's; with gamma = eta = 0 both halves are plain Euler (inversion, then sampling from the inverted noise).

Official code. Reverse: LituRout/RF-Inversion commit 7692b96a8696f3f877fe143e41559be6620a6cd4,
``pipeline_rf_inversion_sde.py``, ``RFInversionFluxPipelineSDE.__call__`` (ODE and SDE, ``enable_sde``,
``decay_eta``), which extends the diffusers community pipeline below; the published example is ``scripts/test.py``
(invert 28 steps, gamma 0.5; edit 28 steps, eta 0.9, start_timestep 0, stop_timestep 7/28, guidance 3.5, the
pipeline default). Forward: huggingface/diffusers commit 0036ae2a3c13f86747eab1fb91e452110f57e121,
``examples/community/pipeline_flux_rf_inversion.py``, ``RFInversionFluxPipeline.invert`` (with ``get_timesteps``;
the community ``__call__`` is the ODE branch above without the decay). Their time t runs the other way
(t = 1 - s in the reverse loop, ``t_i = 1 - t / 1000``) and their velocity is v_t = -v; their
v_t_cond = (y_0 - X) / (1 - t_i) is -v_cond, their step X + v_hat_t (sigmas[i] - sigmas[i+1]) is ours, and their
SDE drift 2 v_hat_t - X / (1 - sigmas[i]) times (sigmas[i] - sigmas[i+1]) is ours above. The forward loop passes
a noise level straight to the FLUX transformer, whose output is our v (no sign change there).

Constants: start_step = int(start_timestep · N) and stop_step = int(stop_timestep · N) (the pipeline's conversion,
N the full step count; both count the steps that run, from the first one at the strength's level); the default
stop_step is int(N · 7/28), the example's 7 of 28. ``strength`` cuts the schedule as ``get_timesteps`` does: the
first n = int(max(N - N · strength, 0)) steps are skipped (diffusers' SD3 / FLUX image-to-image count), and the
decay runs over the n_run steps that remain (the repository's ``num_inference_steps`` after ``get_timesteps``).
The forward guidance is ``source_guidance_scale`` (the community default 0.0 for FLUX's embedded guidance).

Official-code quirks (reproduced only with ``official_quirks=True``, for parity runs):

* the forward loop evaluates the network at t_i = i / (n_run + 1) for its i-th step (``N = len(sigmas)``, which
  counts the final 0) instead of at the state's level, and its controller divides by 1 - i / (n_run + 1);
* its step sizes are the descending schedule's differences sigmas[n + i] - sigmas[n + i + 1] taken in forward
  order, so after i steps the state has travelled 1 - s_i (strength 1) while the shifted schedule puts it
  elsewhere; flowsteer walks the schedule upward, the network at each step's lower end;
* the repository's SDE also injects noise on the last step, onto s = 0 (sqrt(2 s / (1 - s) · s) z, about
  0.16 in latent units at 28 steps and 1024² FLUX), where flowsteer takes the deterministic step.

Not reproduced: the community ``encode_image`` takes ``latent_dist.sample()`` (an unseeded posterior sample)
where flowsteer uses ``model.encode`` (the posterior mean); the official noises are drawn with
``torch.randn_like`` from the global generator on packed FLUX tokens (flowsteer: ``initial_noise`` from
``generator``, y1 first, then one draw per stochastic step; the SDE also draws, and multiplies by 0, a noise on
its first step); the reverse loop reads s_i back from the float32 timesteps (1 - t / 1000, a rounding of 1e-7);
``invert`` takes one image (flowsteer: batches, one generator per image with a list).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from operators.checks import MAX_STEPS, check_number

from ..flow import x0_from_velocity
from ..noise import initial_noise
from ..objectives import Objective
from ..sampler import condition_batch, start_state, step_end
from ..sampler import start_step as strength_start  # (start_step is also the name of an option below)
from .common import CountingModel, DivergenceMonitor, MethodResult, check_count, check_flag, reference_scale
from .editing import check_source_image, is_text, refuse_scale_for_condition, text_condition

__all__ = ["PRESETS", "QUIRKS", "rf_inversion"]


def _conditions(model, source_prompt, edit_prompt, source_guidance_scale, guidance_scale):
    """(c_src, c_edit). Text prompts are encoded here: the source with ``source_guidance_scale`` (None: 0.0 on
    guidance-distilled models, the community default, and classifier-free guidance off elsewhere), the edit prompt
    with ``guidance_scale`` (None: the model's own default guidance, model.condition's). A condition from
    ``model.condition(...)`` passes through with its own guidance."""
    for prompt, scale, name, role in ((source_prompt, source_guidance_scale, "source_guidance_scale", "source_prompt"),
                                      (edit_prompt, guidance_scale, "guidance_scale", "edit_prompt")):
        if scale is not None:
            check_number(scale, name, minimum=0)
            refuse_scale_for_condition("rf_inversion", prompt, scale, name, role)
    if source_guidance_scale is None and getattr(model, "has_guidance_embedding", False):
        source_guidance_scale = 0.0
    cond_src = text_condition(model, "rf_inversion", "" if source_prompt is None else source_prompt,
                              source_guidance_scale, "source_prompt")
    if guidance_scale is None and is_text(edit_prompt):
        cond_edit = model.condition(edit_prompt)
    else:
        cond_edit = text_condition(model, "rf_inversion", edit_prompt, guidance_scale, "edit_prompt")
    return cond_src, cond_edit


@torch.no_grad()
def rf_inversion(
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
    source_image: torch.Tensor | None = None,
    source_prompt: str | list[str] | None = None,
    edit_prompt: str | list[str] | None = None,
    mask: torch.Tensor | None = None,
    gamma: float = 0.5,
    eta: float = 0.9,
    start_step: int = 0,
    stop_step: int | None = None,
    decay_eta: bool = False,
    eta_decay_power: float = 1.0,
    strength: float = 1.0,
    source_guidance_scale: float | None = None,
    guidance_scale: float | None = None,
    stochastic: bool = False,
    official_quirks: bool = False,
    check_divergence: bool = True,
) -> MethodResult:
    """Edit ``source_image`` toward ``edit_prompt`` with RF-Inversion (Rout et al., ICLR 2025): the controlled
    forward ODE from the source latent to noise, then the controlled reverse ODE (or SDE) with the edit prompt
    (module docstring). 2 n_run network evaluations (n_run = num_steps at strength 1), CFG counted once.

    Args:
        model: a text-conditioned latent flow model (any pipeline family: SD3, FLUX.1, ...).
        objective: must be None (the edit comes from the prompts).
        num_steps: N, the steps of the model's schedule (each half runs the last n_run of them).
        cond: must be None (the conditions come from ``source_prompt`` and ``edit_prompt``).
        height, width: must be the source image's size when given.
        generator: draws y1, the forward controller's target noise (one per image with a list), then the noise
            of every stochastic step.
        callback: called each reverse step before its move with ``{"step", "sigma", "x", "x0_hat"}``
            (x0_hat = x - s v_hat, the controlled velocity's clean estimate).
        progress, decode: as in :func:`guidance.sample`.
        batch_size: images edited; default the largest of the source image's batch, the prompts' and the
            generators'; each of them must be 1 or that many (a condition may also divide it).
        latents: refused: the reverse process starts from the inverted source (to sample from given noise use
            :func:`guidance.sample`).
        on_step_end: ``(step, sigma, state) -> state`` after each reverse step
            (:func:`guidance.sampler.step_end`).
        source_image: the image to edit, (1 or B, C, H, W) in [-1, 1], or a PIL image or NumPy array.
        source_prompt: text describing the source (default "", as in the paper), or a condition.
        edit_prompt: text describing the wanted result, or a condition from ``model.condition(...)``.
        mask: refused: RF-Inversion edits the whole image (for a masked edit use ``flowedit(mask=...)``).
        gamma: the forward controller's strength in [0, 1] (0: plain Euler inversion; 1: straight to y1).
        eta: the reverse controller's strength in [0, 1] inside the window (higher: more faithful to the
            source, less editable; 1 on every step returns y0).
        start_step, stop_step: the controlled reverse steps j, start_step <= j < stop_step, counted among the
            steps that run; 0 <= start_step <= stop_step <= num_steps. stop_step None: int(num_steps · 7 / 28)
            (7 of 28, the published example).
        decay_eta: multiply eta_j by (1 - j / n_run)^eta_decay_power (the repository's ``decay_eta``).
        eta_decay_power: p > 0 of the decay; only with ``decay_eta=True``.
        strength: in (0, 1], the fraction of the schedule inverted and regenerated (diffusers' image-to-image
            count: the first int(max(N - N · strength, 0)) steps are skipped).
        source_guidance_scale: the guidance of a text source prompt along the inversion: None is 0.0 on
            guidance-distilled models (FLUX.1-dev's embedded guidance, the community default) and classifier-free
            guidance off elsewhere.
        guidance_scale: the guidance of a text edit prompt: None is the model's own default (3.5 embedded on
            FLUX.1-dev, the RF-Inversion pipeline's default; SD3's pipeline CFG 7): the reverse process is a
            generation from the inverted noise, which CFG families sample poorly without guidance.
        stochastic: take the reverse SDE steps (Eq. 17) after the first; needs an explicit generator.
        official_quirks: reproduce the community ``invert``'s time grid and the repository's noisy last SDE step
            (module docstring); False (default): flowsteer's computation.
        check_divergence: stop with a :class:`~guidance.methods.common.DivergenceError` when a state becomes
            NaN / infinite or exceeds 100× its reference scale (the larger of 1 and the RMS of y1 and y0).

    Returns:
        :class:`MethodResult` (``sigmas``: the schedule that ran, from s_n down to 0); ``info`` holds
        ``source_latent`` (y0), ``inverted`` (the noise Y the reverse process starts from), ``y1`` (the forward
        controller's target noise) and ``eta`` (eta_j of each reverse step).
    """
    if objective is not None:
        raise ValueError(f"rf_inversion edits with prompts and takes no objective; got {type(objective).__name__}, "
                         f"pass objective=None")
    if cond is not None:
        raise ValueError("rf_inversion takes its conditions from source_prompt and edit_prompt; leave cond=None")
    if latents is not None:
        raise ValueError("rf_inversion starts its reverse process from the inverted source image, not from given "
                         "latents; drop latents (guidance.sample(latents=...) samples from given noise)")
    if mask is not None:
        raise ValueError("rf_inversion edits the whole image and takes no mask; for a masked edit use "
                         "flowedit(mask=...)")
    check_number(gamma, "gamma", minimum=0, maximum=1)
    check_number(eta, "eta", minimum=0, maximum=1)
    check_count(num_steps, "num_steps", 1, MAX_STEPS)
    stop_step = int(num_steps * 7 / 28) if stop_step is None else stop_step
    for name, step in (("start_step", start_step), ("stop_step", stop_step)):
        if check_count(step, name, minimum=0, maximum=None) > num_steps:
            raise ValueError(f"{name}={step} lies beyond the {num_steps} steps; use {name} <= num_steps")
    if start_step > stop_step:
        raise ValueError(f"start_step={start_step} is after stop_step={stop_step}: the controlled steps are "
                         f"start_step <= j < stop_step; use start_step <= stop_step")
    check_flag(decay_eta, "decay_eta")
    check_number(eta_decay_power, "eta_decay_power", minimum=0, strict_minimum=True)
    if eta_decay_power != 1 and not decay_eta:
        raise ValueError(f"eta_decay_power={eta_decay_power} has no effect without decay_eta=True; set decay_eta=True "
                         f"or drop eta_decay_power")
    check_number(strength, "strength", minimum=0, maximum=1, strict_minimum=True)
    check_flag(stochastic, "stochastic")
    check_flag(official_quirks, "official_quirks")
    check_flag(check_divergence, "check_divergence")
    if stochastic and generator is None:
        raise ValueError("stochastic=True draws fresh noise at every reverse step: pass an explicit generator, e.g. "
                         "generator=torch.Generator().manual_seed(0)")
    source = check_source_image(source_image, "rf_inversion", height, width)
    image_h, image_w = int(source.shape[-2]), int(source.shape[-1])

    model = CountingModel(model)
    cond_src, cond_edit = _conditions(model, source_prompt, edit_prompt, source_guidance_scale, guidance_scale)
    if batch_size is None:
        many = len(generator) if isinstance(generator, (list, tuple)) else 1
        batch_size = max(source.shape[0], condition_batch(cond_src), condition_batch(cond_edit), many)
    state = start_state(model, cond_edit, num_steps, image_h, image_w, generator, batch_size)
    y1, sigmas = state.x, state.sigmas  # the first draw of the generator: the forward controller's target
    batch = y1.shape[0]
    if source.shape[0] not in (1, batch):
        raise ValueError(f"source_image has batch {source.shape[0]} but {batch} images are edited; give 1 or {batch}")
    if batch % condition_batch(cond_src):
        raise ValueError(f"source_prompt has {condition_batch(cond_src)} entries, which does not divide the {batch} "
                         f"images edited; give 1 or {batch}")

    y0 = model.encode(source.to(device=y1.device)).to(y1)
    y0_batch = y0.expand_as(y1)
    first = strength_start(num_steps, strength)  # as get_timesteps of the community pipeline counts it
    n_run = num_steps - first
    s = sigmas.tolist()  # one host read of the schedule: the loops below take Python floats

    # Algorithm 1: the controlled forward ODE, from y0 at s = 0 up to s_first
    Y = y0_batch.clone()
    forward_monitor = DivergenceMonitor("rf_inversion (inversion)", f"use a smaller gamma than {gamma}",
                                        check_divergence, reference_scale(model, y1, y0))
    for i in tqdm(range(n_run), disable=not progress, desc="rf-inversion invert"):
        if official_quirks:
            level, h = i / (n_run + 1), s[first + i] - s[first + i + 1]
        else:
            level, h = s[num_steps - i], s[num_steps - i - 1] - s[num_steps - i]
        u = model.velocity(Y, level, cond_src)
        u_cond = (y1 - Y) / (1 - level)
        u_hat = u + gamma * (u_cond - u)
        Y = Y + h * u_hat
        forward_monitor.update(Y, i)
    forward_monitor.finish()

    # Algorithm 2: the controlled reverse ODE (Eq. 17: SDE), from the inverted noise down to s = 0
    etas = [(eta * (1 - j / n_run) ** eta_decay_power if decay_eta else eta) if start_step <= j < stop_step else 0.0
            for j in range(n_run)]
    X = Y
    monitor = DivergenceMonitor("rf_inversion", f"use a smaller eta than {eta}" +
                                (" or stochastic=False" if stochastic else ""), check_divergence,
                                reference_scale(model, y1, y0))
    for j in tqdm(range(n_run), disable=not progress, desc="rf-inversion edit"):
        s_i, s_next = s[first + j], s[first + j + 1]
        v = model.velocity(X, s_i, cond_edit)
        v_cond = (X - y0_batch) / s_i
        v_hat = v + etas[j] * (v_cond - v)
        if callback is not None:
            callback({"step": j, "sigma": sigmas[first + j], "x": X, "x0_hat": x0_from_velocity(X, v_hat, s_i)})
        if stochastic and j > 0 and (s_next > 0 or official_quirks):
            z = initial_noise(tuple(X.shape), generator, X.device)
            drift = 2 * v_hat + X / (1 - s_i)
            X = X + (s_next - s_i) * drift + math.sqrt(2 * s_i / (1 - s_i) * (s_i - s_next)) * z
        else:
            X = X + (s_next - s_i) * v_hat
        X = step_end(on_step_end, j, s_i, s_next, {"x": X})
        monitor.update(X, j)
    monitor.finish()

    image = model.decode(X) if decode else None
    info = {"source_latent": y0, "inverted": Y, "y1": y1, "eta": etas}
    return MethodResult(x=X, image=image, nfe=model.nfe, sigmas=sigmas[first:], info=info)


#: The official-code quirks that ``official_quirks=True`` reproduces (module docstring).
QUIRKS = {
    "forward_time_grid": "the community invert evaluates the network at t_i = i / (n + 1) and divides its controller "
                         "by 1 - t_i, while stepping by the descending schedule's differences in forward order "
                         "(rf_inversion(official_quirks=True))",
    "sde_noise_on_last_step": "the repository's SDE injects noise on the last step, onto s = 0 "
                              "(rf_inversion(official_quirks=True, stochastic=True))",
}

_SOURCE = ("Rout et al., Semantic Image Inversion and Editing using Rectified Stochastic Differential Equations, "
           "ICLR 2025; LituRout/RF-Inversion commit 7692b96a8696f3f877fe143e41559be6620a6cd4: scripts/test.py "
           "(test_rf_inversion_sde_sampling) and pipeline_rf_inversion_sde.py (RFInversionFluxPipelineSDE.__call__); "
           "huggingface/diffusers commit 0036ae2a3c13f86747eab1fb91e452110f57e121: "
           "examples/community/pipeline_flux_rf_inversion.py (invert, get_timesteps). ")
_SETTING = ("FLUX.1-dev bfloat16 1024, invert 28 steps gamma 0.5 with the empty source prompt and embedded guidance "
            "0.0; edit 28 steps, eta 0.9 on steps 0 .. 6 (start_timestep 0, stop_timestep 7/28), embedded guidance "
            "3.5, edit prompt 'a tomato' on tennis.jpg, set_seed(999)")
_NOTE = ("the official invert encodes with an unseeded latent_dist.sample() and draws y1 with torch.randn_like on "
         "packed tokens (flowsteer: the posterior mean, and y1 from the generator); parity variant: the community "
         "invert's time grid")

_FLUX = dict(
    method="rf_inversion",
    num_steps=28,
    objective=None,
    operators=None,
    model="black-forest-labs/FLUX.1-dev",
    dtype="bfloat16",
    resolution=1024,
    prompt="a tomato",
    seed=999,
)
_OPTIONS = {"gamma": 0.5, "eta": 0.9, "start_step": 0, "stop_step": 7, "strength": 1.0,
            "source_guidance_scale": 0.0, "guidance_scale": 3.5}

PRESETS: dict[str, dict[str, Any]] = {
    "rf_inversion_flux": {
        **_FLUX,
        "options": {**_OPTIONS, "stochastic": False},
        "quirks": {"forward_time_grid": QUIRKS["forward_time_grid"]},
        "parity": {"options": {"official_quirks": True}},
        "source": _SOURCE + "ODE (enable_sde=False): " + _SETTING,
        "note": _NOTE,
    },
    "rf_inversion_flux_sde": {
        **_FLUX,
        "options": {**_OPTIONS, "stochastic": True},
        "quirks": dict(QUIRKS),
        "parity": {"options": {"official_quirks": True}},
        "source": _SOURCE + "SDE (enable_sde=True, Eq. 17): " + _SETTING,
        "note": _NOTE + " and its noise on the last SDE step",
    },
}
