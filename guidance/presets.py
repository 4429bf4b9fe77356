"""Named parity settings: the official hyperparameters of the papers' experiments (design notes, section 6).

A preset is a plain dict: ``method`` (a registered name), ``num_steps``, ``options`` (the method's keyword
options), ``objective`` (``MeasurementFidelity`` keyword arguments: space, weight, reduction), ``operators``
(operator specs the setting was published for, or None) and ``source``; some add ``noise_std``, ``cfg`` or
``resolution``. Each method file defines its own ``PRESETS``; this module gathers them.
"""

from __future__ import annotations

import copy
import difflib
from importlib import import_module

_SOURCES = ("guidance.methods.flowchef", "guidance.methods.flair")


def _all() -> dict[str, dict]:
    presets: dict[str, dict] = {}
    for module in _SOURCES:
        presets.update(getattr(import_module(module), "PRESETS", {}))
    return presets


def list_presets() -> list[str]:
    """The names of every parity preset."""
    return sorted(_all())


def get_preset(name: str) -> dict:
    """A copy of the preset ``name`` (a ValueError suggesting close names when unknown)."""
    presets = _all()
    if name not in presets:
        close = difflib.get_close_matches(name, presets, n=3, cutoff=0.4)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint} Available: {', '.join(sorted(presets))}")
    return copy.deepcopy(presets[name])


def method_from_preset(name: str, **overrides):
    """``(method, num_steps, objective_kwargs)`` for the preset, with ``overrides`` applied to its options."""
    from .methods import get_method

    preset = get_preset(name)
    method = get_method(preset["method"], **{**preset.get("options", {}), **overrides})
    return method, preset["num_steps"], preset.get("objective") or {}
