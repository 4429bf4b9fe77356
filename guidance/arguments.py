"""One argument set for :func:`guidance.sample`, every method of :func:`guidance.get_method` and ``model(...)``:
flowsteer's names with diffusers' pipeline names beside them.

=========================================  ================================================================
diffusers                                  flowsteer
=========================================  ================================================================
``num_inference_steps``                    ``num_steps``
``num_images_per_prompt``                  ``batch_size`` = (prompts of the condition) x this
``prompt``, ``negative_prompt``,           ``cond = model.condition(prompt, negative_prompt=...,
``guidance_scale``, ``prompt_embeds``,     guidance_scale=..., ...)``: every keyword of the model's
and every other keyword of the model's     ``condition`` (``pooled_prompt_embeds``, ``prompt_2``,
``condition``                              ``max_sequence_length``, ``true_cfg_scale``, ...)
``output_type``                            the form of ``result.images``: "pil", "np", "pt", or "latent"
                                           (the final latent ``x``; nothing is decoded unless ``decode=True``)
``return_dict=False``                      the tuple ``(result.images,)`` instead of the result
``callback_on_step_end``,                  diffusers' callback ``(pipeline, step, timestep, callback_kwargs)
``callback_on_step_end_tensor_inputs``     -> dict`` (:mod:`guidance.callbacks`); flowsteer's own per-step
                                           callback is ``on_step_end(step, sigma, state) -> state``
=========================================  ================================================================

A name the function takes itself (a method's own ``guidance_scale``, e.g. FlowEdit's) stays the function's. A
condition is given once: ``cond`` or the prompt arguments, not both. ``model.set_progress_bar_config(disable=True)``
turns the progress bars of every run on that model off.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from operators.checks import MAX_BATCH, check_flag, check_int

from .callbacks import DiffusersCallback, Interrupted, tensor_inputs_of
from .loading.images import check_output_type

__all__ = ["DIFFUSERS_NAMES", "pipeline_arguments"]

#: diffusers' names taken beside flowsteer's, and what each stands for (the prompt arguments: any keyword of the
#: model's ``condition``).
DIFFUSERS_NAMES = {
    "num_inference_steps": "num_steps",
    "num_images_per_prompt": "batch_size (images per prompt of the condition)",
    "prompt": "cond = model.condition(prompt, ...)",
    "negative_prompt": "cond = model.condition(..., negative_prompt=...)",
    "guidance_scale": "cond = model.condition(..., guidance_scale=...)",
    "prompt_embeds": "cond = model.condition(prompt_embeds=..., ...) where the model takes it",
    "output_type": "the form of result.images: 'pil', 'np', 'pt' or 'latent'",
    "return_dict": "False: the tuple (result.images,)",
    "callback_on_step_end": "diffusers' callback(pipeline, step, timestep, callback_kwargs) -> dict after each step",
    "callback_on_step_end_tensor_inputs": "the tensors callback_on_step_end gets (default ['latents'])",
}


def _condition_names(model) -> set[str]:
    """The keywords ``model.condition`` names (a text-free model's catch-all ``**kwargs`` only refuses; a model
    without ``condition`` names none)."""
    condition = getattr(model, "condition", None)
    if not callable(condition):
        return set()
    parameters = inspect.signature(condition).parameters.values()
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def pipeline_arguments(model, arguments: dict[str, Any], takes: Mapping[str, inspect.Parameter],
                       what: str) -> tuple[dict[str, Any], Callable[[Any], Any]]:
    """Translate the arguments a caller gave (``arguments``: name -> value; None, for a name the function does not
    take, means not given) into those of the function ``what`` whose parameters are ``takes``; returns them with
    ``finish(run, interrupted)``, which runs ``run()`` (``interrupted(stop)`` makes the result of a run that a
    diffusers callback stopped), gives the result its ``output_type`` and returns it, or ``(result.images,)``
    with ``return_dict=False``.

    The prompt arguments (see the module doc) become ``cond = model.condition(...)`` here, once per call; a name
    neither the function nor the model's ``condition`` takes is refused in one line that lists both."""
    call = {name: value for name, value in arguments.items() if name in takes}
    given = {name: value for name, value in arguments.items() if name not in takes and value is not None}
    output_type = check_output_type(given.pop("output_type", "pil"), latent=True)
    return_dict = check_flag(given.pop("return_dict", True), "return_dict")
    steps = given.pop("num_inference_steps", None)
    per_prompt = given.pop("num_images_per_prompt", None)
    diffusers_callback = given.pop("callback_on_step_end", None)
    tensor_inputs = given.pop("callback_on_step_end_tensor_inputs", None)
    if tensor_inputs is not None and diffusers_callback is None:
        raise ValueError("callback_on_step_end_tensor_inputs names what callback_on_step_end gets; it does nothing "
                         "without callback_on_step_end")

    condition_names = _condition_names(model)
    unknown = sorted(name for name in given if name not in condition_names and name not in DIFFUSERS_NAMES)
    if unknown:
        own = sorted(name for name in takes if name not in ("model", "objective"))
        text = f", and {type(model).__name__}.condition's {', '.join(sorted(condition_names))}" \
            if getattr(model, "takes_text", False) else ""
        raise ValueError(f"{what} takes no argument {', '.join(map(repr, unknown))}: it takes {', '.join(own)}, "
                         f"diffusers' {', '.join(DIFFUSERS_NAMES)}{text}")
    if steps is not None:
        if call.get("num_steps") is not None:
            raise ValueError(f"num_steps={call['num_steps']!r} and num_inference_steps={steps!r} are the same "
                             f"setting (flowsteer's name and diffusers'); give one of them")
        call["num_steps"] = steps
    if given:  # the prompt arguments: the condition, made here
        if call.get("cond") is not None:
            raise ValueError(f"give the condition once: cond= (from model.condition(...)) or the prompt arguments "
                             f"({', '.join(sorted(given))}), not both")
        if not callable(getattr(model, "condition", None)):
            raise ValueError(f"{type(model).__name__} has no condition(): it takes no {', '.join(sorted(given))}")
        if "num_steps" in condition_names and "num_steps" not in given:  # a schedule-dependent guidance window
            default = takes["num_steps"].default if "num_steps" in takes else None
            given["num_steps"] = call.get("num_steps", default)
        with torch.no_grad():
            call["cond"] = model.condition(**given)
    if per_prompt is not None:
        check_int(per_prompt, "num_images_per_prompt", 1, MAX_BATCH)
        if call.get("batch_size") is not None:
            raise ValueError("batch_size and num_images_per_prompt both set the batch; give one of them")
        call["batch_size"] = int(getattr(call.get("cond"), "batch_size", 1) or 1) * per_prompt
    if output_type == "latent" and "decode" in takes and "decode" not in call:
        call["decode"] = False  # as diffusers: the latent is returned undecoded
    if "progress" in takes and not getattr(model, "progress_bar", True):
        call["progress"] = False  # model.set_progress_bar_config(disable=True)
    if diffusers_callback is not None:
        names = tensor_inputs_of(model, diffusers_callback, tensor_inputs)
        if call.get("cond") is None and set(names) - {"latents"} and callable(getattr(model, "condition", None)):
            with torch.no_grad():
                call["cond"] = model.condition()
        if call.get("cond") is not None:  # the run's own copy: the callback may change its embeddings and scale
            call["cond"] = copy.copy(call["cond"])
        num_steps = call.get("num_steps", takes["num_steps"].default if "num_steps" in takes else None)
        call["on_step_end"] = DiffusersCallback(model, diffusers_callback, names, call.get("cond"), num_steps,
                                                then=call.get("on_step_end"))

    def finish(run: Callable[[], Any], interrupted: Callable[[Interrupted], Any] | None):
        """Run ``run()``; a run a diffusers callback interrupts gives ``interrupted(stop)``, as diffusers decodes
        the latents it stopped at."""
        try:
            result = run()
        except Interrupted as stop:
            result = interrupted(stop)
        result.output_type = output_type
        return result if return_dict else (result.images,)

    return call, finish
