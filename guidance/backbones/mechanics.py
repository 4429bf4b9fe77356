"""Mechanics the pipeline adapters share: the sigma schedule a diffusers pipeline sets, its image-size shift, and
classifier-free guidance.

Schedules. The flow-matching pipelines (FLUX.1, FLUX.2, Qwen-Image, Z-Image, Lumina 2, Chroma) start from
``linspace(1, 1/N, N)`` and let the scheduler shift it, with ``mu`` from the image token count when the scheduler
is configured for dynamic shifting::

    mu = m * tokens + b,  the line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)
    s' = e^mu / (e^mu + (1/s - 1))

and append a final 0. :func:`scheduler_sigmas` runs the scheduler's own ``set_timesteps`` on a copy, so every
variant (static shift, dynamic shift, the scheduler's own flow sigmas) is the pipeline's.

Guidance. v = v_u + w (v_c - v_u) (Ho & Salimans, 2022, "Classifier-Free Diffusion Guidance"); Qwen-Image and
Lumina 2 / Z-Image optionally rescale the guided velocity of every token to the norm of the conditional one.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

__all__ = ["classifier_free", "rescale_to_norm", "scheduler_sigmas", "token_shift"]


def token_shift(config, tokens: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu for ``tokens`` image tokens: linear through (base_image_seq_len, base_shift) and (max_image_seq_len,
    max_shift), read from a scheduler config (the defaults are FLUX.1's, used where the config has no value)."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    low = config.get("base_shift", base_shift)
    high = config.get("max_shift", max_shift)
    slope = (high - low) / (max_len - base_len)
    return float(tokens * slope + (low - slope * base_len))


def scheduler_sigmas(scheduler, num_steps: int, mu: float | None = None, linspace: bool = True) -> torch.Tensor:
    """The ``num_steps + 1`` sigmas (final 0 included, float32) a pipeline's ``set_timesteps`` gives, run on a copy
    of ``scheduler``: from ``linspace(1, 1/N, N)`` (``linspace=True``, as the flow-matching pipelines pass it) unless
    the scheduler makes its own flow sigmas, shifted with ``mu`` when given."""
    scheduler = copy.deepcopy(scheduler)
    kwargs = {} if mu is None else {"mu": mu}
    if linspace and not scheduler.config.get("use_flow_sigmas", False):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device="cpu", **kwargs)
    else:
        scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
    return scheduler.sigmas.to(torch.float32)


def classifier_free(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """v = v_u + w (v_c - v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)


def rescale_to_norm(v: torch.Tensor, reference: torch.Tensor, dim: int = -1, max_ratio: float | None = None
                    ) -> torch.Tensor:
    """``v`` with the norm of ``reference`` along ``dim`` (per token): v * |ref| / |v|; with ``max_ratio`` only
    where |v| exceeds ``max_ratio * |ref|`` (then scaled to that bound), as Lumina 2 and Z-Image do."""
    norm_v = torch.linalg.vector_norm(v, dim=dim, keepdim=True)
    norm_ref = torch.linalg.vector_norm(reference, dim=dim, keepdim=True)
    if max_ratio is None:
        return v * (norm_ref / norm_v)
    bound = norm_ref * max_ratio
    return torch.where(norm_v > bound, v * (bound / norm_v), v)
