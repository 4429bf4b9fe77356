"""The plain (unguided) Euler sampler over a flow model's native sigma schedule.

    x_{s_0} ~ N(0, I)                       s_0 = 1 (or the schedule's first value)
    v_i      = v_theta(x_{s_i}, s_i, c)
    x0_hat_i = x_{s_i} - s_i v_i
    x_{s_{i+1}} = x_{s_i} + (s_{i+1} - s_i) v_i

With the SD3 / Flux adapters and the same generator this reproduces the diffusers pipelines' latents
(the pipelines' FlowMatchEulerDiscreteScheduler.step is this Euler update). ``stochastic=True`` takes the steps
of the marginal-preserving SDE instead (:mod:`guidance.sde`): the same marginals p_s, fresh noise at every step.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from operators.checks import MAX_BATCH, check_generator, check_int

from .arguments import pipeline_arguments
from .callbacks import DiffusersCallback, Interrupted, checked_state
from .flow import x0_from_velocity
from .loading.images import ImageOutput
from .memory import check_memory
from .noise import initial_noise  # noqa: F401  (re-exported: guidance.sampler.initial_noise)
from .sde import check_noise_scale, sde_step
from .solvers import check_solver, integrate
from .backbones.base import FlowModel, check_num_steps

__all__ = ["SampleResult", "StartState", "check_model", "condition_batch", "initial_noise", "sample", "start_state",
           "start_step", "step_end"]


@dataclass
class SampleResult(ImageOutput):
    """Output of :func:`sample`: the final latent ``x`` (float32), the decoded ``image`` (float32, about
    [-1, 1]; None when ``decode=False``) and the ``sigmas`` that were used; ``images`` as diffusers returns them
    (``output_type``: "pil", "np", "pt", or "latent": ``x``)."""

    x: torch.Tensor
    image: torch.Tensor | None
    sigmas: torch.Tensor
    output_type: str = "pil"


def step_end(on_step_end: Callable | None, step: int, sigma, sigma_next, state: dict[str, Any]) -> torch.Tensor:
    """The end of step ``step`` (from noise level ``sigma`` to ``sigma_next``) in every loop: flowsteer's own
    ``on_step_end(step, sigma_next, state)`` gets ``state["x"]``, the new state, and returns the state, changed or
    not, whose ``"x"`` the loop goes on from; a :class:`~guidance.callbacks.DiffusersCallback` (diffusers'
    ``callback_on_step_end``, made by :func:`guidance.arguments.pipeline_arguments`) runs diffusers' contract.
    Returns that x (the state's own without a callback)."""
    x = state["x"]
    if on_step_end is None:
        return x
    if isinstance(on_step_end, DiffusersCallback):
        return checked_state(on_step_end(step, sigma, sigma_next, state), x)
    return checked_state(on_step_end(step, sigma_next, state), x)


def start_step(num_steps: int, strength: Any) -> int:
    """The first step that a run of ``strength`` (in (0, 1], the fraction of the schedule run) takes, counted as
    diffusers' SD3 and FLUX image-to-image pipelines count it (``get_timesteps``):
    ``int(num_steps - num_steps * strength)``."""
    check_num_steps(num_steps)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1] (the fraction of the schedule to run; 1: all of "
                         f"it), got {strength!r}")
    return int(max(num_steps - num_steps * strength, 0))  # below num_steps: every strength > 0 runs a step


def condition_batch(cond: Any) -> int:
    """The number of prompts a condition holds (1 for none)."""
    return int(getattr(cond, "batch_size", 1) or 1)


@dataclass
class StartState:
    """Where a sampling loop starts: the state ``x`` (float32), the condition, the schedule and the image size."""

    x: torch.Tensor
    cond: Any
    sigmas: torch.Tensor
    height: int
    width: int


def check_model(model) -> None:
    """Refuse, in one line, what is not a flow model: a model's name or path (load it first), None, or anything
    without a ``velocity``; a view of a model (a counting wrapper) is looked through. Every method and
    :func:`sample` pass here (:func:`start_state`), before the model is used."""
    inner = vars(model).get("model") if hasattr(model, "__dict__") and not isinstance(model, FlowModel) else None
    for candidate in (model, inner):
        if isinstance(candidate, (str, bytes, os.PathLike)) \
                or (candidate is model and not callable(getattr(model, "velocity", None))):
            got = f"the string {candidate!r}" if isinstance(candidate, str) else f"{type(candidate).__name__}"
            name = candidate if isinstance(candidate, str) else "default"
            raise ValueError(f"model must be a FlowModel, got {got}; load one with guidance.load_model({name!r})")


def start_state(
    model: FlowModel,
    cond: Any = None,
    num_steps: int = 28,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    batch_size: int | None = None,
    latents: torch.Tensor | None = None,
) -> StartState:
    """Validate the sampling arguments and draw the starting noise (shared by the sampler and every method)."""
    check_model(model)
    check_num_steps(num_steps)
    if latents is not None:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            raise ValueError(f"latents must be a tensor of shape (B, C, h, w), got "
                             f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
        height = latents.shape[-2] * model.spatial_factor if height is None else height
        width = latents.shape[-1] * model.spatial_factor if width is None else width
    if height is None or width is None:
        if model.default_size is None:
            raise ValueError(f"{type(model).__name__} has no default size: pass height and width")
        height = model.default_size[0] if height is None else height
        width = model.default_size[1] if width is None else width
    model.check_size(height, width)
    shape = tuple(model.latent_shape(height, width))

    if cond is None:
        cond = model.condition()
    n_cond = condition_batch(cond)
    if latents is not None and batch_size is None:
        batch_size = latents.shape[0]
    if batch_size is None and isinstance(generator, (list, tuple)) and len(generator) > 1:
        batch_size = len(generator)  # one sample per generator, as in diffusers
    batch_size = n_cond if batch_size is None else check_int(batch_size, "batch_size", 1, MAX_BATCH)
    if batch_size % n_cond:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of the condition's batch {n_cond}")
    check_generator(generator, batch_size)
    check_memory(model, height, width, batch_size, "sampling run")

    if latents is None:
        x = initial_noise((batch_size, *shape), generator, model.device, model.dtype)
    else:
        if tuple(latents.shape) != (batch_size, *shape):
            raise ValueError(
                f"latents have shape {tuple(latents.shape)} but a {height}x{width} image needs {(batch_size, *shape)}"
            )
        x = latents.to(device=model.device, dtype=torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"latents contain {int((~torch.isfinite(x)).sum())} NaN or infinite value(s); pass "
                             f"finite latents (or none, for fresh noise from the generator)")

    sigmas = model.sigmas(num_steps, height, width).to(device=x.device, dtype=torch.float32)
    return StartState(x=x, cond=cond, sigmas=sigmas, height=height, width=width)


def sample(
    model: FlowModel,
    cond: Any = None,
    num_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    latents: torch.Tensor | None = None,
    decode: bool | None = None,
    on_step_end: Callable | None = None,
    stochastic: bool = False,
    noise_scale: float = 1.0,
    solver: str = "euler",
    strength: float = 1.0,
    *,
    prompt: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = None,
    guidance_scale: float | None = None,
    prompt_embeds: torch.Tensor | None = None,
    num_inference_steps: int | None = None,
    num_images_per_prompt: int | None = None,
    output_type: str = "pil",
    return_dict: bool = True,
    callback_on_step_end: Callable | None = None,
    callback_on_step_end_tensor_inputs: list[str] | None = None,
    **condition_options,
) -> SampleResult | tuple:
    """Generate with the Euler sampler (or, with ``stochastic=True``, the flow's SDE).

    Args:
        model: a :class:`~guidance.backbones.base.FlowModel`.
        cond: conditioning from ``model.condition(...)``; None asks the model for its default (an empty prompt
            for text models, nothing for unconditional ones).
        num_steps: number of Euler steps (network evaluations, doubled inside the model with CFG); default 28.
        height, width: image size in pixels; default from ``latents`` or the model's native size.
        generator: source of the initial noise (a list: one per sample).
        callback: called each step with ``{"step": i, "sigma": s_i, "x": x_{s_i}, "x0_hat": x0_hat_i}``,
            before the update.
        progress: show a tqdm bar.
        batch_size: number of samples; default: the condition's batch (1 for a single prompt). It must be a
            multiple of that batch; each condition is used ``batch_size / cond_batch`` times in a row.
        latents: starting point x_{s_0} instead of fresh noise, shape (B, C, h, w).
        decode: also decode the final latent to an image (default: True, False with ``output_type="latent"``).
        on_step_end: flowsteer's ``(step, sigma, state) -> state`` after each step, which may change
            ``state["x"]`` (see :func:`step_end`).
        stochastic: take Euler-Maruyama steps of the SDE with the ODE's marginals (:func:`guidance.sde.sde_step`:
            x_{s'} = x_s + (s' - s)(v + η eps_hat) + sqrt(2 η s (s - s')) z), the last step onto s = 0
            deterministic; needs an explicit ``generator``, which then also draws the noise of every step.
        noise_scale: η >= 0, the SDE's diffusion g(s)² = 2 η s (0: the ODE); used with ``stochastic=True``.
        solver: the ODE solver of :mod:`guidance.solvers`: "euler" (the pipelines' own step), "rf_solver" (second
            order, two evaluations per step) or "fireflow" (second order, one evaluation per step after the first);
            :func:`guidance.invert` with the same solver inverts what this integrates.
        strength: the fraction of the ``num_steps`` schedule to run, as diffusers' image-to-image pipelines count
            it: the last ``int(num_steps * strength)`` steps, from ``latents`` at that noise level (those of
            :func:`guidance.invert` with the same ``strength``). 1 runs the whole schedule.
        prompt, negative_prompt, guidance_scale, prompt_embeds, condition_options: diffusers' prompt arguments,
            instead of ``cond``: ``cond = model.condition(prompt, negative_prompt=..., guidance_scale=...,
            prompt_embeds=..., **condition_options)`` (any keyword of the model's ``condition``, e.g.
            ``pooled_prompt_embeds``, ``max_sequence_length``); a text-free model refuses them.
        num_inference_steps, num_images_per_prompt, output_type, return_dict: diffusers' names
            (:mod:`guidance.arguments`): the steps, the batch per prompt, the form of ``.images`` ("pil", "np",
            "pt" or "latent") and, with ``return_dict=False``, the tuple ``(images,)`` instead of the result.
        callback_on_step_end, callback_on_step_end_tensor_inputs: diffusers' callback
            ``(pipeline, step, timestep, callback_kwargs) -> dict`` after each step and the tensors it gets
            (:mod:`guidance.callbacks`); setting ``pipeline._interrupt = True`` ends the run there (the result
            holds the state it stopped at, decoded).
    """
    arguments = {"cond": cond, "num_steps": num_steps, "height": height, "width": width, "generator": generator,
                 "callback": callback, "progress": progress, "batch_size": batch_size, "latents": latents,
                 "decode": decode, "on_step_end": on_step_end, "stochastic": stochastic,
                 "noise_scale": noise_scale, "solver": solver, "strength": strength, "prompt": prompt,
                 "negative_prompt": negative_prompt, "guidance_scale": guidance_scale, "prompt_embeds": prompt_embeds,
                 "num_inference_steps": num_inference_steps, "num_images_per_prompt": num_images_per_prompt,
                 "output_type": output_type, "return_dict": return_dict,
                 "callback_on_step_end": callback_on_step_end,
                 "callback_on_step_end_tensor_inputs": callback_on_step_end_tensor_inputs, **condition_options}
    check_model(model)
    call, finish = pipeline_arguments(model, {k: v for k, v in arguments.items() if v is not None},
                                      _SAMPLE_ARGUMENTS, "sample")

    def interrupted(stop: Interrupted) -> SampleResult:
        with torch.no_grad():
            image = model.decode(stop.x) if call.get("decode", True) else None
        return SampleResult(x=stop.x, image=image, sigmas=stop.sigmas)

    return finish(lambda: _sample(model, **call), interrupted)


@torch.no_grad()
def _sample(model: FlowModel, cond: Any = None, num_steps: int = 28, height: int | None = None,
            width: int | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
            callback: Callable[[dict], None] | None = None, progress: bool = True, batch_size: int | None = None,
            latents: torch.Tensor | None = None, decode: bool = True, on_step_end: Callable | None = None,
            stochastic: bool = False, noise_scale: float = 1.0, solver: str = "euler",
            strength: float = 1.0) -> SampleResult:
    """:func:`sample` with flowsteer's own arguments only."""
    if not isinstance(stochastic, bool):
        raise ValueError(f"stochastic must be True or False, got {stochastic!r}")
    check_noise_scale(noise_scale)
    check_solver(solver)
    if stochastic and solver != "euler":
        raise ValueError(f"stochastic sampling takes Euler-Maruyama steps; solver={solver!r} integrates the ODE: "
                         f"drop stochastic=True or use solver='euler'")
    start = start_step(num_steps, strength)
    if start and latents is None:
        raise ValueError(f"strength={strength} starts {start} steps into the schedule, from a partly noised latent: "
                         f"pass latents (e.g. guidance.invert(model, image, strength={strength}).noise)")
    if stochastic and generator is None:
        raise ValueError("stochastic sampling draws fresh noise at every step: pass an explicit generator, e.g. "
                         "generator=torch.Generator().manual_seed(0)")
    state = start_state(model, cond, num_steps, height, width, generator, batch_size, latents)
    x, cond, sigmas = state.x, state.cond, state.sigmas
    if stochastic:
        for i in tqdm(range(start, num_steps), disable=not progress, desc="sampling"):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            v = model.velocity(x, sigma, cond)
            if callback is not None:
                callback({"step": i, "sigma": sigma, "x": x, "x0_hat": x0_from_velocity(x, v, sigma)})
            x = sde_step(x, v, sigma, sigma_next, noise_scale, generator)
            x = step_end(on_step_end, i, sigma, sigma_next, {"x": x})
    else:
        def offset(function):  # the callbacks count steps in the whole schedule
            return None if function is None else lambda state: function({**state, "step": state["step"] + start})

        x = integrate(lambda x, s: model.velocity(x, s, cond), x, sigmas[start:], solver, progress=progress,
                      callback=offset(callback),
                      step_end=lambda i, s, s_next, x: step_end(on_step_end, i + start, s, s_next, {"x": x}))
    image = model.decode(x) if decode else None
    return SampleResult(x=x, image=image, sigmas=sigmas)


_SAMPLE_ARGUMENTS = inspect.signature(_sample).parameters
FlowModel.call_function = staticmethod(sample)  # model(...) is sample(model, ...), as a pipeline's call
