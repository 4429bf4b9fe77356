"""Pixel-space data consistency for a finished restoration: projected Landweber iteration stopped by the
discrepancy principle.

A latent restoration x = D(mu) carries the decoder's own error, also in the directions the operator sees. The
Landweber iteration on ½‖A x − y‖², kept inside the image range [-1, 1],

    x ← clip(x − τ Aᵀ(A x − y)),   τ = 1 / ‖A‖²

removes that error along the directions A sees best first, and stops as soon as ‖A x − y‖² ≤ σ_n² · m, m the
entries of y that A measures (Morozov's discrepancy principle), before it starts fitting the noise, or once an iteration no longer lowers the
residual (by :data:`STAGNATION` of it), which ends it for noiseless measurements too. What A does not see (its null space) is
left as the prior made it. References: L. Landweber, "An iteration formula for Fredholm integral equations of
the first kind", 1951; Engl, Hanke & Neubauer, "Regularization of Inverse Problems", 1996, chapter 6.
"""

from __future__ import annotations

import torch

from operators import as_operator
from operators.base import check_finite, measured_entries, operator_gain
from operators.checks import MAX_ITERATIONS, check_int

__all__ = ["STAGNATION", "check_consistency_steps", "pixel_consistency"]

#: an iteration that lowers the squared residual by less than this share of it has stagnated and stops
STAGNATION = 1e-4


def check_consistency_steps(steps, operator, fix: str = "set the consistency steps to 0") -> int:
    """``steps`` when it is an integer >= 0 that ``operator`` can take (any number of steps needs a linear
    operator with an adjoint); else a ValueError ending with ``fix``."""
    check_int(steps, "the consistency steps", 0, MAX_ITERATIONS)
    if steps and not getattr(operator, "is_linear", False):
        raise ValueError(f"pixel consistency needs a linear operator with an adjoint; {type(operator).__name__} is "
                         f"not linear: {fix}")
    return steps


def pixel_consistency(x: torch.Tensor, operator, y: torch.Tensor, noise_std: float | None = None,
                      max_steps: int = 50, return_steps: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Make the images ``x`` (B, C, H, W) in [-1, 1] consistent with the measurement ``y = A x + n``.

    Args:
        operator: a linear operator (``operators``) with an adjoint.
        y: the measurement, batch 1 (shared) or B.
        noise_std: σ_n of the measurement noise (default: the operator's own); the iteration stops per image once
            ‖A x − y‖² ≤ σ_n² · m (m: the entries A measures, :func:`operators.base.measured_entries`). With σ_n = 0 only stagnation or ``max_steps`` ends it.
        max_steps: the most iterations (0: return ``x`` unchanged).

        return_steps: also return the number of iterations each image took.

    Returns:
        The corrected images (B, C, H, W); with ``return_steps``, (images, steps (B,)).
    """
    operator = as_operator(operator)  # a callable or nn.Module declared linear=True works too
    check_consistency_steps(max_steps, operator)
    check_finite(x, "the restored image")
    check_finite(y, "the measurement")
    y = y.to(device=x.device, dtype=x.dtype)
    expected = tuple(operator(x[:1]).shape[1:])
    if tuple(y.shape[1:]) != expected or y.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"the measurement has shape {tuple(y.shape)} but the operator maps the {x.shape[-2]}x"
                         f"{x.shape[-1]} restoration to (B, {', '.join(map(str, expected))}); use the measurement "
                         f"and the operator the image was restored from")
    sigma = float(operator.noise_std if noise_std is None else noise_std)
    threshold = sigma**2 * measured_entries(operator, tuple(x.shape), x.device)
    step = 1.0 / operator_gain(operator, tuple(x.shape), x.device)
    steps = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    previous = torch.full((x.shape[0],), torch.inf, dtype=x.dtype, device=x.device)
    for _ in range(max_steps):
        residual = operator(x) - y
        misfit = residual.square().flatten(1).sum(1)
        # the discrepancy principle, and stagnation: a step that lowers ‖A x − y‖² by less than STAGNATION of
        # itself ends that image's iteration (with σ_n = 0 the discrepancy principle alone would never fire)
        active = (misfit > threshold) & (misfit < (1 - STAGNATION) * previous)
        if not bool(active.any()):
            break
        previous = torch.where(active, misfit, torch.zeros_like(misfit))
        moving = active.reshape(-1, *([1] * (x.ndim - 1)))
        x = torch.where(moving, (x - step * operator.adjoint(residual)).clamp(-1, 1), x)
        steps += active.long()
    return (x, steps) if return_steps else x
