"""The pseudo-inverse floor: x = A⁺ y, no generative prior."""

from __future__ import annotations

import torch

from ..objectives import MeasurementFidelity
from ..sampler import start_state
from .common import MethodResult, initial_image


@torch.no_grad()
def pseudo_inverse(model, objective: MeasurementFidelity, *, num_steps: int = 28, cond=None, height=None, width=None,
                   generator=None, callback=None, progress: bool = True, batch_size=None, latents=None,
                   decode: bool = True, on_step_end=None) -> MethodResult:
    """image = A⁺ y by :func:`~guidance.methods.common.initial_image` (the pseudo-inverse; y itself for
    shape-preserving operators without one, such as blur; else the gain-scaled adjoint), and x = E(image) for
    latent models. No network evaluation."""
    if not isinstance(objective, MeasurementFidelity):
        raise ValueError("pseudo_inverse needs a MeasurementFidelity objective (an operator and a measurement)")
    state = start_state(model, cond, 1, height, width, generator, batch_size or objective.y.shape[0], latents)
    objective.bind(model, state.height, state.width)
    op = objective.operator
    if not op.is_linear:
        raise ValueError(f"pseudo_inverse needs a linear operator; {type(op).__name__} is not")
    y = objective.y.to(state.x.device)
    image = initial_image(op, y)
    image = image.float().expand(state.x.shape[0], -1, -1, -1)
    x = model.encode(image)
    return MethodResult(x=x, image=(model.decode(x) if decode else None), nfe=0, sigmas=state.sigmas[:0],
                        info={"pseudo_inverse_image": image})
