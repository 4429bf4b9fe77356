"""RF-Solver editing (Wang et al., "Taming Rectified Flow for Inversion and Editing", ICML 2025): invert the source
image to noise with the RF-Solver under the source prompt, then regenerate it with the RF-Solver under the edit
prompt.

    z_0 = E(source)
    z_1 = RF-Solver inversion of z_0 over the whole schedule, source prompt, guidance 1
    x_1 = z_1;  x_0 = RF-Solver sampling of x_1, edit prompt, guidance w                 (guidance.solvers.rf_solver)

Official code: wangjiangshan0725/RF-Solver-Edit commit 3388e299cae6ab0a3ee9eceb09911a4543a48576,
``FLUX_Image_Edit/src/edit.py`` (``denoise(..., guidance=1, inverse=True)`` then ``denoise(..., guidance=guidance,
inverse=False)``) and ``FLUX_Image_Edit/src/flux/sampling.py`` (``denoise``, ``get_schedule``: the FLUX schedule
with its resolution shift, which is the diffusers pipeline's schedule that ``model.sigmas`` gives).

Not reproduced: the official edit also shares attention features between the two passes (``--inject`` steps: the
value tensors of the inversion's self-attention, stored per step and layer, replace the regeneration's). That lives
inside FLUX's attention processors, needs a per-step, per-layer store of every value tensor (gigabytes at 1024²),
and exists for no other family; flowsteer's adapters expose velocities, not attention internals, so it does not fit
them cleanly. Without it, edits follow the prompt more and the source less than the paper's figures; a ``mask``
keeps the outside of a region exactly (see :mod:`guidance.methods.inversion_edit`, whose loop this is, with
``solver="rf_solver"`` and ``strength`` 1).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..objectives import Objective
from .common import MethodResult
from .editing import is_text
from .inversion_edit import run_inversion_edit

__all__ = ["PRESETS", "rf_solver_edit"]


@torch.no_grad()
def rf_solver_edit(
    model,
    objective: Objective | None = None,
    *,
    num_steps: int = 25,
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
    source_image: Any = None,
    source_prompt: str | list[str] | None = None,
    edit_prompt: str | list[str] | None = None,
    mask: torch.Tensor | None = None,
    solver: str = "rf_solver",
    source_guidance_scale: float | None = None,
    guidance_scale: float | None = None,
    check_divergence: bool = True,
) -> MethodResult:
    """Edit ``source_image`` from ``source_prompt`` toward ``edit_prompt``: RF-Solver inversion, then RF-Solver
    sampling (2 network evaluations per step each way).

    Args:
        model: a text-conditioned flow model.
        objective: None, or an objective whose gradient also steers the regeneration (as in
            :func:`~guidance.methods.inversion_edit.inversion_edit`, step size 0.3).
        num_steps: 25, edit.py's default for FLUX.1-dev (its example scripts use 15 or 25).
        source_image, source_prompt (default ""), edit_prompt, mask: as in
            :func:`~guidance.methods.inversion_edit.inversion_edit`; cond, latents, generator must be None.
        solver: "rf_solver" (the paper's), or "fireflow" for FireFlow's editing (one evaluation per step).
        source_guidance_scale: guidance of the inversion; None: 1 for a text source prompt, as edit.py inverts
            (FLUX's embedded guidance 1; no CFG on CFG families); a condition carries its own.
        guidance_scale: guidance of the regeneration; None keeps the embedded default of guidance-distilled models
            and turns CFG off elsewhere (the official scripts use 2 to 2.5 on FLUX.1-dev).
        check_divergence: as in the other methods.
    """
    if edit_prompt is None:
        raise ValueError("rf_solver_edit needs edit_prompt, the text of the edited image (for edits toward an "
                         "objective without text use inversion_edit)")
    if source_guidance_scale is None and (source_prompt is None or is_text(source_prompt)):
        source_guidance_scale = 1.0
    return run_inversion_edit(
        "rf_solver_edit", model, objective, num_steps=num_steps, cond=cond, height=height, width=width,
        generator=generator, callback=callback, progress=progress, batch_size=batch_size, latents=latents,
        decode=decode, on_step_end=on_step_end, source_image=source_image,
        source_prompt=source_prompt, edit_prompt=edit_prompt, mask=mask, strength=1.0, solver=solver,
        step_size=0.3, source_guidance_scale=source_guidance_scale, guidance_scale=guidance_scale,
        check_divergence=check_divergence)


OFFICIAL_COMMIT = "3388e299cae6ab0a3ee9eceb09911a4543a48576"
FIREFLOW_COMMIT = "98588a6f87662d73d8f9722294ad1fcf02ed211d"


def _preset(num_steps: int, guidance: float, scripts: str, solver: str = "rf_solver") -> dict[str, Any]:
    if solver == "rf_solver":
        source = (f"Wang et al., Taming Rectified Flow for Inversion and Editing, ICML 2025; "
                  f"wangjiangshan0725/RF-Solver-Edit {OFFICIAL_COMMIT}, FLUX_Image_Edit/src/{scripts} and edit.py")
    else:
        source = (f"Deng et al., FireFlow: Fast Inversion of Rectified Flow for Image Semantic Editing, 2024; "
                  f"HolmesShuan/FireFlow-Fast-Inversion-of-Rectified-Flow-for-Image-Semantic-Editing "
                  f"{FIREFLOW_COMMIT}, src/{scripts} and src/flux/sampling.py (denoise_fireflow)")
    return {"method": "rf_solver_edit", "num_steps": num_steps,
            "options": {"solver": solver, "source_guidance_scale": 1.0, "guidance_scale": guidance},
            "objective": None, "operators": None, "model": "black-forest-labs/FLUX.1-dev", "dtype": "bfloat16",
            "resolution": 1024, "source": source,
            "note": "the official --inject attention-feature sharing is not reproduced (see the module docstring); "
                    "the source is encoded with the model's encode (the posterior mean)"}


PRESETS: dict[str, dict[str, Any]] = {
    "rf_solver_edit_flux": _preset(25, 2.0, "run_art_batman.sh (and run_cartoon_*.sh, run_art_mari.sh)"),
    "rf_solver_edit_flux_15": _preset(15, 2.0, "run_boy.sh (and run_hiking.sh, run_horse.sh)"),
    "fireflow_edit_flux": _preset(8, 2.0, "run_boy.sh (--num_steps 8 --guidance 2)", solver="fireflow"),
}
