"""What every guidance method shares: its result, the step window, divergence checks and NFE counting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from operators.base import operator_gain

from ..images import ImageOutput


@dataclass
class MethodResult(ImageOutput):
    """Output of a guidance method: the final latent ``x`` (float32), the decoded ``image`` (B, C, H, W) in [-1, 1]
    (None with ``decode=False``), the number of network evaluations ``nfe`` (a batched CFG call counts once), the
    ``sigmas`` used and method-specific ``info``. ``images`` is ``image`` as diffusers returns it, per
    ``output_type`` ("pil": a list of PIL images, "np" / "pt": arrays / tensors in [0, 1])."""

    x: torch.Tensor
    image: torch.Tensor | None
    nfe: int
    sigmas: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    output_type: str = "pil"


class DivergenceError(ValueError):
    """The solver state became NaN or infinite."""


def _diverged(method: str, step: int, hint: str) -> DivergenceError:
    return DivergenceError(f"{method} diverged: the state became NaN or infinite at step {step}; {hint}")


def check_finite_state(x: torch.Tensor, step: int, method: str, hint: str = "use a smaller step size") -> None:
    """Stop with a clear error when the state diverged (one host-device synchronisation)."""
    if not bool(torch.isfinite(x).all()):
        raise _diverged(method, step, hint)


class DivergenceMonitor:
    """Watch the state for NaN / inf without synchronising inside the loop: :meth:`update` records, on the
    state's device, the first step at which it stopped being finite; :meth:`check` reads that once, after the
    loop, and raises a :class:`DivergenceError` naming the step. ``enabled=False`` makes both no-ops."""

    def __init__(self, method: str, hint: str = "use a smaller step size", enabled: bool = True):
        self.method, self.hint, self.enabled = method, hint, enabled
        self.first_bad: torch.Tensor | None = None

    def update(self, x: torch.Tensor, step: int) -> None:
        if not self.enabled:
            return
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=x.device)
        bad = ~torch.isfinite(x).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def check(self) -> None:
        if self.first_bad is None:
            return
        step = int(self.first_bad)  # the one host-device synchronisation, after the loop
        if step >= 0:
            raise _diverged(self.method, step, self.hint)


def check_nonnegative(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return value


def check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_count(value, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def guided_steps(window: tuple[int, int] | None, num_steps: int) -> range:
    """The steps a method guides: ``window = (start, stop)`` as step indices, 0 <= start < stop <= num_steps
    (a negative stop counts from the end, as in Python); None guides every step."""
    if window is None:
        return range(num_steps)
    try:
        start, stop = (int(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be a pair (start, stop) of step indices, got {window!r}") from None
    if stop < 0:
        stop += num_steps
    if not 0 <= start < stop <= num_steps:
        raise ValueError(f"guided window {tuple(window)} lies outside the schedule of {num_steps} steps: "
                         f"need 0 <= start < stop <= {num_steps}")
    return range(start, stop)


class CountingModel:
    """A view of a flow model that counts velocity evaluations; every other attribute is the model's."""

    def __init__(self, model):
        self.model = model
        self.nfe = 0

    def velocity(self, *args, **kwargs) -> torch.Tensor:
        self.nfe += 1
        return self.model.velocity(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def measurement_batch_size(objective, batch_size: int | None, latents) -> int | None:
    """The batch a method runs when the caller gives none: one restoration per measurement when a
    MeasurementFidelity holds several (a batch-1 y is shared by all samples); else ``batch_size`` unchanged."""
    from ..objectives import MeasurementFidelity

    if batch_size is None and latents is None and isinstance(objective, MeasurementFidelity) \
            and objective.y.shape[0] > 1:
        return objective.y.shape[0]
    return batch_size


def data_term_gain(objective, image_shape: tuple[int, ...], device: torch.device | str = "cpu") -> float:
    """L = ‖A‖² (:func:`operators.base.operator_gain`) of a pixel-space :class:`MeasurementFidelity` with a linear
    operator: its gradient 2 Aᵀ(A x − y) is 2L-Lipschitz, so a step γ / L suits masks (L = 1) and SR×f (L ≈ 1/f²)
    alike, as the 1/L step of proximal-gradient methods. 1 for every other objective (latent-space fidelity,
    nonlinear operators, classifiers, rewards), whose gradient A does not scale."""
    from ..objectives import MeasurementFidelity

    if isinstance(objective, MeasurementFidelity) and objective.space == "pixel":
        return operator_gain(objective.operator, tuple(image_shape), device)
    return 1.0


def initial_image(operator, y: torch.Tensor, image_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A data-consistent starting image A⁺y (FLAIR's initialisation, the pseudo-inverse floor): the operator's
    pseudo-inverse when it has a cheap one (SR, inpainting's zero fill); else y itself when A keeps the image
    shape (deblurring); else Aᵀy scaled so that a constant image keeps its level (Aᵀy / mean(AᵀA 1), ≈ Aᵀy · f²
    for SR×f)."""
    linear = getattr(operator, "is_linear", False)
    if image_shape is None:
        image_shape = operator.input_shape(tuple(y.shape)) if linear else tuple(y.shape)
    image_shape = (y.shape[0], *tuple(image_shape)[1:])
    if linear and getattr(operator, "has_pseudo_inverse", False):
        return operator.pseudo_inverse(y)
    if tuple(y.shape) == image_shape:
        return y.clone()
    if linear:
        ones = torch.ones((1, *image_shape[1:]), device=y.device, dtype=y.dtype)
        return operator.adjoint(y) / operator.adjoint(operator(ones)).mean().clamp_min(1e-12)
    raise ValueError(f"cannot form FLAIR's initial image for {type(operator).__name__}: it changes the image shape "
                     f"and has neither an adjoint nor a pseudo-inverse; use an operator that has one")
