"""Batched conjugate gradients: one symmetric positive (semi-)definite system M u = b per sample, and conjugate
gradients on the normal equations AᵀA x = Aᵀb stopped at the discrepancy (:func:`cgls`).

The linear solvers behind the pseudo-inverse of operators without a closed form (:meth:`LinearOperator.A_dagger_cg`:
M = A Aᵀ), its regularised forms for noisy measurements (:meth:`LinearOperator.A_dagger_tikhonov`: M = AᵀA + λI;
:meth:`LinearOperator.A_dagger_discrepancy`: :func:`cgls`) and the data steps of the solvers that need one (OT-ODE:
M = r² A Aᵀ + σ² I; Flower: M = AᵀA / σ² + I / λ).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["cgls", "conjugate_gradient"]


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


def cgls(apply: Callable[[torch.Tensor], torch.Tensor], apply_adjoint: Callable[[torch.Tensor], torch.Tensor],
         b: torch.Tensor, threshold: torch.Tensor, *, max_iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares min ‖A x − b‖² per sample from x = 0 by conjugate gradients on the normal equations (CGLS:
    Hestenes & Stiefel 1952; Björck, "Numerical Methods for Least Squares Problems", 1996, sec. 7.4), stopped
    for each sample once ‖b − A x‖² ≤ ``threshold`` (B,), the discrepancy principle (Morozov 1966; Hanke,
    "Conjugate Gradient Type Methods for Ill-Posed Problems", 1995): the iterates fit the strong directions of A
    first, so stopping at the noise level leaves out the weak ones where the noise dominates. A stopped sample is
    frozen (its step is 0); the loop reads the device once per iteration to end when every sample has stopped.

    ``apply`` is A, ``apply_adjoint`` Aᵀ. Returns x and the (B,) number of iterations each sample ran.
    """
    dims = tuple(range(1, b.ndim))

    def shaped(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *([1] * (like.ndim - 1)))

    r = b
    s = apply_adjoint(r)
    x = torch.zeros_like(s)
    p, gamma = s, s.square().sum(dim=tuple(range(1, s.ndim)))
    ran = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
    for _ in range(max_iters):
        running = (r.square().sum(dim=dims) > threshold) & (gamma > 0)
        if not bool(running.any()):
            break
        q = apply(p)
        qq = q.square().sum(dim=dims)
        running = running & (qq > 0)
        alpha = torch.where(running, gamma / torch.where(running, qq, torch.ones_like(qq)), torch.zeros_like(qq))
        x = x + shaped(alpha, x) * p
        r = r - shaped(alpha, r) * q
        s = apply_adjoint(r)
        gamma_next = s.square().sum(dim=tuple(range(1, s.ndim)))
        beta = torch.where(running, gamma_next / torch.where(running, gamma, torch.ones_like(gamma)),
                           torch.zeros_like(gamma))
        p = torch.where(shaped(running, p), s + shaped(beta, p) * p, p)
        gamma = torch.where(running, gamma_next, gamma)
        ran += running.long()
    return x, ran
