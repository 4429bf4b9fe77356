"""The unguided floor: plain Euler sampling, ignoring the objective."""

from __future__ import annotations

import torch

from ..sampler import sample
from .common import CountingModel, MethodResult


@torch.no_grad()
def unguided(model, objective=None, *, num_steps: int = 28, cond=None, height=None, width=None, generator=None,
             callback=None, progress: bool = True, batch_size=None, latents=None, decode: bool = True) -> MethodResult:
    """Sample the prior with :func:`guidance.sample`; the objective is not used (it is the floor every guided
    method must beat)."""
    counted = CountingModel(model)
    out = sample(counted, cond, num_steps, height, width, generator, callback, progress, batch_size, latents, decode)
    return MethodResult(x=out.x, image=out.image, nfe=counted.nfe, sigmas=out.sigmas)
