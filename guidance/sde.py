"""Stochastic sampling steps that keep the flow's marginals p_s: the SDE of a rectified flow.

Gaussian paths (image and latent flows). Along x_s = (1 - s) x0 + s eps the marginals p_s obey the continuity
equation ∂p/∂s = -∇·(p v). Run backwards in s (τ = -s increasing), the SDE

    dx = [-v + (g(s)² / 2) ∇log p_s(x)] dτ + g(s) dW_τ

has the same Fokker-Planck equation for every diffusion g, since (g²/2) ∇·(p ∇log p) = (g²/2) Δp: it samples
the ODE's marginals for any noise level (the probability-flow ODE is g = 0). The score follows from the velocity,

    ∇log p_s(x) = -E[eps | x_s = x] / s = -(x + (1 - s) v) / s = -eps_hat / s,

and with g(s)² = 2 η s (η = ``noise_scale``: for small s, η times the diffusion 2s / (1 - s) of the forward
process of the path; finite at s = 1, vanishing at s = 0) one Euler-Maruyama step from s to s' < s reads

    x_{s'} = x_s + (s' - s) (v + η eps_hat) + sqrt(2 η s (s - s')) z,      z ~ N(0, I).

η = 0 is the Euler step of the ODE. The score is -eps_hat / s, unbounded as s -> 0, so the final step onto
s' = 0 is always the deterministic Euler step x_0 = x_s - s v = x0_hat (no noise is injected that no later step
could remove).

The marginals are kept in continuous time only. Along a direction in which the data hardly vary, the drift
contracts the state at rate about (1 + η) / s, so a step with (1 + η) (s - s') / s > 2 overshoots and amplifies
that direction instead: on a uniform grid of N steps, the stochastic steps at s < (1 + η) / (2N), none for
η <= 3, about (η - 3) / 2 for larger η, whatever N, with an error that shrinks as N grows. ``python -m
tasks.studies.sde_steps`` measures it on an exact 48-dimensional smooth-image mixture (relative covariance error
of 2000 final samples; exact samples: 0.03): at 20 steps the ODE gives 0.10, η = 4 0.04, η = 8 2.1; η = 8 comes
within the ODE's error at 200 steps only (0.11 at 100), while η <= 4 stays within it from 10 steps on. This is the marginal-preserving SDE of SiT (Ma et al., "SiT: Exploring Flow and Diffusion-based
Generative Models with Scalable Interpolant Transformers", 2024, ``transport/integrators.py`` of
willisma/SiT) in this toolkit's time, the stochastic sampler that particle methods for flows use (Singhal et
al., "A General Framework for Inference-time Scaling and Steering of Diffusion Models", 2025; Kim et al.,
"Inference-Time Scaling for Flow Models via Stochastic Generation and Rollover Budget Forcing", 2025).

Simplex flows (sequences, :mod:`guidance.sequences.simplex`). The Gumbel-softmax path has no score of this
form; its noise is independent across positions, so re-drawing one position's noise given a clean token drawn
from the model's p(x_1 | x_s) is a Gibbs move on that position that keeps p_s (the per-position posterior is
the marginal of the joint one). :func:`simplex_step` takes the Euler step and re-noises each position with
probability 1 - exp(-η (s² - s'²)) at s' (rate 2 η s, as the Gaussian g², so that η is about the expected number
of re-noisings per position over the whole trajectory, few of them late, where the path's Gumbel noise would
flip tokens), around a token drawn from p(x_1 | x_s); the final step is again deterministic. It agrees with the
Gibbs move up to the O(s - s') drift of the other positions within the step, so it is not exact: on an exact
categorical prior (3⁴ sequences, 40 steps) its samples lie at total variation 0.10 from the prior with η = 4,
against 0.19 for the deterministic sampler, whose error is the Gumbel-softmax path's own.
"""

from __future__ import annotations

import math

import torch

from .flow import eps_from_velocity, euler_step, expand_sigma
from .noise import check_generator, initial_noise

__all__ = ["check_noise_scale", "diffusion_squared", "sde_step", "score_from_velocity", "simplex_step"]


def check_noise_scale(noise_scale) -> float:
    """η must be a finite number >= 0."""
    if isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float)) or not 0 <= noise_scale < math.inf:
        raise ValueError(f"noise_scale (η) must be a finite number >= 0 (0: the deterministic ODE), got "
                         f"{noise_scale!r}")
    return float(noise_scale)


def _check_generator(generator) -> None:
    check_generator(generator)
    if generator is None:
        raise ValueError("stochastic sampling draws fresh noise at every step: pass an explicit generator, e.g. "
                         "generator=torch.Generator().manual_seed(0)")


def diffusion_squared(sigma: float | torch.Tensor, noise_scale: float) -> float | torch.Tensor:
    """g(s)² = 2 η s."""
    return 2 * noise_scale * sigma


def score_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """∇log p_s(x) = -(x + (1 - s) v) / s (s > 0)."""
    return -eps_from_velocity(x, v, sigma) / expand_sigma(sigma, x)


def _is_final(sigma_next) -> bool:
    return bool((torch.as_tensor(sigma_next) <= 0).all())


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor,
             noise_scale: float, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """One Euler-Maruyama step of the marginal-preserving SDE from s to s' < s (module docstring)::

        x_{s'} = x_s + (s' - s) (v + η eps_hat) + sqrt(2 η s (s - s')) z

    η = 0, or s' = 0 (the final step), is the deterministic Euler step. ``generator``: a torch.Generator or a
    list of one per sample (as for the initial noise)."""
    eta = check_noise_scale(noise_scale)
    if eta == 0 or _is_final(sigma_next):
        return euler_step(x, v, sigma, sigma_next)
    _check_generator(generator)
    s, s_next = expand_sigma(sigma, x), expand_sigma(sigma_next, x)
    eps_hat = eps_from_velocity(x, v, sigma)
    z = initial_noise(tuple(x.shape), generator, x.device).to(x.dtype)
    return x + (s_next - s) * (v + eta * eps_hat) + torch.sqrt(diffusion_squared(s, eta) * (s - s_next)) * z


def simplex_step(flow, x: torch.Tensor, v: torch.Tensor, p: torch.Tensor, sigma: float | torch.Tensor,
                 sigma_next: float | torch.Tensor, noise_scale: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """The stochastic step of a :class:`~guidance.sequences.simplex.SimplexFlow` (module docstring): the flow's
    Euler step, then each position re-noised with probability 1 - exp(-η (s² - s'²)) at s' around a clean token
    k ~ p (the step's p(x_1 | x_s), (B, L, K)). η = 0, or s' = 0, is the Euler step alone."""
    eta = check_noise_scale(noise_scale)
    x_next = flow.step(x, v, sigma, sigma_next)
    if eta == 0 or _is_final(sigma_next):
        return x_next
    _check_generator(generator)
    if isinstance(generator, (list, tuple)):
        if len(generator) != 1:
            raise ValueError("simplex flows draw their noise from one generator: pass a single torch.Generator")
        generator = generator[0]
    b, length, k = x.shape
    draw = generator.device
    rows = p.reshape(-1, k).double().clamp_min(0).to(draw)
    tokens = torch.multinomial(rows, 1, generator=generator).reshape(b, length).to(x.device)
    fresh = flow.path.interpolate(tokens, k, float(sigma_next), generator).to(x_next)
    s, s_next = float(torch.as_tensor(sigma)), float(torch.as_tensor(sigma_next))
    rate = 1 - math.exp(-eta * (s * s - s_next * s_next))
    chosen = torch.rand((b, length, 1), generator=generator, device=draw).to(x.device) < rate
    return torch.where(chosen, fresh, x_next)
