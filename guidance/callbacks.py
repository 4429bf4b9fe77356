"""diffusers' ``callback_on_step_end`` contract, for :func:`guidance.sample` and every method.

A diffusers pipeline calls ``callback_on_step_end(pipeline, step_index, timestep, callback_kwargs)`` after each
denoising step, with ``callback_kwargs`` holding the tensors named by ``callback_on_step_end_tensor_inputs`` (a
:class:`diffusers.callbacks.PipelineCallback` names its own in ``tensor_inputs``), and goes on from the tensors of
the dict it returns; setting ``pipeline._interrupt = True`` ends the run there, and ``pipeline._guidance_scale``
changes the guidance scale of the remaining steps (diffusers' ``SD3CFGCutoffCallback`` sets it to 0 and keeps the
conditional half of the embeddings). :class:`DiffusersCallback` runs such a callback inside flowsteer's loops:

* ``pipeline``: a :class:`PipelineView` of the model: the model's attributes (and, through it, the wrapped
  pipeline's components), with the run's own ``num_timesteps``, ``guidance_scale`` / ``_guidance_scale``,
  ``do_classifier_free_guidance`` and ``interrupt`` / ``_interrupt``, as diffusers keeps them on the pipeline;
* ``step_index``: the step counted from the first step the run takes (an image-to-image run with ``strength``
  counts from 0, as diffusers' image-to-image pipelines do);
* ``timestep``: the model's timestep of the noise level the step started from (``sigma * 1000`` on diffusers'
  flow-matching pipelines), a tensor as diffusers passes it;
* ``callback_kwargs``: ``"latents"`` in the pipeline's own layout (FLUX.1, Chroma and Qwen-Image: packed tokens,
  :meth:`~guidance.backbones.base.FlowModel.pipeline_latents`), and the condition's embeddings under the
  pipeline's names: ``prompt_embeds``, ``pooled_prompt_embeds``, ``negative_prompt_embeds`` ... Where the pipeline
  batches classifier-free guidance (SD3, SANA: ``cfg_in_batch``), ``prompt_embeds`` is ``[negative; positive]``
  as there. Only the names in the wrapped pipeline's ``_callback_tensor_inputs`` are taken (``["latents"]`` on a
  model without a pipeline).

flowsteer's own per-step callback is ``on_step_end(step, sigma, state) -> state`` (:func:`guidance.sampler.step_end`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

__all__ = ["DiffusersCallback", "Interrupted", "PipelineView", "checked_state", "counting_velocity",
           "tensor_inputs_of"]


def checked_state(returned: Any, x: torch.Tensor) -> torch.Tensor:
    """The ``"x"`` of the state an ``on_step_end(step, sigma, state)`` returned, checked against the state ``x``
    it was given (a dict with an ``"x"`` of the same shape), on ``x``'s device and dtype."""
    if not isinstance(returned, dict) or "x" not in returned:
        raise ValueError(f"on_step_end must return the state dict it was given (with its 'x'), changed or not; it "
                         f"returned {type(returned).__name__}")
    new = returned["x"]
    if not isinstance(new, torch.Tensor) or tuple(new.shape) != tuple(x.shape):
        raise ValueError(f"on_step_end returned an 'x' of shape {tuple(getattr(new, 'shape', ()))}; the state has "
                         f"shape {tuple(x.shape)}")
    return new.to(device=x.device, dtype=x.dtype)


class Interrupted(Exception):
    """Raised by a :class:`DiffusersCallback` whose callback set ``pipeline._interrupt = True``: the run stops
    with the state ``x`` after step ``step``, having run the noise levels ``sigmas``."""

    def __init__(self, x: torch.Tensor, step: int, sigmas: torch.Tensor):
        super().__init__(f"interrupted after step {step}")
        self.x, self.step, self.sigmas = x, step, sigmas


class PipelineView:
    """The ``pipeline`` argument of a diffusers callback: reads fall through to the model, then to the pipeline it
    wraps (``pipeline.vae``, ``pipeline.scheduler``, ...); the run's state is its own."""

    def __init__(self, model, num_timesteps: int, guidance_scale: float):
        self.__dict__.update(_model=model, _num_timesteps=num_timesteps, _guidance_scale=guidance_scale,
                             _interrupt=False)

    def __getattr__(self, name: str) -> Any:
        model = self.__dict__["_model"]
        try:
            return getattr(model, name)
        except AttributeError:
            pipeline = getattr(model, "pipeline", None)
            if pipeline is None:
                raise
            return getattr(pipeline, name)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def interrupt(self) -> bool:
        return self._interrupt


def tensor_inputs_of(model, callback: Callable, names: list[str] | None) -> list[str]:
    """The tensors a diffusers ``callback`` gets: its own ``tensor_inputs`` (a ``PipelineCallback`` or
    ``MultiPipelineCallbacks``), else ``names`` (diffusers' default ``["latents"]``); each must be one the model's
    pipeline offers (its ``_callback_tensor_inputs``), checked as diffusers checks it."""
    own = getattr(callback, "tensor_inputs", None)
    names = list(own) if isinstance(own, (list, tuple)) else ["latents"] if names is None else names
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"callback_on_step_end_tensor_inputs must be a list of names, got {names!r}")
    offered = callback_tensor_names(model)
    unknown = [n for n in names if n not in offered]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not offered by {type(model).__name__}: "
                         f"it offers {offered} (diffusers' _callback_tensor_inputs of its pipeline)")
    return list(names)


def callback_tensor_names(model) -> list[str]:
    """The tensors a callback may ask for on ``model``: its pipeline's ``_callback_tensor_inputs``, else latents."""
    pipeline = getattr(model, "pipeline", None)
    return list(getattr(pipeline, "_callback_tensor_inputs", None) or ["latents"])


class DiffusersCallback:
    """A diffusers ``callback_on_step_end`` run after each step of a flowsteer loop (see the module doc), after
    flowsteer's own ``on_step_end`` when both are given.

    ``names`` are the tensors it gets (:func:`tensor_inputs_of`). ``cond`` is the run's own condition (a copy made
    for the run): when the callback returns new embeddings or changes ``pipeline._guidance_scale``, its fields
    change for the remaining steps."""

    def __init__(self, model, callback: Callable, names: list[str], cond: Any, num_steps: int,
                 then: Callable | None = None):
        if not callable(callback):
            raise ValueError(f"callback_on_step_end must be callable as callback(pipeline, step, timestep, "
                             f"callback_kwargs), got {type(callback).__name__}")
        try:
            inspect.signature(callback).bind(None, 0, None, {})
        except TypeError:
            raise ValueError("callback_on_step_end follows diffusers' contract callback(pipeline, step, timestep, "
                             "callback_kwargs) -> dict; flowsteer's callback(step, sigma, state) -> state is "
                             "on_step_end=") from None
        except ValueError:  # a builtin without a signature: called as given
            pass
        self.model, self.callback, self.cond, self.num_steps, self.then = model, callback, cond, num_steps, then
        self.names = names
        embeddings = [n for n in self.names if n != "latents"]
        if embeddings and cond is None:
            raise ValueError(f"callback_on_step_end_tensor_inputs {embeddings} need a condition: pass a prompt "
                             f"or cond=")
        missing = [n for n in embeddings if not hasattr(cond, n)]
        if missing:
            raise ValueError(f"the condition ({type(cond).__name__}) holds no {missing}; ask for "
                             f"{[n for n in self.names if n not in missing]}")
        self.first: int | None = None
        self.view: PipelineView | None = None
        self.levels: list[torch.Tensor] = []  # the noise levels run so far

    def _guidance_scale(self) -> float:
        scale = getattr(self.cond, "guidance_scale", None)
        return 1.0 if scale is None else float(scale)

    def _batched_cfg(self, name: str) -> torch.Tensor | None:
        """The negative half of ``name`` where the pipeline batches CFG as [negative; positive], else None."""
        if not getattr(self.model, "cfg_in_batch", False) or not self.view.do_classifier_free_guidance:
            return None
        return getattr(self.cond, f"negative_{name}", None)

    def _kwargs(self, x: torch.Tensor) -> dict[str, Any]:
        kwargs = {}
        for name in self.names:
            if name == "latents":
                kwargs[name] = self.model.pipeline_latents(x)
                continue
            value, negative = getattr(self.cond, name), self._batched_cfg(name)
            kwargs[name] = value if negative is None else torch.cat([negative, value])
        return kwargs

    def _take(self, returned: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            if name == "latents" or name not in returned:
                continue
            value, negative = returned[name], self._batched_cfg(name)
            positive = getattr(self.cond, name)
            if negative is not None and value.shape[0] == 2 * positive.shape[0]:
                negative, value = value.chunk(2)
                object.__setattr__(self.cond, f"negative_{name}", negative)
            object.__setattr__(self.cond, name, value)
        if hasattr(self.cond, "guidance_scale") and self.view._guidance_scale != self._guidance_scale():
            object.__setattr__(self.cond, "guidance_scale", float(self.view._guidance_scale))
        if "latents" not in returned:
            return x
        return self.model.from_pipeline_latents(returned["latents"], x)

    def __call__(self, step: int, sigma, sigma_next, state: dict[str, Any]) -> dict[str, Any]:
        if self.then is not None:
            state = {**state, "x": checked_state(self.then(step, sigma_next, state), state["x"])}
        if self.first is None:
            self.first = step
            self.view = PipelineView(self.model, self.num_steps - step, self._guidance_scale())
            self.levels.append(torch.as_tensor(sigma, dtype=torch.float32).reshape(()))
        self.levels.append(torch.as_tensor(sigma_next, dtype=torch.float32).reshape(()))
        x = state["x"]
        timestep = self.model.pipeline_timestep(sigma)
        returned = self.callback(self.view, step - self.first, timestep, self._kwargs(x))
        if not isinstance(returned, dict):
            raise ValueError(f"callback_on_step_end must return the callback_kwargs dict, changed or not; it "
                             f"returned {type(returned).__name__}")
        x = self._take(returned, x)
        if self.view._interrupt:
            raise Interrupted(x, step, torch.stack([s.to(self.levels[0].device) for s in self.levels]))
        return {**state, "x": x}


class counting_velocity:
    """``with counting_velocity(model) as count:`` counts ``model.velocity`` calls (``count.nfe``), as the
    methods' :class:`~guidance.methods.common.CountingModel` counts them, for a run a callback interrupts."""

    def __init__(self, model):
        self.model, self.nfe = model, 0

    def __enter__(self) -> "counting_velocity":
        velocity = self.model.velocity

        def counted(*args, **kwargs):
            self.nfe += 1
            return velocity(*args, **kwargs)

        self.model.velocity = counted
        return self

    def __exit__(self, *exc) -> None:
        del self.model.velocity
