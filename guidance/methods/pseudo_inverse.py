"""The pseudo-inverse floor: x = A⁺ y, no generative prior."""

from __future__ import annotations

import torch

from ..objectives import MeasurementFidelity
from ..sampler import start_state
from .common import MethodResult


@torch.no_grad()
def pseudo_inverse(model, objective: MeasurementFidelity, *, num_steps: int = 28, cond=None, height=None, width=None,
                   generator=None, callback=None, progress: bool = True, batch_size=None, latents=None,
                   decode: bool = True) -> MethodResult:
    """image = A⁺ y (the operator's pseudo-inverse; the adjoint scaled to the operator's gain where there is
    none), and x = E(image) for latent models. No network evaluation."""
    if not isinstance(objective, MeasurementFidelity):
        raise ValueError("pseudo_inverse needs a MeasurementFidelity objective (an operator and a measurement)")
    state = start_state(model, cond, 1, height, width, generator, batch_size or objective.y.shape[0], latents)
    objective.bind(model, state.height, state.width)
    op = objective.operator
    if not op.is_linear:
        raise ValueError(f"pseudo_inverse needs a linear operator; {type(op).__name__} is not")
    y = objective.y.to(state.x.device)
    if op.has_pseudo_inverse:
        image = op.pseudo_inverse(y)
    else:  # A^T y scaled so that a constant image keeps its level: ‖A^T A 1‖ = gain · ‖1‖
        ones = torch.ones((1, *tuple(op.input_shape(y[:1].shape))[1:]), device=y.device, dtype=y.dtype)
        image = op.adjoint(y) / op.adjoint(op(ones)).mean().clamp_min(1e-12)
    image = image.float().expand(state.x.shape[0], -1, -1, -1)
    x = model.encode(image)
    return MethodResult(x=x, image=(model.decode(x) if decode else None), nfe=0, sigmas=state.sigmas[:0],
                        info={"pseudo_inverse_image": image})
