"""Guidance methods, one file each, all with one signature::

    method(model, objective, *, num_steps, cond=None, height=None, width=None, generator=None,
           callback=None, progress=True, batch_size=None, latents=None, decode=True, **options) -> MethodResult

Registered by name: :func:`list_methods`, :func:`get_method`. Adding a method is one file plus one line in
``REGISTRY``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from importlib import import_module
from typing import Any, Callable

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
}

COMMON_ARGUMENTS = ("num_steps", "cond", "height", "width", "generator", "callback", "progress", "batch_size",
                    "latents", "decode")


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


def list_methods() -> list[str]:
    """The registered method names."""
    return list(REGISTRY)


def get_method(name: str, **options) -> Callable[..., MethodResult]:
    """The method ``name`` with ``options`` bound; unknown options raise a ValueError listing the valid ones."""
    function = _load(name)
    allowed = method_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; its options are {sorted(allowed)}")
    return functools.wraps(function)(functools.partial(function, **options))


__all__ = ["COMMON_ARGUMENTS", "DivergenceError", "MethodResult", "REGISTRY", "get_method", "list_methods",
           "method_options"]
