"""Solvers of the flow's ODE dx/ds = v(x, s), one step from s to s' in either direction (s' < s samples, s' > s
inverts an image to noise), with h = s' - s:

    "euler"      x' = x + h v(x, s)                                                   1 evaluation per step
    "rf_solver"  v = v(x, s),  v_mid = v(x + h/2 v, s + h/2)                           2 evaluations per step
                 x' = x + h v + h²/2 · (v_mid - v) / (h/2)
    "fireflow"   v = the previous step's v_mid (v(x, s) on the first step),            1 evaluation per step
                 v_mid = v(x + h/2 v, s + h/2),  x' = x + h v_mid                      (+ 1 on the first)

RF-Solver (Wang et al., "Taming Rectified Flow for Inversion and Editing", ICML 2025;
wangjiangshan0725/RF-Solver-Edit commit 3388e29, ``FLUX_Image_Edit/src/flux/sampling.py``, ``denoise``) expands
the ODE's solution to second order in h, estimating dv/ds by the finite difference to the half step; the update
equals the explicit midpoint rule x + h v_mid up to rounding, and is written here as the paper writes it. FireFlow
(Deng et al., "FireFlow: Fast Inversion of Rectified Flow for Image Semantic Editing", 2024;
HolmesShuan/FireFlow-Fast-Inversion-of-Rectified-Flow-for-Image-Semantic-Editing commit 98588a6,
``src/flux/sampling.py``, ``denoise_fireflow``) takes the midpoint step but reuses the last midpoint velocity as
the next step's starting velocity: the predictor x + h/2 v is then off by O(h²), the midpoint velocity by O(h²),
so the step keeps second order at one evaluation. Both papers invert with the schedule reversed (their
``timesteps[::-1]``), which is what :func:`integrate` does with an ascending ``sigmas``.

Global errors on an exact flow (tests/test_inversion.py): order 1 in the step count for Euler, 2 for the others.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .flow import euler_step, x0_from_velocity

__all__ = ["SOLVERS", "check_solver", "euler", "evaluations", "fireflow", "integrate", "rf_solver"]

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def euler(velocity: Velocity, x: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor, carried=None):
    """One Euler step; returns (x', v(x, s), None)."""
    v = velocity(x, s)
    return euler_step(x, v, s, s_next), v, None


def rf_solver(velocity: Velocity, x: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor, carried=None):
    """One RF-Solver step (second-order Taylor expansion, dv/ds from the half step); returns (x', v(x, s), None)."""
    h = s_next - s
    v = velocity(x, s)
    v_mid = velocity(x + h / 2 * v, s + h / 2)
    first_order = (v_mid - v) / (h / 2)
    return x + h * v + 0.5 * h ** 2 * first_order, v, None


def fireflow(velocity: Velocity, x: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor, carried=None):
    """One FireFlow step: the midpoint rule with the previous step's midpoint velocity ``carried`` as the starting
    velocity (evaluated on the first step); returns (x', the starting velocity, v_mid to carry)."""
    h = s_next - s
    v = velocity(x, s) if carried is None else carried
    v_mid = velocity(x + h / 2 * v, s + h / 2)
    return x + h * v_mid, v, v_mid


SOLVERS: dict[str, Callable] = {"euler": euler, "rf_solver": rf_solver, "fireflow": fireflow}


def check_solver(solver: Any) -> str:
    """A solver name of :data:`SOLVERS`, or a one-line ValueError."""
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(repr(n) for n in SOLVERS)}, got {solver!r}")
    return solver


def evaluations(solver: str, num_steps: int) -> int:
    """Network evaluations of ``num_steps`` steps of ``solver`` (each doubled inside a model with CFG)."""
    return {"euler": num_steps, "rf_solver": 2 * num_steps, "fireflow": num_steps + 1}[check_solver(solver)] \
        if num_steps else 0


def integrate(
    velocity: Velocity,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    solver: str = "euler",
    *,
    progress: bool = True,
    desc: str = "sampling",
    callback: Callable[[dict], None] | None = None,
    step_end: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    trajectory: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Integrate dx/ds = velocity(x, s) from ``sigmas[0]`` through every value of ``sigmas`` with ``solver``.

    ``callback`` gets ``{"step", "sigma", "x", "x0_hat"}`` before each update (x0_hat from the step's starting
    velocity); ``step_end(i, sigma, sigma_next, x)`` may replace the state after step i (from ``sigma`` to
    ``sigma_next``); ``trajectory``, when a list,
    receives the state at every value of ``sigmas`` (the start included)."""
    step = SOLVERS[check_solver(solver)]
    carried = None
    if trajectory is not None:
        trajectory.append(x)
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc=desc):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_next, v, carried = step(velocity, x, s, s_next, carried)
        if callback is not None:
            callback({"step": i, "sigma": s, "x": x, "x0_hat": x0_from_velocity(x, v, s)})
        x = x_next if step_end is None else step_end(i, s, s_next, x_next)
        if trajectory is not None:
            trajectory.append(x)
    return x
