"""A flowsteer flow model and guidance method as a deepinv reconstructor: ``x_hat = model(y, physics)``.

deepinv (Tachella et al., "DeepInverse: a Python package for solving imaging inverse problems with deep learning",
2025) evaluates reconstruction models as ``deepinv.models.Reconstructor`` modules (``deepinv/models/base.py``)
called on a measurement y₀₁ and its physics, on images in [0, 1]. The reconstructor here bridges the physics with
:func:`operators.from_deepinv`, maps the measurement to [-1, 1] units (y = 2 y₀₁ − A(1), noise σ doubled), runs the
method on :class:`~guidance.objectives.MeasurementFidelity` and returns (x̂ + 1) / 2.

deepinv is imported on first use only: the class subclasses ``deepinv.models.Reconstructor``, so it is built inside
:func:`flowsteer_reconstructor` (once per process) rather than at import.
"""

from __future__ import annotations

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
        """``model(y, physics, generator=None)`` → x̂ in [0, 1]: a flowsteer guidance method restoring y₀₁ = A(x₀₁) + n.

        The flow model is held as is (flow models are not ``nn.Module`` objects; move it with its own ``to``). Each
        call without a generator draws from ``torch.Generator().manual_seed(seed)``, so repeated calls agree.
        """

        def __init__(self, model, method: str, num_steps: int, seed: int, options: dict, objective: dict,
                     img_size, dagger: str):
            super().__init__()
            from ..methods import get_method

            self.flow_model = model
            self.method, self.num_steps, self.seed = method, num_steps, seed
            self.options, self.objective = dict(options), dict(objective)
            self.img_size, self.dagger = img_size, dagger
            self.run = get_method(method, **self.options)  # unknown methods and options fail here

        def forward(self, y: torch.Tensor, physics, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
            from operators.deepinv_bridge import from_deepinv

            from ..objectives import MeasurementFidelity

            if kwargs:
                raise ValueError(f"the flowsteer reconstructor takes (y, physics, generator=None), got the extra "
                                 f"argument(s) {sorted(kwargs)}")
            if generator is None:
                generator = torch.Generator().manual_seed(self.seed)
            elif not isinstance(generator, torch.Generator):
                raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            op = from_deepinv(physics, img_size=self.img_size, dagger=self.dagger)
            measurement = op.measurement_from_deepinv(y)
            _, _, height, width = op.input_shape(tuple(measurement.shape))
            fidelity = MeasurementFidelity(op, measurement, **self.objective)
            result = self.run(self.flow_model, fidelity, num_steps=self.num_steps, height=height, width=width,
                              generator=generator, progress=False, output_type="pt")
            return ((result.image + 1) / 2).to(device=y.device, dtype=y.dtype)

        def extra_repr(self) -> str:
            return f"method={self.method!r}, num_steps={self.num_steps}, seed={self.seed}, options={self.options}"

    _CLASS.append(FlowsteerReconstructor)
    return FlowsteerReconstructor


def flowsteer_reconstructor(model, method: str = "flair", *, num_steps: int = 28, seed: int = 0,
                            options: dict[str, Any] | None = None, objective: dict[str, Any] | None = None,
                            img_size: tuple[int, int, int] | None = None, dagger: str = "auto"):
    """A ``deepinv.models.Reconstructor`` running flowsteer's ``method`` on ``model``: ``x_hat = rec(y, physics)``.

    Args:
        model: a flowsteer flow model (:class:`~guidance.backbones.base.FlowModel`) whose images have the physics' input
            shape.
        method: a registered method name (:func:`guidance.methods.list_methods`), e.g. ``"flair"``, ``"flowchef"``.
        num_steps: sampling steps.
        seed: the seed of the generator drawn from when a call passes none.
        options: the method's options (:func:`guidance.methods.get_method`), e.g. ``{"normalize_step": True}``.
        objective: :class:`~guidance.objectives.MeasurementFidelity` keyword arguments (``weight``, ``reduction``,
            ``noise_std``, ``space``).
        img_size, dagger: passed to :func:`operators.from_deepinv` with each call's physics.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return _reconstructor_class()(model, method, num_steps, seed, options or {}, objective or {}, img_size, dagger)
