"""Batched conjugate gradients: one symmetric positive (semi-)definite system M u = b per sample.

The linear solver behind the pseudo-inverse of operators without a closed form (:meth:`LinearOperator.A_dagger_cg`:
M = A Aᵀ) and the data steps of the solvers that need one (OT-ODE: M = r² A Aᵀ + σ² I; Flower: M = AᵀA / σ² + I / λ).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["conjugate_gradient"]


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x: torch.Tensor | None = None,
                       *, max_iters: int, atol: float = 0.0, rtol: float = 0.0,
                       early_exit: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``apply(u) = b`` per sample (dimension 0 is the batch) from ``x`` (zeros when None) by at most
    ``max_iters`` conjugate-gradient iterations.

    A sample stops once its residual norm ‖b − M u‖ is at most max(``atol``, ``rtol`` ‖b‖) (both 0: only an
    exactly zero residual, or a direction of zero curvature, stops it); a stopped sample is frozen (its step is 0)
    while the others go on. ``early_exit`` reads the device once per iteration to end the solve when every sample
    has stopped (the operator applications it saves cost far more than the read); without it the loop runs all
    ``max_iters`` iterations with no host read.

    Returns u and the (B,) number of iterations each sample ran.
    """
    dims = tuple(range(1, b.ndim))

    def dot(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (p * q).sum(dim=dims, keepdim=True)

    r = b if x is None else b - apply(x)
    x = torch.zeros_like(b) if x is None else x
    p, rr = r, dot(r, r)
    threshold = torch.clamp_min(rtol**2 * dot(b, b), atol**2)
    ran = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
    for _ in range(max_iters):
        running = rr > threshold
        if early_exit and not bool(running.any()):
            break
        mp = apply(p)
        pmp = dot(p, mp)
        running = running & (pmp > 0)
        alpha = torch.where(running, rr / torch.where(running, pmp, torch.ones_like(pmp)), torch.zeros_like(rr))
        x = x + alpha * p
        r = r - alpha * mp
        rr_next = dot(r, r)
        beta = torch.where(running, rr_next / torch.where(running, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = torch.where(running, r + beta * p, p)
        rr = torch.where(running, rr_next, rr)
        ran += running.flatten()
    return x, ran
