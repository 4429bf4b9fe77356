"""Best-of-N: the search baseline for rewards and classifiers (inference-time scaling for flows).

    draw N unguided samples per output, score each once with the objective, keep the lowest loss.

It costs N times the network evaluations of one sample and N objective calls, with no gradient at all; give it
the same number of objective calls as a guided method to compare the two at equal scoring budget. Works for image
flow models (the objective scores the final latent, decoding for pixel-space objectives) and for simplex flows
(the objective scores the hard one-hot sequences).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from operators.checks import MAX_STEPS, check_work

from ..sequences.simplex import SimplexFlow, check_no_image_size, sample_sequences
from ..objectives import Objective
from ..sampler import sample
from .common import CountingModel, MethodResult, check_count

__all__ = ["best_of_n"]


@torch.no_grad()
def best_of_n(
    model,
    objective: Objective,
    *,
    num_steps: int = 28,
    cond: Any = None,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    latents: torch.Tensor | None = None,
    decode: bool = True,
    on_step_end: Callable | None = None,
    candidates: int = 8,
) -> MethodResult:
    """Keep the best of ``candidates`` (N) unguided samples per output under ``objective``.

    The N candidates of output b are samples b·N .. b·N + N - 1 of one batch of B·N (``latents``, when given, hold
    all B·N starting points). ``info["loss"]`` (B, N) holds every candidate's loss, ``info["chosen"]`` (B,) the
    index kept; for simplex flows ``info["tokens"]`` (B, L) the kept sequences. ``nfe`` counts network
    evaluations per output: N x num_steps (the candidates run as one batch of B·N).
    """
    if not isinstance(objective, Objective):
        raise ValueError(f"best_of_n needs an Objective to rank the candidates, got {type(objective).__name__}")
    n = check_count(candidates, "candidates (N)", minimum=1)
    check_count(num_steps, "num_steps", 1, MAX_STEPS)
    check_work({"candidates": n, "num_steps": num_steps}, "best_of_n")
    if latents is not None:
        if latents.shape[0] % n:
            raise ValueError(f"latents hold {latents.shape[0]} starting points, not a multiple of candidates={n}")
        batch_size = latents.shape[0] // n
    batch = 1 if batch_size is None else check_count(batch_size, "batch_size", minimum=1)

    counted = CountingModel(model)
    if isinstance(model, SimplexFlow):
        check_no_image_size(height, width, "best_of_n on a simplex flow")
        model.condition(cond)
        out = sample_sequences(model, num_steps, batch * n, generator, latents, callback, progress,
                               on_step_end)
        hard = F.one_hot(out.tokens, model.vocab_size).float()
        x, nfe = out.x, num_steps * n
        loss = objective(model, hard)
    else:
        out = sample(counted, cond, num_steps, height, width, generator, callback, progress, batch * n, latents,
                     decode=False, on_step_end=on_step_end)
        x, nfe = out.x, counted.nfe * n
        objective.bind(model, x.shape[-2] * model.spatial_factor, x.shape[-1] * model.spatial_factor)
        loss = objective(model, x)

    loss = loss.reshape(batch, n)
    chosen = loss.argmin(1)
    keep = torch.arange(batch, device=chosen.device) * n + chosen
    x = x[keep.to(x.device)]
    info: dict[str, Any] = {"loss": loss.float().cpu(), "chosen": chosen.cpu(), "objective_calls": n}
    image = None
    if isinstance(model, SimplexFlow):
        info["tokens"] = model.tokens(x)
    elif decode:
        image = model.decode(x)
    return MethodResult(x=x, image=image, nfe=nfe, sigmas=out.sigmas, info=info)
