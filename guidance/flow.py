"""The one time convention of flowsteer, and the conversions between x, x0, eps and velocity.

Rectified flow in the diffusers convention (s, "sigma", runs from 1 = pure noise to 0 = data)::

    x_s     = (1 - s) * x0 + s * eps
    v       = eps - x0                       (what SD3 and Flux transformers predict)
    x0_hat  = x_s - s * v
    eps_hat = x_s + (1 - s) * v
    Euler   x_{s'} = x_s + (s' - s) * v      (s' < s)

Papers that run time the other way (t = 0 noise, t = 1 data: Gumbel-softmax flow matching, Meta's
flow_matching library) are mapped with ``t = 1 - s`` by :func:`to_data_time` / :func:`from_data_time`,
here and nowhere else.
"""

from __future__ import annotations

import torch

__all__ = [
    "interpolate",
    "velocity_target",
    "x0_from_velocity",
    "eps_from_velocity",
    "velocity_from_x0",
    "velocity_from_eps",
    "euler_step",
    "to_data_time",
    "from_data_time",
    "expand_sigma",
]


def expand_sigma(sigma: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or per-sample ``(B,)`` sigma against a batch ``like`` of shape ``(B, ...)``."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim != 1 or sigma.shape[0] not in (1, like.shape[0]):
        raise ValueError(
            f"sigma must be a scalar or have shape (batch,) = ({like.shape[0]},), got {tuple(sigma.shape)}"
        )
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: torch.Tensor, eps: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) x0 + s eps."""
    s = expand_sigma(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The conditional flow-matching target v = eps - x0 (independent of s)."""
    return eps - x0


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """One-step clean estimate x0_hat = x_s - s v."""
    return x - expand_sigma(sigma, x) * v


def eps_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """One-step noise estimate eps_hat = x_s + (1 - s) v."""
    return x + (1 - expand_sigma(sigma, x)) * v


def velocity_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """v = (x_s - x0) / s, the velocity whose clean estimate is x0 (s > 0)."""
    return (x - x0) / expand_sigma(sigma, x)


def velocity_from_eps(x: torch.Tensor, eps: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """v = (eps - x_s) / (1 - s), the velocity whose noise estimate is eps (s < 1)."""
    return (eps - x) / (1 - expand_sigma(sigma, x))


def euler_step(
    x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor
) -> torch.Tensor:
    """x_{s'} = x_s + (s' - s) v."""
    return x + (expand_sigma(sigma_next, x) - expand_sigma(sigma, x)) * v


def to_data_time(sigma: float | torch.Tensor) -> float | torch.Tensor:
    """Map toolkit time s (1 = noise) to the reversed convention t = 1 - s (0 = noise, 1 = data)."""
    return 1 - sigma


def from_data_time(t: float | torch.Tensor) -> float | torch.Tensor:
    """Map t (0 = noise, 1 = data) back to toolkit time s = 1 - t."""
    return 1 - t
