"""Guidance methods, one file each, all with one signature::

    method(model, objective, *, num_steps, cond=None, height=None, width=None, generator=None,
           callback=None, progress=True, batch_size=None, latents=None, decode=True,
           on_step_end=None, **options) -> MethodResult

Registered by name: :func:`list_methods`, :func:`get_method`. Adding a method is one file in this folder (its algorithm
box in the docstring), one line in ``REGISTRY`` and one test file. The function :func:`get_method` returns also takes
diffusers' names (:data:`ALIASES`, the same as :func:`guidance.sample`'s, :mod:`guidance.arguments`):
``num_inference_steps`` for ``num_steps``, ``num_images_per_prompt`` (the batch: images per prompt of the condition),
``prompt`` / ``negative_prompt`` / ``guidance_scale`` / ``prompt_embeds`` and the model's other condition keywords
instead of ``cond``, ``output_type`` ("pil", "np", "pt" or "latent") for the result's ``images``, and
``return_dict=False`` for the tuple ``(images,)``; a list of generators sets the batch.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from importlib import import_module
from typing import Any, Callable

import torch

from operators.checks import MAX_ITERATIONS, check_flag, check_int, check_number

from ..arguments import DIFFUSERS_NAMES
from ..callbacks import DiffusersCallback, Interrupted, counting_velocity
from .common import DivergenceError, MethodResult

REGISTRY: dict[str, str] = {
    "unguided": "guidance.methods.unguided:unguided",
    "pseudo_inverse": "guidance.methods.pseudo_inverse:pseudo_inverse",
    "flowchef": "guidance.methods.flowchef:flowchef",
    "flowchef_edit": "guidance.methods.flowchef_edit:flowchef_edit",
    "flair": "guidance.methods.flair:flair",
    "dps": "guidance.methods.dps:dps",
    "pnp_flow": "guidance.methods.pnp_flow:pnp_flow",
    "straight_through": "guidance.methods.straight_through:straight_through",
    "best_of_n": "guidance.methods.best_of_n:best_of_n",
    "particles": "guidance.methods.particles:particles",
    "flowdps": "guidance.methods.flowdps:flowdps",
    "psld": "guidance.methods.psld:psld",
    "ot_ode": "guidance.methods.ot_ode:ot_ode",
    "d_flow": "guidance.methods.d_flow:d_flow",
    "ictm": "guidance.methods.ictm:ictm",
    "flower": "guidance.methods.flower:flower",
    "flowedit": "guidance.methods.flowedit:flowedit",
    "inversion_edit": "guidance.methods.inversion_edit:inversion_edit",
    "rf_inversion": "guidance.methods.rf_inversion:rf_inversion",
    "rf_solver_edit": "guidance.methods.rf_solver_edit:rf_solver_edit",
}

COMMON_ARGUMENTS = ("num_steps", "cond", "height", "width", "generator", "callback", "progress", "batch_size",
                    "latents", "decode", "on_step_end")
#: diffusers' argument names that the methods from :func:`get_method` (and :func:`guidance.sample`) also take, and
#: what each stands for (:mod:`guidance.arguments`).
ALIASES = DIFFUSERS_NAMES


def _load(name: str) -> Callable:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}{hint} Available: {', '.join(REGISTRY)}")
    module, _, attribute = REGISTRY[name].partition(":")
    return getattr(import_module(module), attribute)


def method_options(name: str) -> dict[str, Any]:
    """A method's own options and their defaults (the common arguments excluded)."""
    signature = inspect.signature(_load(name))
    return {n: p.default for n, p in signature.parameters.items()
            if p.kind == p.KEYWORD_ONLY and n not in COMMON_ARGUMENTS}


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` of method ``name`` checked by the types the method declares, the one rule for the command line
    (``--option key=value``) and the API: a ``bool`` option takes True or False only (no truthy text), an ``int``
    option an integer in 0 .. :data:`~operators.checks.MAX_ITERATIONS`, a ``float`` option a finite number (None
    where the declaration allows it). Ranges and combinations are checked by the method itself."""
    parameters = inspect.signature(_load(name)).parameters
    for key, value in options.items():
        kinds = {part.strip() for part in str(parameters[key].annotation).split("|")}
        if value is None and "None" in kinds:
            continue
        if kinds - {"None"} == {"bool"}:
            check_flag(value, key)
        elif kinds - {"None"} == {"int"}:
            check_int(value, key, 0, MAX_ITERATIONS)
        elif kinds - {"None"} == {"float"}:
            check_number(value, key)
    return options


def resolve_consistency_steps(steps: int | str | None, model, objective, decode: bool) -> int:
    """The pixel-consistency iterations a method's image gets after the run
    (:func:`guidance.features.consistency.pixel_consistency`: projected Landweber steps onto the measurement,
    stopped at its noise level or when they stagnate): None or 0, none; ``"recommended"``, the model's
    ``restore_options["consistency_steps"]`` (what :func:`tasks.restore` applies; 0 where the model recommends
    none); an integer, at most that many. They need a :class:`~guidance.objectives.MeasurementFidelity` with a
    linear operator, and the decoded image."""
    from ..features.consistency import check_consistency_steps
    from ..objectives import MeasurementFidelity

    if steps is None:
        return 0
    if steps == "recommended":
        steps = int((getattr(model, "restore_options", None) or {}).get("consistency_steps", 0))
    elif isinstance(steps, str):
        raise ValueError(f"consistency_steps must be an integer >= 0, 'recommended' or None, got {steps!r}")
    if not isinstance(objective, MeasurementFidelity):
        raise ValueError(f"consistency_steps pull the image onto a measurement; the objective is "
                         f"{type(objective).__name__}: drop consistency_steps or use a MeasurementFidelity")
    steps = check_consistency_steps(steps, objective.operator, "drop consistency_steps")
    if steps and not decode:
        raise ValueError("consistency_steps correct the decoded image; decode=False (or output_type='latent') "
                         "makes none: drop one of them")
    return steps


def with_consistency(result: MethodResult, objective, steps: int) -> MethodResult:
    """``result`` with its image clipped to [-1, 1] and made consistent with the objective's measurement by up to
    ``steps`` pixel-consistency iterations (``info["consistency_steps_taken"]``, per image); unchanged for 0."""
    if not steps:
        return result
    from ..features.consistency import pixel_consistency

    image, taken = pixel_consistency(result.image.float().clamp(-1, 1), objective.operator, objective.y,
                                     noise_std=objective.noise_std, max_steps=steps, return_steps=True)
    result.image = image
    result.info["consistency_steps_taken"] = taken.tolist()
    return result


def list_methods() -> list[str]:
    """The registered method names."""
    return list(REGISTRY)


def get_method(name: str, **options) -> Callable[..., MethodResult]:
    """The method ``name`` with ``options`` bound; unknown options raise a ValueError listing the valid ones. The
    returned function takes the common arguments and diffusers' :data:`ALIASES`
    (:func:`guidance.arguments.pipeline_arguments`, shared with :func:`guidance.sample`), and
    ``consistency_steps``: the pixel consistency :func:`tasks.restore` ends with (:func:`resolve_consistency_steps`;
    default None: none)."""
    from ..arguments import pipeline_arguments
    from ..sampler import check_model

    function = _load(name)
    allowed = method_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; its options are {sorted(allowed)}")
    check_options(name, options)

    takes = inspect.signature(function).parameters

    @functools.wraps(function)
    def run(model, objective=None, *, consistency_steps: int | str | None = None, **arguments
            ) -> MethodResult | tuple:
        check_model(model)  # a model's name or path fails here, before any method reads the model
        call, finish = pipeline_arguments(model, arguments, takes, f"the method {name!r}")
        steps = resolve_consistency_steps(consistency_steps, model, objective, call.get("decode", True))

        def method() -> MethodResult:
            return with_consistency(function(model, objective, **options, **call), objective, steps)

        if not isinstance(call.get("on_step_end"), DiffusersCallback):
            return finish(method, None)
        with counting_velocity(model) as count:  # for the result of a run the callback interrupts

            def interrupted(stop: Interrupted) -> MethodResult:
                with torch.no_grad():
                    image = model.decode(stop.x) if call.get("decode", True) else None
                result = MethodResult(x=stop.x, image=image, nfe=count.nfe, sigmas=stop.sigmas,
                                      info={"interrupted_after_step": stop.step})
                return with_consistency(result, objective, steps)

            return finish(method, interrupted)

    run.options = dict(options)
    return run


__all__ = ["ALIASES", "COMMON_ARGUMENTS", "DivergenceError", "MethodResult", "REGISTRY", "check_options", "get_method",
           "list_methods", "method_options", "resolve_consistency_steps", "with_consistency"]
