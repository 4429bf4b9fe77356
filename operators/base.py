"""Forward models y = A(x) + n on images (float tensors in [-1, 1], NCHW).

``op(x)`` is the noiseless, differentiable A(x); ``op.measure(x, generator)`` draws the operator's noise once.
Linear operators add ``adjoint`` (A^T) and, where cheap, ``pseudo_inverse`` (A^+), as in deepinv's
``LinearPhysics``.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import weakref
from collections import OrderedDict

import torch
from torch import nn

from .checks import check_generator, check_noise_std
from .conjugate_gradient import cgls, conjugate_gradient
from .noise import poisson, randn_like

_MISSING = object()


def check_finite(x: torch.Tensor, name: str = "x") -> None:
    """Raise a ValueError when ``x`` holds NaN or inf (one host-device synchronisation)."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s); clean or clamp the input first")


def check_image(x: torch.Tensor, name: str = "x", channels: int | None = None) -> None:
    """Raise a ValueError unless ``x`` is a floating 4-D (batch, channels, height, width) tensor."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        hint = "; add a batch dimension with x.unsqueeze(0)" if x.ndim == 3 else ""
        raise ValueError(
            f"{name} must be a 4-D tensor (batch, channels, height, width), got shape {tuple(x.shape)}{hint}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor in [-1, 1], got dtype {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")


def with_channels(unit: torch.Tensor, channels: int | None) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] with ``channels`` channels (BT.601 luma of colour, or grey replicated; None: as it
    is)."""
    if unit.shape[1] == 3 and channels == 1:
        return (unit * torch.tensor([0.299, 0.587, 0.114], device=unit.device).reshape(1, 3, 1, 1)).sum(1, True)
    if unit.shape[1] == 1 and channels == 3:
        return unit.expand(-1, 3, -1, -1).contiguous()
    return unit


def _unit_float(image) -> torch.Tensor:
    """(H, W, C) float32 in [0, 1] from a PIL image in mode L, RGB, I, I;16 or F."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        image = image.convert("I")
    raw = torch.frombuffer(bytearray(image.tobytes()), dtype={"L": torch.uint8, "RGB": torch.uint8,
                                                             "I": torch.int32, "F": torch.float32}[image.mode])
    scale = {"L": 255.0, "RGB": 255.0, "I": 65535.0, "F": 1.0}[image.mode]
    return (raw.to(torch.float32) / scale).reshape(image.height, image.width, -1).clamp(0, 1)


def _pil_unit(image, channels: int | None) -> torch.Tensor:
    """(1, channels, H, W) in [0, 1] from a PIL image: EXIF orientation applied; 8-bit modes / 255, 16- and 32-bit
    integer modes / 65535, mode "F" as [0, 1]; transparency composited over white."""
    from PIL import Image, ImageOps

    if image.width == 0 or image.height == 0:
        raise ValueError(f"the PIL image is empty ({image.height}x{image.width} pixels); pass an image of at least "
                         f"1x1 pixels")
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    if image.mode not in ("L", "RGB", "I", "F") and not image.mode.startswith("I;16"):
        image = image.convert("RGB")
    return with_channels(_unit_float(image).permute(2, 0, 1)[None], channels)


def _array_unit(array, channels: int | None) -> torch.Tensor:
    """(B, channels, H, W) in [0, 1] from a NumPy array as diffusers takes one: (H, W), (H, W, C) or (B, H, W, C),
    uint8 / uint16 (divided by 255 / 65535), bool, or float in [0, 1]; C = 1, 3 or 4 (alpha over white)."""
    import numpy as np

    if array.size == 0:
        raise ValueError(f"the NumPy image is empty (shape {array.shape}, no pixels); pass an image of at least "
                         f"1x1 pixels, e.g. (H, W, 3) uint8")
    if array.dtype == np.uint8 or array.dtype == np.uint16 or array.dtype == bool:
        unit = torch.from_numpy(array.astype(np.float32) / {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0,
                                                            np.dtype(bool): 1.0}[array.dtype])
    elif np.issubdtype(array.dtype, np.floating):
        unit = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        low, high = float(unit.min()), float(unit.max())
        if not (low >= -1e-6 and high <= 1 + 1e-6):
            raise ValueError(f"a float NumPy image is taken in [0, 1] (as diffusers takes it), got values in "
                             f"[{low:.3g}, {high:.3g}]; scale it, or pass a uint8 array")
    else:
        raise ValueError(f"a NumPy image must be uint8, uint16, bool or float, got dtype {array.dtype}")
    if unit.ndim == 2:
        unit = unit[..., None]
    if unit.ndim == 3:
        unit = unit[None]
    if unit.ndim != 4 or unit.shape[-1] not in (1, 3, 4):
        raise ValueError(f"a NumPy image must have shape (H, W), (H, W, C) or (B, H, W, C) with C = 1, 3 or 4, got "
                         f"{array.shape}")
    if unit.shape[-1] == 4:
        unit = unit[..., :3] * unit[..., 3:] + (1 - unit[..., 3:])
    return with_channels(unit.clamp(0, 1).permute(0, 3, 1, 2), channels)


def is_pil_or_array(source) -> bool:
    """Whether ``source`` is a PIL image or a NumPy array."""
    from PIL import Image

    return isinstance(source, Image.Image) or (type(source).__module__ == "numpy" and hasattr(source, "dtype"))


def image_input(source, channels: int | None = None) -> torch.Tensor:
    """A PIL image (B = 1) or a NumPy array in diffusers' convention (uint8 / uint16 / bool, or float in [0, 1];
    (H, W[, C]) or (B, H, W, C)) as a contiguous (B, C, H, W) float32 tensor in [-1, 1], by the rules of
    :func:`guidance.loading.images.image_tensor` (which converts through this). ``channels``: 1 reduces colour
    to BT.601 luma, 3 replicates grey, None keeps the image's own (1 for grey, 3 for colour)."""
    if channels not in (1, 3, None):
        raise ValueError(f"channels must be 1, 3 or None (the image's own), got {channels!r}")
    if not is_pil_or_array(source):
        raise ValueError(f"cannot read an image from a {type(source).__name__}: pass a PIL image, a NumPy array or "
                         f"a tensor")
    unit = _array_unit(source, channels) if type(source).__module__ == "numpy" else _pil_unit(source, channels)
    return (unit * 2 - 1).contiguous()


class Operator(nn.Module):
    """A forward model y = A(x) + n.

    Subclasses implement :meth:`A` (the noiseless A) and, when the image size matters,
    :meth:`_check_size`.

    Args:
        noise_std: standard deviation of additive Gaussian noise in [-1, 1] units (0: none).
        poisson_rate: photon count at full scale; when given, the measurement is Poisson shot noise
            ``Poisson(rate * (A(x) + 1) / 2) / rate`` mapped back to [-1, 1], before the Gaussian noise.
    """

    is_linear: bool = False
    in_channels: int | None = None
    #: True when A maps images in [-1, 1] to measurements in about [-1, 1] (resampling, blur, masks, JPEG), so that
    #: a measurement far outside is refused as a scale mistake; False for functions and foreign physics.
    measures_image_range: bool = True
    #: True when A sets some entries to 0 whatever x is (an inpainting hole); :meth:`measured_for` says which.
    structural_zeros: bool = False

    def __init__(self, noise_std: float = 0.0, poisson_rate: float | None = None):
        super().__init__()
        if not isinstance(noise_std, (int, float)) or not math.isfinite(noise_std) or noise_std < 0:
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        check_noise_std(noise_std)  # far beyond the [-1, 1] image range: a typo or 0-255 units, refused here
        if poisson_rate is not None and (
            not isinstance(poisson_rate, (int, float)) or not math.isfinite(poisson_rate) or poisson_rate <= 0
        ):
            raise ValueError(f"poisson_rate must be None or a finite number > 0, got {poisson_rate!r}")
        self.noise_std = float(noise_std)
        self.poisson_rate = None if poisson_rate is None else float(poisson_rate)

    # -- the forward model --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A(x), noiseless and differentiable; ``x`` a (B, C, H, W) tensor in [-1, 1], or a PIL image or NumPy array
        (:meth:`convert_input`)."""
        x = self.convert_input(x)
        self.check_input(x)
        return self.A(x)

    def convert_input(self, x):
        """``x`` itself, or a PIL image / NumPy array (diffusers' convention) as a float32 (B, C, H, W) tensor in
        [-1, 1] (:func:`image_input`) with the operator's channels (the image's own when it takes any), on the
        device of the operator's tensors."""
        if isinstance(x, torch.Tensor) or not is_pil_or_array(x):
            return x
        where = next((t.device for t in (*self.parameters(), *self.buffers())), torch.device("cpu"))
        return image_input(x, self.in_channels).to(where)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def measure(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """y = A(x) + n, with the noise drawn once from ``generator``.

        Entries that A sets to 0 whatever x is (:meth:`measured_for` False there, e.g. an inpainting hole) carry
        no data and stay exactly 0: the noise is drawn for every entry (the same draws whatever the mask) and
        kept only where something is measured.
        """
        x = self.convert_input(x)
        self.check_input(x)
        check_finite(x, "x")
        check_generator(generator, batch=x.shape[0])
        clean = self.A(x)
        y = clean
        if self.poisson_rate is not None:
            counts = poisson(self.poisson_rate * ((y + 1) / 2).clamp_min(0), generator)
            y = 2 * counts.to(y.dtype) / self.poisson_rate - 1
        if self.noise_std > 0:
            y = y + self.noise_std * randn_like(y, generator)
        if y is not clean:
            measured = self.measured_for(x)
            if measured is not None:
                y = torch.where(measured, y, torch.zeros_like(y))
        return y

    def measured_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """A boolean tensor broadcastable to A(x): True where the measurement entry depends on x, False where
        A x = 0 for every x (a structural zero, which :meth:`measure` leaves noiseless). None: every entry."""
        return None

    # -- input checks -------------------------------------------------------------------------------
    def check_measurement(self, y: torch.Tensor) -> None:
        """Raise a ValueError unless ``y`` can be a measurement of this operator (here: a floating 4-D image
        batch; operators with other measurements override this)."""
        check_image(y, "y")

    def check_input(self, x: torch.Tensor) -> None:
        """Shape checks only (no host-device synchronisation), so that A is cheap inside solver loops."""
        check_image(x, "x", self.in_channels)
        self._check_size(x.shape[-2], x.shape[-1])

    def _check_size(self, height: int, width: int) -> None:
        """Raise a ValueError when an image of this size does not fit the operator."""

    def spec_arguments(self) -> dict | None:
        """The constructor arguments that rebuild this operator, read from its attributes of the same names;
        None when one is not kept (see :func:`operators.operator_spec`)."""
        arguments = {}
        for name, parameter in inspect.signature(type(self).__init__).parameters.items():
            if name == "self" or parameter.kind is not parameter.POSITIONAL_OR_KEYWORD:
                continue
            value = getattr(self, name, _MISSING)
            if value is _MISSING:
                return None
            arguments[name] = value
        return arguments

    def extra_repr(self) -> str:
        parts = []
        if self.noise_std:
            parts.append(f"noise_std={self.noise_std}")
        if self.poisson_rate is not None:
            parts.append(f"poisson_rate={self.poisson_rate}")
        return ", ".join(parts)


class LinearOperator(Operator):
    """A linear forward model: adds the adjoint A^T and, where cheap, the pseudo-inverse A^+.

    The default adjoint is the vector-Jacobian product of A (exact for any linear A, whatever its boundary
    handling); subclasses override :meth:`A_adjoint` with a closed form where one is cheaper.
    """

    is_linear = True

    def input_shape(self, output_shape: torch.Size) -> tuple[int, ...]:
        """Shape of x for a measurement of ``output_shape`` (same shape unless overridden)."""
        return tuple(output_shape)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """A^T y."""
        self.check_measurement(y)
        return self.A_adjoint(y)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = torch.zeros(self.input_shape(y.shape), dtype=y.dtype, device=y.device, requires_grad=True)
            out = self.forward(x)
            if out.shape != y.shape:
                raise ValueError(f"y has shape {tuple(y.shape)} but A maps to shape {tuple(out.shape)}")
            (g,) = torch.autograd.grad(out, x, grad_outputs=y, create_graph=y.requires_grad)
        return g

    @property
    def has_pseudo_inverse(self) -> bool:
        return type(self).A_dagger is not LinearOperator.A_dagger

    def pseudo_inverse(self, y: torch.Tensor, regularization: float | str = "exact") -> torch.Tensor:
        """A⁺y, a right inverse on the range of A (A(A⁺(A x)) = A x), or a regularised form of it for noisy
        measurements: the exact A⁺ amplifies the noise along the directions A barely sees (a blur's high
        frequencies; the exact A⁺ of a noisy deepinv ``Blur`` at 64 px is below 0 dB). The methods start from the
        exact A⁺ (:func:`guidance.methods.common.initial_image`), as the official codes they are checked against do.

        Args:
            regularization: ``"exact"`` (default) or 0: the exact A⁺; ``"auto"``: for a noisy operator
                (``noise_std`` > 0 or a ``poisson_rate``) the least-squares iteration stopped at the noise level
                (:meth:`A_dagger_discrepancy`; 26-30 dB where the exact A⁺ of a noisy 64 px blur is below 0 dB),
                for a noiseless one the exact A⁺; a number λ > 0: the Tikhonov form (AᵀA + λI)⁻¹Aᵀy
                (:meth:`A_dagger_tikhonov`).
        """
        self.check_measurement(y)
        if regularization == "auto":
            regularization = "exact" if self.noise_variance() == 0 else "discrepancy"
        elif regularization != "exact" and (isinstance(regularization, bool)
                                            or not isinstance(regularization, (int, float))
                                            or not math.isfinite(regularization) or regularization < 0):
            raise ValueError(f"regularization must be 'auto', 'exact' or a finite number >= 0 (a Tikhonov weight; 0: "
                             f"exact), got {regularization!r}")
        if regularization in ("exact", 0) or not self.has_pseudo_inverse:  # the latter raises, naming alternatives
            return self.A_dagger(y)
        if regularization == "discrepancy":
            return self.A_dagger_discrepancy(y)
        return self.A_dagger_tikhonov(y, float(regularization))

    def noise_variance(self) -> float:
        """σ² of one measured entry: noise_std² plus, with a ``poisson_rate`` r, 2 / r (the variance of the Poisson
        term at mid-grey, 4 · 0.5 / r in [-1, 1] units); 0 for a noiseless operator."""
        return self.noise_std**2 + (2 / self.poisson_rate if self.poisson_rate is not None else 0.0)

    def A_dagger_discrepancy(self, y: torch.Tensor, max_iters: int = 300) -> torch.Tensor:
        """The regularised pseudo-inverse of a noisy measurement: conjugate gradients on AᵀA x = Aᵀy from 0 (CGLS,
        :func:`~operators.conjugate_gradient.cgls`) stopped per sample once ‖A x − y‖² ≤ σ² · (the measured entries,
        :func:`measured_entries`; an inpainting hole is noiseless), the discrepancy principle, σ² =
        :meth:`noise_variance`. It needs no weight: where A is well conditioned (masks, SR) it reaches A⁺y within
        the noise in a few iterations (one for a 0/1 mask or the identity), where A is not (blur) it stops before
        fitting the noise (deepinv ``Blur`` σ 1-2 px, σ₀₁ 0.01-0.05, 64 px: 23.7-29.9 dB, above the blurred y)."""
        entries = measured_entries(self, self.input_shape(tuple(y.shape)), y.device)
        threshold = torch.full((y.shape[0],), self.noise_variance(), dtype=y.dtype, device=y.device) * entries
        x, _ = cgls(self.A, self.A_adjoint, y, threshold, max_iters=max_iters)
        return x

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} offers no cheap pseudo-inverse; use adjoint(), A_dagger_cg(y) (conjugate "
            f"gradients on A Aᵀ, for a well-conditioned A) or a least-squares solver"
        )

    def A_dagger_cg(self, y: torch.Tensor, max_iters: int = 100, rtol: float | None = None) -> torch.Tensor:
        """A^+ y = A^T (A A^T)^{-1} y by conjugate gradients on the normal equations of the second kind.

        Exact (to ``rtol``) when A A^T is well conditioned, e.g. anti-aliased downsampling.
        """
        if rtol is None:
            rtol = 1e-10 if y.dtype == torch.float64 else 1e-6
        u, _ = conjugate_gradient(lambda p: self.A(self.A_adjoint(p)), y, max_iters=max_iters, rtol=rtol)
        return self.A_adjoint(u)

    def A_dagger_tikhonov(self, y: torch.Tensor, weight: float, max_iters: int = 300,
                          rtol: float | None = None) -> torch.Tensor:
        """x_λ = (AᵀA + λI)⁻¹Aᵀy, λ = ``weight`` > 0, by conjugate gradients from 0: the Tikhonov-regularised
        pseudo-inverse (:meth:`pseudo_inverse` with ``regularization=λ``; λ = σ² / τ² is the MAP estimate under the
        prior x ~ N(0, τ² I)). The system is conditioned at worst (‖A‖² + λ) / λ, so it converges in about
        √(‖A‖² / λ) iterations whatever A's null space; ``max_iters`` caps it (an unfinished solve is smoother
        still: conjugate gradients fit the strong directions of A first). Subclasses with a closed form (an SVD)
        override it."""
        if not weight > 0:
            raise ValueError(f"the Tikhonov weight must be > 0 (0 is the exact pseudo-inverse A_dagger), got {weight!r}")
        if rtol is None:
            rtol = 1e-10 if y.dtype == torch.float64 else 1e-6
        x, _ = conjugate_gradient(lambda p: self.A_adjoint(self.A(p)) + weight * p, self.A_adjoint(y),
                                  max_iters=max_iters, rtol=rtol)
        return x


#: Seed of the start vector of :func:`operator_gain` (fixed: the same operator and shape give the same gain).
GAIN_SEED = 0
#: Default relative tolerance and iteration cap of :func:`operator_gain`.
GAIN_RTOL = 1e-6
GAIN_MAX_ITERS = 300
_GAIN_PATIENCE = 3  # consecutive Ritz-value increases below rtol before the iteration stops

#: gains by :func:`operator_content` (with shape, device, dtype, tolerance and cap), least recently used dropped first;
#: each entry keeps the callables whose identity its key holds, so that no other object can take their identity
_gain_cache: OrderedDict = OrderedDict()
GAIN_CACHE_SIZE = 64
#: operator -> {tensor name: (weak reference to the tensor, its in-place version, digest of its bytes)}
_digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_SIMPLE = (bool, int, float, str, type(None))


def _simple(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_simple(v) for v in value)
    return isinstance(value, _SIMPLE)


def _frozen(value):
    """A plain value with its lists as tuples (hashable, for the cache keys)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (tuple, list)) else value


def tensor_version(tensor: torch.Tensor) -> int:
    """The in-place version counter of ``tensor``; -1 for an inference tensor, which keeps none (it cannot be
    edited in place outside ``torch.inference_mode``)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


def _module_attributes(operator: nn.Module, callables: list | None = None) -> list:
    """Every submodule's name, type and public plain attributes (``factor``, ``padding``, ``is_linear`` ...;
    callables by identity, appended to ``callables`` when given)."""
    state = []
    for prefix, module in operator.named_modules():
        attributes = []
        for key, value in sorted(vars(module).items()):
            if key.startswith("_") or key == "training":
                continue
            if _simple(value):
                attributes.append((key, _frozen(value)))
            elif callable(value) and not isinstance(value, (nn.Module, torch.Tensor)):
                attributes.append((key, id(value)))
                if callables is not None:
                    callables.append(value)
        state.append((prefix, type(module).__qualname__, tuple(attributes)))
    return state


def operator_state(operator: nn.Module) -> tuple:
    """What determines A, instance by instance: every submodule's type and public plain attributes
    (:func:`_module_attributes`) and every buffer and parameter by name, storage, in-place version, shape, dtype and
    device. ``load_state_dict``, an in-place edit, ``.to()`` or a new mask buffer each give a new state."""
    state = _module_attributes(operator)
    for name, tensor in (*operator.named_buffers(), *operator.named_parameters()):
        state.append((name, tensor.data_ptr(), tensor_version(tensor), tuple(tensor.shape), tensor.dtype,
                      str(tensor.device)))
    return tuple(state)


def _digest(operator: nn.Module, name: str, tensor: torch.Tensor) -> str:
    """A hash of ``tensor``'s bytes, computed once per tensor and in-place version (one copy to the host then)."""
    kept = _digests.setdefault(operator, {})
    version = tensor_version(tensor)
    hit = kept.get(name)
    if hit is not None and hit[0]() is tensor and hit[1] == version:
        return hit[2]
    data = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    data = (torch.view_as_real(data) if data.is_complex() else data).reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()
    kept[name] = (weakref.ref(tensor), version, digest)
    return digest


def operator_content(operator: nn.Module) -> tuple[tuple, list]:
    """What determines A, by value: the submodules' types and plain attributes (:func:`_module_attributes`) and
    every buffer and parameter by name, shape, dtype and a hash of its bytes, so that two operators built alike
    (``make_operator("sr:factor=4")`` twice) have the same content and an in-place edit, ``load_state_dict`` or a new
    mask buffer gives a new one. Returns (content, the callables whose identity it holds)."""
    callables: list = []
    content = _module_attributes(operator, callables)
    for name, tensor in (*operator.named_buffers(), *operator.named_parameters()):
        content.append((name, tuple(tensor.shape), tensor.dtype, _digest(operator, name, tensor)))
    return tuple(content), callables


def _gain_dtype(operator) -> torch.dtype:
    """The dtype the operator computes in: that of its first floating parameter or buffer (float32 without one)."""
    tensors = (*operator.parameters(), *operator.buffers()) if isinstance(operator, nn.Module) else ()
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


def _top_eigenvalue(apply, start: torch.Tensor, rtol: float, max_iters: int) -> float:
    """The largest eigenvalue of the symmetric positive semi-definite map ``apply`` by the Lanczos iteration from
    ``start``: the power iteration q, Mq, M²q, … with a Rayleigh–Ritz step over all its iterates (the top
    eigenvalue θ of the tridiagonal T_k = Q_kᵀ M Q_k). θ_k rises monotonically to λ_max; the iteration stops once
    it has risen by at most ``rtol`` · θ three times in a row, when the Krylov space is invariant (β = 0), or
    after ``max_iters`` steps. Only three vectors are kept: without reorthogonalisation, rounding only repeats
    Ritz values that have converged, and the largest stays accurate. Where the top of the spectrum is a dense
    cluster (a blur's low frequencies) the plain power iteration's Rayleigh quotient gains about 1/(2k) per step
    k; the Ritz value needs tens of steps for 1e-6."""

    def dot(a, b):
        return float((a * b).sum(dtype=torch.float64))

    q = start / math.sqrt(dot(start, start))
    q_prev = torch.zeros_like(q)
    alphas: list[float] = []
    betas: list[float] = []
    beta, theta, previous, calm = 0.0, 0.0, None, 0
    for _ in range(max_iters):
        w = apply(q)
        alpha = dot(w, q) / dot(q, q)
        w = w - alpha * q - beta * q_prev
        alphas.append(alpha)
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        theta = float(torch.linalg.eigvalsh(t)[-1])
        beta = math.sqrt(dot(w, w))
        if previous is not None:
            calm = calm + 1 if theta - previous <= rtol * abs(theta) else 0
            if calm >= _GAIN_PATIENCE:
                break
        if not beta > 8 * torch.finfo(q.dtype).eps * max(abs(theta), abs(alpha)):
            break  # the Krylov space is invariant: θ is exact
        previous = theta
        betas.append(beta)
        q_prev, q = q, w / beta
    return theta


def operator_gain(operator, image_shape: tuple[int, ...], device: torch.device | str = "cpu",
                  iters: int | None = None, *, rtol: float = GAIN_RTOL) -> float:
    """‖A‖² = λ_max(AᵀA) for images of ``image_shape`` (its batch size is ignored): 1 for masks and normalised
    blurs with circular borders, a little above 1 with reflecting borders, about 1/f² for SR×f; 1 for nonlinear
    operators and for A = 0 (no scale to normalise by).

    The Lanczos iteration on AᵀA (:func:`_top_eigenvalue`) from a Gaussian image drawn from a
    ``torch.Generator`` seeded with ``GAIN_SEED`` (the same operator and shape always give the same gain), to
    the relative tolerance ``rtol`` or ``iters`` steps (default ``GAIN_MAX_ITERS``), in the dtype of the
    operator's tensors on ``device``. The gain is cached by the operator's content (:func:`operator_content`, its
    attributes and the bytes of its tensors) with the image shape, device, dtype, tolerance and cap: an operator
    built again with the same arguments finds the gain of the first, and the content changes whenever A can (new or
    edited buffers, changed attributes), so a cached value is never stale.
    """
    if not getattr(operator, "is_linear", False):
        return 1.0
    if iters is None:
        iters = GAIN_MAX_ITERS
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters (the most iterations) must be a positive integer, got {iters!r}")
    if not isinstance(rtol, (int, float)) or not 0 < rtol < 1:
        raise ValueError(f"rtol must be a number in (0, 1), got {rtol!r}")
    shape = (1, *tuple(image_shape)[1:])
    device = torch.device(device)
    dtype = _gain_dtype(operator)
    settings = (shape, str(device), dtype, float(rtol), iters)
    cached = isinstance(operator, nn.Module)
    if cached:
        before, keep = operator_content(operator)
        hit = _gain_cache.get((settings, before))
        if hit is not None:
            _gain_cache.move_to_end((settings, before))
            return hit[0]
    start = torch.randn(shape, generator=torch.Generator().manual_seed(GAIN_SEED), dtype=dtype).to(device)
    with torch.no_grad():
        gain = _top_eigenvalue(lambda v: operator.adjoint(operator(v)), start, float(rtol), iters)
    gain = gain if gain > 0 else 1.0
    if cached:  # also under the content after the run, which may have built a mask for this size
        after, more = operator_content(operator)
        for content in dict.fromkeys((before, after)):
            _gain_cache[(settings, content)] = (gain, keep + more)
            _gain_cache.move_to_end((settings, content))
        while len(_gain_cache) > GAIN_CACHE_SIZE:
            _gain_cache.popitem(last=False)
    return gain



def measured_entries(operator, image_shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """How many entries of one measurement y = A(x) of an image of ``image_shape`` depend on x (0-d tensor on
    ``device``, no host read): those :meth:`Operator.measured_for` marks (an inpainting hole, a structural zero, is
    not measured), every entry without structural zeros. A noise level σ gives the expected misfit σ² · count (the
    discrepancy principle); ``y.numel()`` would count an inpainting's holes, which FLAIR's official code leaves out
    by measuring y = x[mask] (prs-eth/FLAIR c4f55f7, src/flair/degradations.py ``Inpainting``)."""
    with torch.no_grad():
        probe = torch.zeros((1, *tuple(image_shape)[1:]), device=device, dtype=_gain_dtype(operator))
        shape = operator(probe).shape
        measured = getattr(operator, "measured_for", lambda _: None)(probe)
    if measured is None:
        return torch.tensor(math.prod(shape), device=device)
    return torch.broadcast_to(measured, shape).sum()
