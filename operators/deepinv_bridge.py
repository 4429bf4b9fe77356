"""deepinv physics as flowsteer operators, and flowsteer operators as deepinv physics.

deepinv (Tachella et al., "DeepInverse: a Python package for solving imaging inverse problems with deep learning",
2025; ``deepinv.physics.Physics`` / ``LinearPhysics`` in ``deepinv/physics/forward.py``) works on images in [0, 1];
flowsteer on [-1, 1]. With x₀₁ = (x + 1) / 2 and a deepinv measurement y₀₁ = A(x₀₁) + n, σ(n) = σ₀₁:

* linear A: A(x₀₁) = (A x + A 1) / 2, so y = 2 y₀₁ − A 1 = A x + 2 n. The flowsteer operator is A itself, the
  measurement is mapped by y = 2 y₀₁ − A(1) and the Gaussian noise level doubles, σ = 2 σ₀₁;
* any A (linear or not): A₋₁₁(x) = 2 A((x + 1) / 2) − A(1), with the same measurement map and noise. This is an
  affine change of variables on both sides, hence exact: ‖y − A₋₁₁(x)‖² / (2σ²) = ‖y₀₁ − A(x₀₁)‖² / (2σ₀₁²),
  the same likelihood and the same posterior. For a linear A it reduces to A₋₁₁ = A.

Noise models (``deepinv/physics/noise.py``): ``ZeroNoise`` → none; ``GaussianNoise(σ₀₁)`` → ``noise_std = 2σ₀₁``;
``PoissonNoise(gain, normalize=True)`` → ``poisson_rate = 1 / gain`` and ``PoissonGaussianNoise(gain, σ₀₁)`` →
both, exactly when A maps the constant image 1 to the constant measurement 1 (normalised blurs and downsamplers,
``Denoising``, ``Decolorize``): flowsteer draws Poisson(r (A₋₁₁(x) + 1) / 2) = Poisson(A(x₀₁) / gain) only then
(in general (A₋₁₁(x) + 1) / 2 = A(x₀₁) + (1 − A 1) / 2). Every other noise model, a sensor non-linearity and
batched noise levels are refused. deepinv's ``Inpainting`` and ``MRI`` keep their noise on the sampled entries
only (their ``noise()`` multiplies it by the mask); so does flowsteer's :meth:`Operator.measure`, for the entries
that :meth:`DeepinvOperator.measured_for` marks.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .base import LinearOperator, Operator, check_image

__all__ = ["DeepinvOperator", "from_deepinv", "to_deepinv"]

DAGGERS = ("auto", "deepinv", "cg")
_CLASSES: dict[str, type] = {}


def _deepinv():
    try:
        import deepinv
    except ImportError:
        raise ImportError("the deepinv bridge needs deepinv: pip install 'flowsteer[deepinv]' (deepinv>=0.5)") from None
    return deepinv


def _clone(module: nn.Module) -> nn.Module:
    """A deep copy; deepinv's ``Physics.clone`` copies the torch.Generator objects that ``copy.deepcopy`` refuses."""
    return module.clone() if callable(getattr(module, "clone", None)) else copy.deepcopy(module)


def _sync_dtype_attributes(module: nn.Module) -> None:
    """deepinv physics that record their construction dtype (``CompressedSensing.dtype``, cast to in its adjoint) are
    given the dtype their buffers now have, so that a dtype move reaches their arithmetic too."""
    for sub in module.modules():
        recorded = sub.__dict__.get("dtype")
        if not isinstance(recorded, torch.dtype) or not recorded.is_floating_point:
            continue
        floating = [t.dtype for t in list(sub.parameters()) + list(sub.buffers()) if t.is_floating_point()]
        if floating:
            sub.dtype = floating[0]


def _floating_state(module: nn.Module) -> torch.Tensor | None:
    """The first real floating-point parameter or buffer: its dtype and device are the module's."""
    return next((t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()), None)


def _scalar(value, what: str) -> float:
    value = torch.as_tensor(value)
    if value.numel() != 1:
        raise ValueError(f"{what} holds {value.numel()} values (one per image); a flowsteer operator has one noise "
                         f"level: give the noise model a single number")
    return float(value.reshape(()))


def _maps_one_to_one(module: nn.Module, forward, img_size, what: str) -> None:
    """Raise unless A(1) = 1 on a (1, *img_size) image, the condition for Poisson noise to match exactly; A is
    ``forward(clone, x)`` on a float64 copy of ``module``."""
    if img_size is None:
        raise ValueError(f"{what}: Poisson noise matches flowsteer's poisson_rate only when A maps the constant image "
                         f"1 to 1; pass img_size=(C, H, W) so that this can be checked")
    state = _floating_state(module)
    with torch.no_grad():
        ones = torch.ones((1, *img_size), dtype=torch.float64, device=state.device if state is not None else None)
        out = forward(_clone(module).to(torch.float64), ones)
    if not bool(torch.allclose(out, torch.ones_like(out), rtol=0, atol=1e-6)):
        raise ValueError(f"{what}: A does not map the constant image 1 to 1 (max |A1 − 1| = "
                         f"{float((out - 1).abs().max()):.3g}), so deepinv's Poisson noise P(A(x₀₁) / gain) and "
                         f"flowsteer's P(rate (A(x) + 1) / 2) differ; use Gaussian noise instead")


# -- deepinv -> flowsteer --------------------------------------------------------------------------------------------
class DeepinvOperator(LinearOperator):
    """A deepinv physics as a flowsteer operator on [-1, 1] images (see the module docstring for the value range).

    The physics is a submodule, so ``op.to(...)`` / ``op.double()`` move and cast it; A also follows the dtype and
    device of its input, through a converted copy of the physics kept per (dtype, device) and dropped on every move
    (change the physics' parameters through ``op.physics`` before using other dtypes, or move the operator).

    Measurements keep deepinv's shape when it is (B, C, H, W) (images, MRI's real and imaginary k-space channels,
    sinograms); others become 4-D as flowsteer's measurements are: (B, m) → (B, 1, 1, m), (B, C, m) → (B, C, 1, m),
    (B, C, D, ..., H, W) → (B, C·D·…, H, W). :meth:`measurement_from_deepinv` and :meth:`measurement_to_deepinv`
    convert measurements both ways.

    The pseudo-inverse (``dagger``): ``"deepinv"`` calls the physics' own ``A_dagger``; ``"cg"`` solves
    A Aᵀ u = y by conjugate gradients and returns Aᵀu (:meth:`LinearOperator.A_dagger_cg`); ``"auto"`` takes
    deepinv's where it is exact, namely SVD-based physics (``DecomposablePhysics``: ``Inpainting``, ``MRI``,
    ``BlurFFT``, ``Decolorize``, ``Denoising``; singular values at or below 1e-5 are dropped, as deepinv does),
    ``CompressedSensing`` (a stored ``torch.linalg.pinv``) and flowsteer operators bridged by :func:`to_deepinv`
    that have a pseudo-inverse, and conjugate gradients otherwise (deepinv's ``Blur``, ``Downsampling`` and
    ``Tomography`` default to an iterative least-squares solve with tolerance 1e-4).

    Args:
        physics: a ``deepinv.physics.Physics`` (linear when it is a ``LinearPhysics``).
        img_size: (C, H, W) of the images, when the physics does not record it (``img_size`` of ``Inpainting``,
            ``CompressedSensing``, ``MRI``, ``BlurFFT``); needed to map Poisson noise and to shape the pseudo-inverse
            of vector measurements before any image was seen.
        dagger: ``"auto"``, ``"deepinv"`` or ``"cg"``.
    """

    is_linear = False  # decided per instance
    measures_image_range = False  # any values

    def __init__(self, physics, img_size: tuple[int, int, int] | None = None, dagger: str = "auto"):
        dinv = _deepinv()
        if not isinstance(physics, dinv.physics.Physics):
            raise ValueError(f"from_deepinv takes a deepinv.physics.Physics, got {type(physics).__name__}")
        if dagger not in DAGGERS:
            raise ValueError(f"dagger must be one of {DAGGERS}, got {dagger!r}")
        if img_size is None:
            recorded = getattr(physics, "img_size", None)
            if isinstance(recorded, (tuple, list, torch.Size)) and len(recorded) == 3:
                img_size = recorded
        if img_size is not None:
            if len(tuple(img_size)) != 3 or not all(isinstance(n, int) and n > 0 for n in tuple(img_size)):
                raise ValueError(f"img_size must be (C, H, W), three positive integers, got {img_size!r}")
            img_size = tuple(int(n) for n in img_size)
        linear = isinstance(physics, dinv.physics.LinearPhysics)
        name = type(physics).__name__
        recorded_dtype = physics.__dict__.get("dtype")
        if isinstance(recorded_dtype, torch.dtype) and recorded_dtype.is_complex:
            raise ValueError(f"deepinv's {name} is complex-valued ({recorded_dtype}); flowsteer images and "
                             f"measurements are real: build it with a real dtype, or use a physics that gives real "
                             f"and imaginary parts as channels (as deepinv's MRI does)")
        probe = torch.linspace(-2.0, 2.0, 9)
        sensed = physics.sensor(probe)
        if not isinstance(sensed, torch.Tensor) or not torch.equal(sensed, probe):
            raise ValueError(f"deepinv's {name} has a sensor non-linearity (sensor_model), which flowsteer operators "
                             f"do not model; wrap physics.A in a flowsteer function operator instead")
        noise_std, poisson_rate = _noise_levels(physics, dinv, linear, img_size)
        super().__init__(noise_std=noise_std, poisson_rate=poisson_rate)
        self.img_size = img_size
        self.is_linear = linear
        self.physics = physics
        self.dagger = dagger
        self.exact_dagger = self.is_linear and self._has_exact_dagger(physics, dinv)
        self.uses_deepinv_dagger = self.is_linear and (dagger == "deepinv" or (dagger == "auto" and self.exact_dagger))
        masked = (dinv.physics.Inpainting.noise, dinv.physics.MRI.noise)
        bridged = [cls for cls in _CLASSES.values() if isinstance(physics, cls)]
        self._mask_sampled = type(physics).noise in masked
        if type(physics).noise not in (dinv.physics.Physics.noise, *masked, *(cls.noise for cls in bridged)) \
                and (noise_std > 0 or poisson_rate is not None):
            raise ValueError(f"deepinv's {name} shapes its noise in its own noise() method, which flowsteer does not "
                             f"reproduce; set physics.noise_model = deepinv.physics.ZeroNoise() before bridging and "
                             f"add the noise to the measurement yourself")
        self._shapes: dict[tuple, tuple[tuple, tuple]] = {}  # flowsteer measurement shape -> (deepinv's, image's)
        self._converted: dict[tuple, nn.Module] = {}

    # -- construction helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _has_exact_dagger(physics, dinv) -> bool:
        if isinstance(physics, (dinv.physics.DecomposablePhysics, dinv.physics.CompressedSensing)):
            return True
        bridged = _CLASSES.get("linear")
        return bridged is not None and isinstance(physics, bridged) and bool(physics.operator.has_pseudo_inverse)

    # -- dtype, device and copies ------------------------------------------------------------------------------
    def _apply(self, *args, **kwargs):
        self._converted = {}
        result = super()._apply(*args, **kwargs)
        _sync_dtype_attributes(self.physics)
        return result

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        memo[id(self.physics)] = _clone(self.physics)
        for key, value in self.__dict__.items():
            new.__dict__[key] = {} if key == "_converted" else copy.deepcopy(value, memo)
        return new

    def _physics_for(self, t: torch.Tensor) -> nn.Module:
        """The physics in the dtype and on the device of ``t`` (itself when they match)."""
        tensors = list(self.physics.parameters()) + list(self.physics.buffers())
        if all(s.device == t.device and (s.dtype == t.dtype or not s.is_floating_point()) for s in tensors):
            return self.physics
        key = (t.dtype, t.device)
        if key not in self._converted:
            converted = _clone(self.physics).to(device=t.device, dtype=t.dtype)
            _sync_dtype_attributes(converted)
            self._converted[key] = converted
        return self._converted[key]

    # -- measurement shapes ------------------------------------------------------------------------------------
    def _to_layout(self, y, image_shape: tuple) -> torch.Tensor:
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"deepinv's {type(self.physics).__name__} returned {type(y).__name__}; only single-tensor "
                             f"measurements can be bridged (not stacked physics)")
        if y.is_complex():
            raise ValueError(f"deepinv's {type(self.physics).__name__} returns complex measurements; flowsteer "
                             f"measurements are real: use a physics that gives real and imaginary parts as channels "
                             f"(as deepinv's MRI does)")
        native = tuple(y.shape[1:])
        if len(native) == 1:
            layout = (1, 1, native[0])
        elif len(native) == 2:
            layout = (native[0], 1, native[1])
        elif len(native) == 3:
            layout = native
        else:
            layout = (math.prod(native[:-2]), native[-2], native[-1])
        self._shapes[layout] = (native, tuple(image_shape[1:]))
        return y if layout == native else y.reshape(y.shape[0], *layout)

    def _native(self, y: torch.Tensor) -> torch.Tensor:
        """A flowsteer measurement in deepinv's shape."""
        native = self._native_shape(tuple(y.shape[1:]))
        return y if native == tuple(y.shape[1:]) else y.reshape(y.shape[0], *native)

    def _native_shape(self, layout: tuple) -> tuple:
        if layout not in self._shapes and self.img_size is not None:
            with torch.no_grad():
                state = _floating_state(self.physics)
                probe = torch.zeros((1, *self.img_size), dtype=state.dtype if state is not None else None,
                                    device=state.device if state is not None else None)
                self.A(probe)
        if layout in self._shapes:
            return self._shapes[layout][0]
        raise ValueError(f"no image of this operator has been seen with measurements of shape (B, "
                         f"{', '.join(map(str, layout))}): apply the operator to an image first or pass "
                         f"img_size=(C, H, W)")

    def input_shape(self, output_shape) -> tuple[int, ...]:
        layout = tuple(output_shape[1:])
        if layout in self._shapes:
            return (output_shape[0], *self._shapes[layout][1])
        if self.img_size is not None:
            return (output_shape[0], *self.img_size)
        if self.is_linear and len(layout) == 3:  # a 4-D deepinv measurement: the adjoint gives the image shape
            with torch.no_grad():
                state = _floating_state(self.physics)
                zeros = torch.zeros((1, *layout), dtype=state.dtype if state is not None else None,
                                    device=state.device if state is not None else None)
                return (output_shape[0], *self.physics.A_adjoint(zeros).shape[1:])
        return tuple(output_shape)

    def _ones_measurement(self, like: torch.Tensor, image_shape: tuple) -> torch.Tensor:
        """A(1) for a (1, *image_shape) constant image, in deepinv's measurement shape."""
        ones = torch.ones((1, *image_shape[1:]), dtype=like.dtype, device=like.device)
        return self._physics_for(like).A(ones)

    # -- the operator ------------------------------------------------------------------------------------------
    def _check_size(self, height: int, width: int) -> None:
        if self.img_size is not None and (height, width) != self.img_size[1:]:
            raise ValueError(f"deepinv's {type(self.physics).__name__} was built for {self.img_size[1]}x"
                             f"{self.img_size[2]} images, got {height}x{width}; resize the image or rebuild the "
                             f"physics")

    def A(self, x: torch.Tensor) -> torch.Tensor:
        physics = self._physics_for(x)
        if self.is_linear:
            y = physics.A(x)
        else:
            y = 2 * physics.A((x + 1) / 2) - physics.A(torch.ones_like(x[:1]))
        return self._to_layout(y, tuple(x.shape))

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if not self.is_linear:
            raise ValueError(f"deepinv's {type(self.physics).__name__} is not a LinearPhysics: it has no adjoint")
        return self._physics_for(y).A_adjoint(self._native(y))

    @property
    def has_pseudo_inverse(self) -> bool:
        return self.is_linear

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        if not self.is_linear:
            raise ValueError(f"deepinv's {type(self.physics).__name__} is not a LinearPhysics: it has no "
                             f"pseudo-inverse")
        if self.uses_deepinv_dagger:
            return self._physics_for(y).A_dagger(self._native(y))
        return self.A_dagger_cg(y)

    def A_dagger_tikhonov(self, y: torch.Tensor, weight: float, max_iters: int = 300,
                          rtol: float | None = None) -> torch.Tensor:
        """(AᵀA + λI)⁻¹Aᵀy, the regularised pseudo-inverse (:meth:`LinearOperator.pseudo_inverse`): in closed form
        through deepinv's SVD where the pseudo-inverse is deepinv's SVD-based one (``DecomposablePhysics.prox_l2``
        at z = 0, γ = 1 / λ: V (s / (s² + λ)) Uᵀy, no singular value dropped), by conjugate gradients otherwise."""
        if not self.is_linear:
            raise ValueError(f"deepinv's {type(self.physics).__name__} is not a LinearPhysics: it has no "
                             f"pseudo-inverse")
        if self.uses_deepinv_dagger and isinstance(self.physics, _deepinv().physics.DecomposablePhysics):
            if not weight > 0:
                raise ValueError(f"the Tikhonov weight must be > 0 (0 is the exact pseudo-inverse A_dagger), got "
                                 f"{weight!r}")
            return self._physics_for(y).prox_l2(0, self._native(y), 1 / weight)
        return super().A_dagger_tikhonov(y, weight, max_iters, rtol)

    def _bridged(self) -> bool:
        """Whether the physics is a flowsteer operator bridged by :func:`to_deepinv`."""
        return any(isinstance(self.physics, cls) for cls in _CLASSES.values())

    @property
    def structural_zeros(self) -> bool:
        """Whether A has entries that are 0 whatever x is: unsampled entries of the physics' current mask."""
        if self._bridged():
            return bool(getattr(self.physics.operator, "structural_zeros", False))
        mask = getattr(self.physics, "mask", None) if self._mask_sampled else None
        return isinstance(mask, torch.Tensor) and bool((mask == 0).any())

    def measured_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """Where A x depends on x: the sampled entries of ``Inpainting`` and ``MRI`` (mask ≠ 0; deepinv keeps their
        noise there only), those of a bridged flowsteer operator; None for other physics (every entry).
        :meth:`Operator.measure` leaves the other entries noiseless."""
        physics = self._physics_for(x)
        if self._bridged():
            return physics.operator.measured_for(x)
        if not self.structural_zeros:
            return None
        native = physics.A(torch.ones_like(x[:1])).shape
        return self._to_layout(torch.broadcast_to(physics.mask != 0, native), (1, *tuple(x.shape)[1:]))

    # -- measurements in deepinv's units -----------------------------------------------------------------------
    def measurement_from_deepinv(self, y01: torch.Tensor, image_shape: tuple | None = None) -> torch.Tensor:
        """y = 2 y₀₁ − A(1), in flowsteer's measurement shape; ``image_shape`` (B, C, H, W) or (C, H, W) when no
        image has been seen and the physics records no img_size."""
        if not isinstance(y01, torch.Tensor):
            raise ValueError(f"y01 must be a torch.Tensor, got {type(y01).__name__}")
        shape = self._image_shape_for_native(tuple(y01.shape[1:]), image_shape)
        ones = self._ones_measurement(y01, (1, *shape))
        layout_ones = self._to_layout(ones, (1, *shape))
        layout = layout_ones.shape[1:]
        return 2 * y01.reshape(y01.shape[0], *layout) - layout_ones

    def measurement_to_deepinv(self, y: torch.Tensor) -> torch.Tensor:
        """y₀₁ = (y + A(1)) / 2, in deepinv's measurement shape."""
        check_image(y, "y")
        image_shape = self.input_shape(tuple(y.shape))
        ones = self._ones_measurement(y, image_shape)
        return (self._native(y) + ones) / 2

    def _image_shape_for_native(self, native: tuple, image_shape) -> tuple:
        if image_shape is not None:
            return tuple(image_shape)[-3:]
        for seen, image in self._shapes.values():
            if seen == native:
                return image
        if self.img_size is not None:
            return self.img_size
        if self.is_linear and len(native) == 3:
            with torch.no_grad():
                state = _floating_state(self.physics)
                zeros = torch.zeros((1, *native), dtype=state.dtype if state is not None else None,
                                    device=state.device if state is not None else None)
                return tuple(self.physics.A_adjoint(zeros).shape[1:])
        raise ValueError("the image size of this measurement is unknown: pass image_shape=(C, H, W) or img_size= to "
                         "from_deepinv")

    def spec_arguments(self) -> None:
        """None: a deepinv physics is an object no spec string can name."""
        return None

    def extra_repr(self) -> str:
        parts = [f"dagger={'deepinv' if self.uses_deepinv_dagger else 'cg'}"]
        if self.img_size is not None:
            parts.append(f"img_size={self.img_size}")
        rest = super().extra_repr()
        return ", ".join(parts + ([rest] if rest else []))


def _noise_levels(physics, dinv, linear: bool, img_size) -> tuple[float, float | None]:
    """(noise_std, poisson_rate) in [-1, 1] units for the noise model of a deepinv physics (module docstring)."""
    name = type(physics).__name__
    noise = getattr(physics, "noise_model", None)
    kind = type(noise).__name__
    if noise is None or type(noise) is dinv.physics.ZeroNoise:
        return 0.0, None
    if type(noise) is dinv.physics.GaussianNoise:
        return 2 * _scalar(noise.sigma, f"{name}'s GaussianNoise sigma"), None
    if type(noise) in (dinv.physics.PoissonNoise, dinv.physics.PoissonGaussianNoise):
        if type(noise) is dinv.physics.PoissonNoise and not bool(noise.normalize):
            raise ValueError(f"{name}'s PoissonNoise has normalize=False (measurements in counts); flowsteer's "
                             f"poisson_rate gives counts / rate: use normalize=True")
        gain = _scalar(noise.gain, f"{name}'s {kind} gain")
        if not gain > 0:
            raise ValueError(f"{name}'s {kind} has gain {gain}; flowsteer's poisson_rate = 1 / gain needs gain > 0")
        if not linear:
            _refuse_nonlinear_poisson(name, kind)
        _maps_one_to_one(physics, lambda clone, x: clone.A(x), img_size, f"{name} with {kind}")
        sigma = _scalar(noise.sigma, f"{name}'s {kind} sigma") if hasattr(noise, "sigma") else 0.0
        return 2 * sigma, 1 / gain
    raise ValueError(f"deepinv's {kind} (the noise model of {name}) has no flowsteer counterpart: flowsteer operators "
                     f"model additive Gaussian noise (deepinv's GaussianNoise) and Poisson shot noise (PoissonNoise, "
                     f"PoissonGaussianNoise); set physics.noise_model to one of them or to ZeroNoise() before bridging")


def _refuse_nonlinear_poisson(name: str, kind: str) -> None:
    raise ValueError(f"{name} is not linear and carries {kind}: flowsteer's Poisson noise acts on (A(x) + 1) / 2, "
                     f"which equals deepinv's A(x₀₁) only for linear operators with A 1 = 1; use Gaussian noise")


def from_deepinv(physics, img_size: tuple[int, int, int] | None = None, dagger: str = "auto") -> DeepinvOperator:
    """A deepinv ``Physics`` as a flowsteer operator on [-1, 1] images (see :class:`DeepinvOperator`)."""
    return DeepinvOperator(physics, img_size=img_size, dagger=dagger)


# -- flowsteer -> deepinv --------------------------------------------------------------------------------------------
def _physics_classes() -> tuple[type, type]:
    """The deepinv classes of :func:`to_deepinv`, built once deepinv is imported."""
    if not _CLASSES:
        dinv = _deepinv()

        def keep_structural_zeros(physics, y, noisy):
            """deepinv's noise of a flowsteer operator with structural zeros (an inpainting hole): drawn for every
            entry and kept where A x depends on x, as :meth:`Operator.measure` keeps it."""
            operator = physics.operator
            if not getattr(operator, "structural_zeros", False):
                return noisy
            size = getattr(physics, "img_size", None)
            shape = operator.input_shape(tuple(y.shape)) if operator.is_linear else \
                (y.shape[0], *size) if size is not None else tuple(y.shape)
            measured = operator.measured_for(torch.zeros(shape, dtype=y.dtype, device=y.device))
            return noisy if measured is None else torch.where(measured, noisy, torch.zeros_like(noisy))

        class FlowsteerPhysics(dinv.physics.LinearPhysics):
            """A linear flowsteer operator as a deepinv ``LinearPhysics``: the same A and Aᵀ (a linear map is the
            same on [0, 1] and [-1, 1] images, measurements mapped by y₀₁ = (y + A 1) / 2); ``A_dagger`` is the
            operator's pseudo-inverse when it has one, else deepinv's least-squares solve."""

            def __init__(self, operator, noise_model, img_size=None):
                super().__init__(noise_model=noise_model, img_size=img_size)
                self.operator = operator

            def A(self, x, **kwargs):
                return self.operator(x)

            def noise(self, x, **kwargs):
                return keep_structural_zeros(self, x, self.noise_model(x, **kwargs))

            def A_adjoint(self, y, **kwargs):
                return self.operator.adjoint(y)

            def A_dagger(self, y, **kwargs):
                if self.operator.has_pseudo_inverse:
                    return self.operator.pseudo_inverse(y)
                return super().A_dagger(y, **kwargs)

        class FlowsteerNonlinearPhysics(dinv.physics.Physics):
            """A non-linear flowsteer operator A₋₁₁ as a deepinv ``Physics`` on [0, 1] images:
            A(x₀₁) = (A₋₁₁(2 x₀₁ − 1) + A₋₁₁(1)) / 2, the inverse of :func:`from_deepinv`'s map."""

            def __init__(self, operator, noise_model, img_size=None):
                super().__init__(noise_model=noise_model)
                self.operator = operator
                self.img_size = img_size

            def A(self, x, **kwargs):
                return (self.operator(2 * x - 1) + self.operator(torch.ones_like(x[:1]))) / 2

            def noise(self, x, **kwargs):
                return keep_structural_zeros(self, x, self.noise_model(x, **kwargs))

        _CLASSES["linear"], _CLASSES["nonlinear"] = FlowsteerPhysics, FlowsteerNonlinearPhysics
    return _CLASSES["linear"], _CLASSES["nonlinear"]


def to_deepinv(op, img_size: tuple[int, int, int] | None = None, rng: torch.Generator | None = None):
    """A flowsteer operator as a deepinv physics on [0, 1] images: a ``LinearPhysics`` for a linear operator (same A,
    Aᵀ, and A⁺ where the operator has one), a ``Physics`` otherwise (A(x₀₁) = (A₋₁₁(2x₀₁ − 1) + A₋₁₁(1)) / 2).

    The noise becomes deepinv's ``GaussianNoise(σ = noise_std / 2)``; ``poisson_rate`` becomes
    ``PoissonNoise(gain = 1 / rate)`` (or ``PoissonGaussianNoise`` with both) when A maps the constant image 1 to 1,
    checked on an ``img_size`` image (see the module docstring), and is refused otherwise. ``rng`` is the generator
    of deepinv's noise model, so that ``physics(x)`` draws from an explicit generator.

    Args:
        op: a flowsteer operator (or a spec string, see :func:`operators.as_operator`).
        img_size: (C, H, W), recorded as the physics' ``img_size`` (deepinv's adjointness test and automatic adjoints
            read it); needed with ``poisson_rate``.
        rng: optional torch.Generator of the noise model.
    """
    from .registry import as_operator

    dinv = _deepinv()
    op = as_operator(op)
    if not isinstance(op, Operator):  # pragma: no cover - as_operator returns operators only
        raise ValueError(f"to_deepinv takes a flowsteer operator, got {type(op).__name__}")
    if rng is not None and not isinstance(rng, torch.Generator):
        raise ValueError(f"rng must be a torch.Generator or None, got {type(rng).__name__}")
    if img_size is not None:
        img_size = tuple(int(n) for n in img_size)
    sigma = op.noise_std / 2
    if op.poisson_rate is not None:
        if not op.is_linear:
            _refuse_nonlinear_poisson(type(op).__name__, "poisson_rate")
        _maps_one_to_one(op, lambda clone, x: clone(x), img_size, f"{type(op).__name__} with poisson_rate")
        gain = 1 / op.poisson_rate
        noise = dinv.physics.PoissonGaussianNoise(gain=gain, sigma=sigma, rng=rng) if sigma > 0 else \
            dinv.physics.PoissonNoise(gain=gain, rng=rng)
    elif sigma > 0:
        noise = dinv.physics.GaussianNoise(sigma=sigma, rng=rng)
    else:
        noise = dinv.physics.ZeroNoise()
    linear, nonlinear = _physics_classes()
    return (linear if op.is_linear else nonlinear)(op, noise, img_size=img_size)
