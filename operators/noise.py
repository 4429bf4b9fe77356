"""Random draws from explicit generators, on any device.

A ``torch.Generator`` lives on one device; drawing with a CPU generator for a CUDA tensor is done on the CPU
and moved, so the same seed gives the same numbers on every device.
"""

from __future__ import annotations

import torch


def _draw_device(like: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    if generator is None or generator.device.type == like.device.type:
        return like.device
    return generator.device


def _per_sample(draw, like: torch.Tensor, generator) -> torch.Tensor | None:
    """With a list of generators (one per sample, or one), row b of ``like`` drawn from generator b; else None."""
    if not isinstance(generator, (list, tuple)):
        return None
    if len(generator) == 1:
        return draw(like, generator[0])
    return torch.cat([draw(like[b:b + 1], g) for b, g in enumerate(generator)])


def randn_like(like: torch.Tensor, generator: torch.Generator | list | None = None) -> torch.Tensor:
    """Standard normal noise with the shape, dtype and device of ``like``, drawn from ``generator`` (a list: one
    generator per sample)."""
    if (rows := _per_sample(randn_like, like, generator)) is not None:
        return rows
    z = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=_draw_device(like, generator))
    return z.to(like.device)


def poisson(rate: torch.Tensor, generator: torch.Generator | list | None = None) -> torch.Tensor:
    """Poisson counts with the given (non-negative) rates, drawn from ``generator`` (a list: one per sample)."""
    if (rows := _per_sample(poisson, rate, generator)) is not None:
        return rows
    draw = rate.detach().to(_draw_device(rate, generator))
    return torch.poisson(draw, generator=generator).to(rate.device)
