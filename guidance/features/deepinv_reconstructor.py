"""A flowsteer flow model and guidance method as a deepinv reconstructor: ``x_hat = model(y, physics)``.

deepinv (Tachella et al., "DeepInverse: a Python package for solving imaging inverse problems with deep learning",
2025) evaluates reconstruction models as ``deepinv.models.Reconstructor`` modules (``deepinv/models/base.py``)
called on a measurement y₀₁ and its physics, on images in [0, 1]. The reconstructor here bridges the physics with
:func:`operators.from_deepinv`, maps the measurement to [-1, 1] units (y = 2 y₀₁ − A(1), noise σ doubled), runs the
method on :class:`~guidance.objectives.MeasurementFidelity` and returns (x̂ + 1) / 2, after the pixel consistency
that :func:`tasks.restore` applies (the model's recommended consistency steps).

deepinv's calling conventions are kept: ``model(y, physics, seed=..., get_trajectory=True)`` as deepinv's
samplers (``deepinv.sampling.PosteriorDiffusion`` and its ``DPS``, ``deepinv/sampling/diffusion_sde.py``) are
called, returning ``(x, trajectory)`` with the trajectory stacked as (N + 1, B, C, H, W), the initial state first.

deepinv is imported on first use only: the class subclasses ``deepinv.models.Reconstructor``, so it is built inside
:func:`flowsteer_reconstructor` (once per process) rather than at import.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["flowsteer_reconstructor"]

_CLASS: list[type] = []


def _reconstructor_class() -> type:
    if _CLASS:
        return _CLASS[0]
    try:
        import deepinv
    except ImportError:
        raise ImportError("flowsteer_reconstructor needs deepinv: pip install 'flowsteer[deepinv]' "
                          "(deepinv>=0.5)") from None

    class FlowsteerReconstructor(deepinv.models.Reconstructor):
        """``model(y, physics, generator=None, seed=None, get_trajectory=False)`` → x̂ in [0, 1] (with
        ``get_trajectory``: ``(x̂, trajectory)``): a flowsteer guidance method restoring y₀₁ = A(x₀₁) + n.

        The flow model is held as is (flow models are not ``nn.Module`` objects; move it with its own ``to``). A call
        draws from ``generator``, else from ``torch.Generator().manual_seed(seed)`` (deepinv's per-call seed), else
        from the constructor's seed, so repeated calls agree. The trajectory holds the method's states (its
        ``on_step_end`` ``"x"``: x_s for most methods, FLAIR's variational mean mu), decoded and mapped to
        [0, 1] as deepinv maps its own, after the initial noise: (N + 1, B, C, H, W) for N steps, as deepinv's SDE
        solvers stack theirs (their initial state, then one per step).
        """

        def __init__(self, model, method: str, num_steps: int, seed: int, options: dict, objective: dict,
                     img_size, dagger: str, consistency_steps: int | None):
            super().__init__()
            from ..methods import get_method

            self.flow_model = model
            self.method, self.num_steps, self.seed = method, num_steps, seed
            self.options = dict(options)
            self.objective = dict(objective)
            self.img_size, self.dagger = img_size, dagger
            self.consistency_steps = consistency_steps
            self.run = get_method(method, **self.options)  # unknown methods and options fail here

        def forward(self, y: torch.Tensor, physics, generator: torch.Generator | None = None, seed: int | None = None,
                    get_trajectory: bool = False, **kwargs):
            from operators.deepinv_bridge import from_deepinv

            from ..noise import initial_noise
            from ..objectives import MeasurementFidelity
            from .consistency import check_consistency_steps, pixel_consistency

            if kwargs:
                raise ValueError(f"the flowsteer reconstructor takes (y, physics, generator=None, seed=None, "
                                 f"get_trajectory=False), got the extra argument(s) {sorted(kwargs)}")
            if not isinstance(get_trajectory, bool):
                raise ValueError(f"get_trajectory must be True or False, got {get_trajectory!r}")
            if seed is not None:
                if isinstance(seed, bool) or not isinstance(seed, int):
                    raise ValueError(f"seed must be an integer or None, got {seed!r}")
                if generator is not None:
                    raise ValueError("give a seed or a generator, not both: the seed builds the generator")
                generator = torch.Generator().manual_seed(seed)
            elif generator is None:
                generator = torch.Generator().manual_seed(self.seed)
            elif not isinstance(generator, torch.Generator):
                raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            op = from_deepinv(physics, img_size=self.img_size, dagger=self.dagger)
            steps = self._consistency_steps(op, check_consistency_steps)
            measurement = op.measurement_from_deepinv(y)
            _, _, height, width = op.input_shape(tuple(measurement.shape))
            fidelity = MeasurementFidelity(op, measurement, **self.objective)
            states, extra = [], {}
            if get_trajectory:  # the initial noise drawn here as start_state would draw it: the same run follows
                model = self.flow_model
                shape = (measurement.shape[0], *model.latent_shape(height, width))
                extra["latents"] = initial_noise(shape, generator, model.device, model.dtype)
                states.append(model.decode(extra["latents"]))

                def record(step, sigma, state):
                    states.append(model.decode(state["x"]))
                    return state

                extra["on_step_end"] = record
            result = self.run(self.flow_model, fidelity, num_steps=self.num_steps, height=height, width=width,
                              generator=generator, progress=False, output_type="pt", **extra)
            image = result.image.float().clamp(-1, 1)
            if steps:
                image = pixel_consistency(image, op, measurement.to(image.device), noise_std=fidelity.noise_std,
                                          max_steps=steps)
            x = ((image + 1) / 2).to(device=y.device, dtype=y.dtype)
            if not get_trajectory:
                return x
            trajectory = ((torch.stack(states).float().clamp(-1, 1) + 1) / 2).to(device=y.device, dtype=y.dtype)
            return x, trajectory

        def _consistency_steps(self, op, check) -> int:
            """The pixel-consistency steps for this call's operator: the requested ones (refused for a nonlinear
            physics), else the model's recommendation, skipped with a warning where the physics is nonlinear."""
            if self.consistency_steps is not None:
                return check(self.consistency_steps, op, "pass consistency_steps=0 to flowsteer_reconstructor")
            recommended = int((getattr(self.flow_model, "restore_options", None) or {}).get("consistency_steps", 0))
            if recommended and not op.is_linear:
                warnings.warn(f"the model recommends {recommended} pixel-consistency steps, but deepinv's "
                              f"{type(op.physics).__name__} is not linear: restoring without them (pass "
                              f"consistency_steps=0 to silence this)", stacklevel=3)
                return 0
            return recommended

        def extra_repr(self) -> str:
            return (f"method={self.method!r}, num_steps={self.num_steps}, seed={self.seed}, options={self.options}, "
                    f"consistency_steps={self.consistency_steps}")

    _CLASS.append(FlowsteerReconstructor)
    return FlowsteerReconstructor


def flowsteer_reconstructor(model, method: str = "flair", *, num_steps: int = 28, seed: int = 0,
                            options: dict[str, Any] | None = None, objective: dict[str, Any] | None = None,
                            img_size: tuple[int, int, int] | None = None, dagger: str = "auto",
                            consistency_steps: int | None = None):
    """A ``deepinv.models.Reconstructor`` running flowsteer's ``method`` on ``model``: ``x_hat = rec(y, physics)``,
    ``rec(y, physics, seed=0)``, ``x_hat, trajectory = rec(y, physics, get_trajectory=True)``.

    Each call ends as :func:`tasks.restore` does: the method's image is clipped to [-1, 1] and the model's
    recommended pixel consistency follows
    (:func:`guidance.features.consistency.pixel_consistency`: projected Landweber steps x ← clip(x − Aᵀ(A x − y) /
    ‖A‖²) that pull the restoration onto the measurement, stopped at the noise level ‖A x − y‖² ≤ σ² · m
    or when they stagnate; the model card's ``"flowsteer": {"restore_options": {"consistency_steps": ...}}``), which
    removes what the method (and a latent model's decoder) leaves of misfit in the measured entries.

    FLAIR's data steps and the pixel consistency stop at σ² · m, m the entries of y the operator measures
    (:func:`operators.base.measured_entries`: deepinv's ``Inpainting`` leaves its missing pixels at zero, which
    are not counted), as FLAIR's official code counts its y = x[mask].

    Args:
        model: a flowsteer flow model (:class:`~guidance.backbones.base.FlowModel`) whose images have the physics' input
            shape.
        method: a registered method name (:func:`guidance.methods.list_methods`), e.g. ``"flair"``, ``"flowchef"``.
        num_steps: sampling steps.
        seed: the seed of the generator drawn from when a call passes neither a generator nor a seed.
        options: the method's options (:func:`guidance.methods.get_method`), e.g. ``{"normalize_step": True}``.
        objective: :class:`~guidance.objectives.MeasurementFidelity` keyword arguments (``weight``, ``reduction``,
            ``noise_std``, ``space``).
        img_size, dagger: passed to :func:`operators.from_deepinv` with each call's physics.
        consistency_steps: the most pixel-consistency steps after the method; None: the model's recommendation
            (skipped, with a warning, for a nonlinear physics), 0: none.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if consistency_steps is not None:
        from operators.checks import MAX_ITERATIONS, check_int

        check_int(consistency_steps, "consistency_steps", 0, MAX_ITERATIONS)
    return _reconstructor_class()(model, method, num_steps, seed, options or {}, objective or {}, img_size, dagger,
                                  consistency_steps)
