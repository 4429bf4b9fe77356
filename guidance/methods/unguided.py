"""The unguided floor: plain Euler sampling, ignoring the objective (image flows and simplex flows over
sequences alike)."""

from __future__ import annotations

import torch

from ..sequences.simplex import SimplexFlow, check_no_image_size, sample_sequences
from ..sampler import sample
from .common import CountingModel, MethodResult


@torch.no_grad()
def unguided(model, objective=None, *, num_steps: int = 28, cond=None, height=None, width=None, generator=None,
             callback=None, progress: bool = True, batch_size=None, latents=None, decode: bool = True,
             on_step_end=None) -> MethodResult:
    """Sample the prior with :func:`guidance.sample` (a simplex flow: :func:`guidance.sample_sequences`, with
    ``info["tokens"]`` the (B, L) sequences); the objective is not used (it is the floor every guided method must
    beat)."""
    if isinstance(model, SimplexFlow):
        check_no_image_size(height, width, "unguided sampling of a simplex flow")
        model.condition(cond)
        out = sample_sequences(model, num_steps, batch_size, generator, latents, callback, progress,
                               on_step_end)
        return MethodResult(x=out.x, image=None, nfe=num_steps, sigmas=out.sigmas, info={"tokens": out.tokens})
    counted = CountingModel(model)
    out = sample(counted, cond, num_steps, height, width, generator, callback, progress, batch_size, latents, decode,
                 on_step_end)
    return MethodResult(x=out.x, image=out.image, nfe=counted.nfe, sigmas=out.sigmas)
