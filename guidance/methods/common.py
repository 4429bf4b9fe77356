"""What every guidance method shares: its result, the step window, divergence checks and NFE counting."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from operators.base import operator_gain
from operators.checks import MAX_ITERATIONS, check_flag, check_int, check_number  # noqa: F401 (check_flag: the methods')

from ..loading.images import ImageOutput


@dataclass
class MethodResult(ImageOutput):
    """Output of a guidance method: the final latent ``x`` (float32), the decoded ``image`` (B, C, H, W) in [-1, 1]
    (None with ``decode=False``), the number of network evaluations ``nfe`` (a batched CFG call counts once), the
    ``sigmas`` used and method-specific ``info``. ``images`` is ``image`` as diffusers returns it, per
    ``output_type`` ("pil": a list of PIL images, "np" / "pt": arrays / tensors in [0, 1], "latent": the final
    latent ``x``)."""

    x: torch.Tensor
    image: torch.Tensor | None
    nfe: int
    sigmas: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    output_type: str = "pil"


class DivergenceError(ValueError):
    """The solver state became NaN, infinite, or far larger than any state of unguided sampling."""


#: A state whose per-sample RMS exceeds DIVERGENCE_FACTOR times its reference scale (:func:`reference_scale`)
#: has diverged. Unguided states never come near it: along x_s = (1 − s) x0 + s ε the RMS stays below about
#: max(RMS(x0), RMS(ε)) ≈ the reference itself.
DIVERGENCE_FACTOR = 100.0
#: A finished run whose state went above WARNING_FACTOR times its reference scale (still below the bound) gets a
#: warning: its result is likely far from both the data and the prior (normal guided runs stay below about 5×).
WARNING_FACTOR = 10.0


def state_rms(x: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample root mean square sqrt(mean(x²)), accumulated in float64 so that a finite float32 state
    never overflows to inf (no host read)."""
    flat = x.detach().flatten(1)
    return (torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64) / flat.shape[1] ** 0.5).float()


def data_rms(model) -> float | None:
    """The RMS of the model's data where the model knows it exactly: an analytic Gaussian-mixture prior gives
    sqrt(Σ_k π_k (tr Σ_k + ‖μ_k‖²) / d). None for models that only sample (networks)."""
    from ..analytic.gaussian_mixture import GaussianMixture

    prior = getattr(model, "prior", None)
    if not isinstance(prior, GaussianMixture):
        return None
    second = prior.covariances.diagonal(dim1=-2, dim2=-1).sum(-1) + prior.means.square().sum(-1)
    return float((prior.weights @ second / prior.dim).sqrt())


def reference_scale(model, *states: torch.Tensor) -> torch.Tensor:
    """(B,) the scale a sample's state is measured against: max(1, RMS of the model's data where known
    (:func:`data_rms`), per-sample RMS of each given state). The states are where the method starts (the
    initial noise, with RMS ≈ 1) and the data it is anchored to (FLAIR's E(A⁺y), an edit's source latent), so
    images in [-1, 1] and unit-variance latents get 1, and a model or input of larger scale gets its own."""
    scale = torch.ones((), dtype=torch.float32, device=states[0].device if states else "cpu")
    known = data_rms(model)
    if known is not None:
        scale = scale.clamp_min(known)
    for state in states:
        scale = torch.maximum(scale, state_rms(state).to(scale.device))
    return scale


def beyond_bound(x: torch.Tensor, reference: torch.Tensor,
                 factor: float = DIVERGENCE_FACTOR) -> tuple[torch.Tensor, torch.Tensor]:
    """The divergence test of every guided method: (diverged, rms) with rms = :func:`state_rms` (B,) and
    diverged a 0-d bool tensor, true when some sample's RMS is NaN, infinite or above factor · reference
    (the reference of :func:`reference_scale`). No host read."""
    rms = state_rms(x)
    return ~(rms <= factor * reference.to(rms.device)).all(), rms


class DivergenceMonitor:
    """Watch the state for divergence without synchronising inside the loop: :meth:`update` records, on the
    state's device, the first step at which :func:`beyond_bound` held (NaN / inf, or a per-sample RMS above
    ``factor`` × ``reference``) and the RMS at that step; :meth:`check` reads that once, after the loop (or
    after each step, for loops that synchronise anyway), and raises a :class:`DivergenceError` naming the step,
    the state's scale and ``hint``, the fix; :meth:`finish`, after the loop, checks once more and warns when the
    state went above :data:`WARNING_FACTOR` × its reference without reaching the bound (a run gone far off that
    still finished). ``reference``: (B,) or scalar scales from :func:`reference_scale` (default 1).
    ``enabled=False`` makes all three no-ops."""

    def __init__(self, method: str, hint: str = "use a smaller step size", enabled: bool = True,
                 reference: torch.Tensor | float = 1.0, factor: float = DIVERGENCE_FACTOR):
        self.method, self.hint, self.enabled, self.factor = method, hint, enabled, float(factor)
        self.reference = torch.as_tensor(reference, dtype=torch.float32)
        self.first_bad: torch.Tensor | None = None
        self.rms_at_bad: torch.Tensor | None = None
        self.peak: torch.Tensor | None = None  # the largest RMS / reference so far, and its step
        self.peak_step: torch.Tensor | None = None
        self.watched: dict[str, torch.Tensor] = {}  # what -> the first step it was NaN or infinite (-1: none)

    def watch(self, what: str, step: int, *values: torch.Tensor) -> None:
        """Record, on the device, the first step at which one of ``values`` (what the update depends on, e.g. a
        residual) is NaN or infinite; :meth:`check` names ``what`` when that came no later than the state's own
        divergence."""
        if not self.enabled:
            return
        bad = ~torch.stack([torch.isfinite(v).all() for v in values]).all()
        first = self.watched.get(what)
        if first is None:
            first = torch.full((), -1, dtype=torch.long, device=bad.device)
        self.watched[what] = torch.where(bad & (first < 0), step, first)

    def update(self, x: torch.Tensor, step: int) -> None:
        if not self.enabled:
            return
        if self.first_bad is None:
            self.reference = self.reference.to(x.device)
            self.first_bad = torch.full((), -1, dtype=torch.long, device=x.device)
            self.rms_at_bad = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
            self.peak = torch.zeros((), dtype=torch.float32, device=x.device)
            self.peak_step = torch.zeros((), dtype=torch.long, device=x.device)
        bad, rms = beyond_bound(x, self.reference, self.factor)
        new = bad & (self.first_bad < 0)
        self.first_bad = torch.where(new, step, self.first_bad)
        self.rms_at_bad = torch.where(new, rms, self.rms_at_bad)
        ratio = torch.nan_to_num(rms / self.reference, nan=0.0).max()
        higher = ratio > self.peak
        self.peak = torch.where(higher, ratio, self.peak)
        self.peak_step = torch.where(higher, step, self.peak_step)

    def check(self) -> None:
        state = -1 if self.first_bad is None else int(self.first_bad)  # the host-device synchronisation
        for what, first in self.watched.items():  # a watched quantity first, at the same step
            step = int(first)
            if step >= 0 and not 0 <= state < step:
                raise DivergenceError(f"{self.method} diverged: {what} became NaN or infinite at step {step}; "
                                      f"{self.hint}")
        if state >= 0:
            raise self._error(state)

    def finish(self) -> None:
        """After the loop: :meth:`check`, then a warning when the state's scale went above
        :data:`WARNING_FACTOR` × its reference (naming the scale, the step and ``hint``)."""
        self.check()
        if self.peak is None:
            return
        peak = float(self.peak)
        if peak > WARNING_FACTOR:
            warnings.warn(f"{self.method}: the state's scale reached {peak:.3g}× its reference at step "
                          f"{int(self.peak_step)} (unguided sampling stays near 1×, normal guidance below about 5×), "
                          f"so the result is likely far from both the data and the prior; {self.hint}",
                          UserWarning, stacklevel=2)

    def _error(self, step: int) -> DivergenceError:
        rms = self.rms_at_bad.double().cpu()
        reference = self.reference.double().cpu().expand_as(rms)
        if not bool(torch.isfinite(rms).all()):
            what = "the state became NaN or infinite"
        else:
            worst = int((rms / reference).argmax())
            what = (f"the state's scale (per-sample RMS) reached {float(rms[worst]):.3g}, "
                    f"{float(rms[worst] / reference[worst]):.3g}× its reference scale {float(reference[worst]):.3g} "
                    f"(unguided sampling stays near 1×; the bound is divergence_factor {self.factor:g}×)")
        return DivergenceError(f"{self.method} diverged: {what} at step {step}; {self.hint}")


def is_pixel_model(model) -> bool:
    """True for a model whose state is the image itself (no autoencoder between them): the analytic priors and
    pixel-space networks. Latent models (every diffusers family, the default model) are False."""
    return getattr(model, "spatial_factor", 1) == 1 and getattr(model, "codec", None) is None


#: The solvers that serve latent models, named when a pixel-space method refuses one.
LATENT_SOLVERS = "flowdps, psld, d_flow, flowchef or flair"


def require_pixel_model(model, method: str, why: str, instead: str = LATENT_SOLVERS) -> None:
    """Refuse a latent model, in one line, for a method defined on images only: ``why`` says what the method
    needs in image space, ``instead`` which methods serve latent models."""
    if not is_pixel_model(model):
        raise ValueError(f"{method} works on pixel-space models only ({why}), and {type(model).__name__} is a latent "
                         f"model; use {instead} on latent models")


def require_linear_measurement(objective, method: str, why: str):
    """The objective of a method that applies the operator itself to images (its adjoint, linear solves with it):
    a pixel-space :class:`MeasurementFidelity` with a linear operator; anything else is refused in one line that
    says ``why`` the method needs it."""
    from ..objectives import MeasurementFidelity

    if isinstance(objective, MeasurementFidelity) and objective.space == "pixel" and objective.operator.is_linear:
        return objective
    what = type(objective).__name__ if not isinstance(objective, MeasurementFidelity) else (
        f"a {objective.space}-space fidelity" if objective.space != "pixel"
        else f"a fidelity with the nonlinear {type(objective.operator).__name__}")
    raise ValueError(f"{method} needs a pixel-space MeasurementFidelity with a linear operator ({why}), got {what}; "
                     f"build MeasurementFidelity(linear_operator, y, space='pixel')")


def check_nonnegative(value, name: str) -> float:
    """A finite number >= 0 (:func:`operators.checks.check_number`)."""
    return check_number(value, name, minimum=0)


def check_count(value, name: str, minimum: int = 0, maximum: int | None = MAX_ITERATIONS, fix: str = "") -> int:
    """An integer in ``minimum .. maximum`` (:func:`operators.checks.check_int`; at most
    :data:`~operators.checks.MAX_ITERATIONS` by default, so that every loop it counts ends)."""
    return check_int(value, name, minimum, maximum, fix)


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
