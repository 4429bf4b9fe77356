"""Named parity settings: the published hyperparameters of the papers' experiments, taken from their official code.

A preset is a plain dict: ``method`` (a registered name), ``num_steps``, ``options`` (the method's keyword
options), ``objective`` (``MeasurementFidelity`` keyword arguments: space, weight, reduction; None for editing),
``operators`` (operator specs the setting was published for, or None) and ``source`` (the paper and the official
file and commit). Some add the rest of the run: ``noise_std``, ``guidance_scale`` (CFG, or Flux's distilled
guidance), ``negative_prompt``, ``prompt``, ``seed``, ``resolution``, ``model``, ``dtype``, ``decoder`` and
``encoder`` (autoencoders replacing the model's VAE), and ``note``. Each method file defines its own ``PRESETS``;
this module gathers them, and ``flowsteer benchmark --preset NAME`` runs one (:mod:`tasks.commands.benchmark.parity`).
"""

from __future__ import annotations

import copy
import difflib
from importlib import import_module

_SOURCES = ("guidance.methods.flowchef", "guidance.methods.flair", "guidance.methods.pnp_flow",
            "guidance.methods.flowdps", "guidance.methods.psld", "guidance.methods.ot_ode", "guidance.methods.d_flow",
            "guidance.methods.ictm", "guidance.methods.flower", "guidance.methods.flowedit",
            "guidance.methods.rf_inversion", "guidance.methods.rf_solver_edit")


def _all() -> dict[str, dict]:
    presets: dict[str, dict] = {}
    for module in _SOURCES:
        presets.update(getattr(import_module(module), "PRESETS", {}))
    return presets


def list_presets() -> list[str]:
    """The names of every parity preset."""
    return sorted(_all())


def get_preset(name: str, official_quirks: bool = False) -> dict:
    """A copy of the preset ``name`` (a ValueError suggesting close names when unknown).

    ``official_quirks=True`` gives the parity variant: what the official code does that flowsteer deliberately
    does not (the preset's ``quirks``, name -> description) switched on, by merging its ``parity`` entry: its
    ``options`` into the method options, its ``objective`` into the objective arguments and its ``operators`` in
    place of the operators. A preset without quirks is refused, so a parity run never claims what it is not.
    """
    presets = _all()
    if name not in presets:
        close = difflib.get_close_matches(name, presets, n=3, cutoff=0.4)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint} Available: {', '.join(sorted(presets))}")
    preset = copy.deepcopy(presets[name])
    if not isinstance(official_quirks, bool):
        raise ValueError(f"official_quirks must be True or False, got {official_quirks!r}")
    if official_quirks:
        parity = preset.get("parity")
        if not parity:
            raise ValueError(f"the preset {name!r} has no official quirks to reproduce: it already is the official "
                             f"computation; drop official_quirks")
        preset["options"] = {**preset.get("options", {}), **parity.get("options", {})}
        if parity.get("objective"):
            preset["objective"] = {**(preset.get("objective") or {}), **parity["objective"]}
        if parity.get("operators"):
            preset["operators"] = list(parity["operators"])
        preset["official_quirks"] = True
    return preset


def method_from_preset(name: str, official_quirks: bool = False, **overrides):
    """``(method, num_steps, objective_kwargs)`` for the preset (its parity variant with ``official_quirks``),
    with ``overrides`` applied to its options."""
    from ..methods import get_method

    preset = get_preset(name, official_quirks)
    method = get_method(preset["method"], **{**preset.get("options", {}), **overrides})
    return method, preset["num_steps"], preset.get("objective") or {}
