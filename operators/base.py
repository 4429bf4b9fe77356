"""Forward models y = A(x) + n on images (float tensors in [-1, 1], NCHW).

``op(x)`` is the noiseless, differentiable A(x); ``op.measure(x, generator)`` draws the operator's noise once.
Linear operators add ``adjoint`` (A^T) and, where cheap, ``pseudo_inverse`` (A^+), as in deepinv's
``LinearPhysics``.
"""

from __future__ import annotations

import inspect
import math
import weakref

import torch
from torch import nn

from .checks import check_generator, check_noise_std
from .conjugate_gradient import conjugate_gradient
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
        """A(x), noiseless and differentiable."""
        self.check_input(x)
        return self.A(x)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def measure(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """y = A(x) + n, with the noise drawn once from ``generator``.

        Entries that A sets to 0 whatever x is (:meth:`measured_for` False there, e.g. an inpainting hole) carry
        no data and stay exactly 0: the noise is drawn for every entry (the same draws whatever the mask) and
        kept only where something is measured.
        """
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

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """A^+ y, a right inverse on the range of A: A(A^+(A x)) = A x."""
        self.check_measurement(y)
        return self.A_dagger(y)

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


#: Seed of the start vector of :func:`operator_gain` (fixed: the same operator and shape give the same gain).
GAIN_SEED = 0
#: Default relative tolerance and iteration cap of :func:`operator_gain`.
GAIN_RTOL = 1e-6
GAIN_MAX_ITERS = 300
_GAIN_PATIENCE = 3  # consecutive Ritz-value increases below rtol before the iteration stops

_gain_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_SIMPLE = (bool, int, float, str, type(None))


def _simple(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_simple(v) for v in value)
    return isinstance(value, _SIMPLE)


def tensor_version(tensor: torch.Tensor) -> int:
    """The in-place version counter of ``tensor``; -1 for an inference tensor, which keeps none (it cannot be
    edited in place outside ``torch.inference_mode``)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


def operator_state(operator: nn.Module) -> tuple:
    """What determines A for the gain cache: every submodule's type and public plain attributes (``factor``,
    ``padding``, ``is_linear`` ...; callables by identity) and every buffer and parameter by name, storage,
    in-place version, shape, dtype and device. ``load_state_dict``, an in-place edit, ``.to()`` or a new mask
    buffer each give a new state, so a cached gain never outlives the operator it was computed for."""
    state = []
    for prefix, module in operator.named_modules():
        attributes = []
        for key, value in sorted(vars(module).items()):
            if key.startswith("_") or key == "training":
                continue
            if _simple(value):
                attributes.append((key, value))
            elif callable(value) and not isinstance(value, (nn.Module, torch.Tensor)):
                attributes.append((key, id(value)))
        state.append((prefix, type(module).__qualname__, tuple(attributes)))
    for name, tensor in (*operator.named_buffers(), *operator.named_parameters()):
        state.append((name, tensor.data_ptr(), tensor_version(tensor), tuple(tensor.shape), tensor.dtype,
                      str(tensor.device)))
    return tuple(state)


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
    operator's tensors on ``device``. The gain is cached per operator, keyed on the image shape, device, dtype,
    tolerance and :func:`operator_state`, which changes whenever A can (new or edited buffers, moved tensors,
    changed attributes), so a cached value is never stale.
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
    cache = None
    if isinstance(operator, nn.Module):
        cache = _gain_cache.setdefault(operator, {})
        key = (shape, str(device), dtype, float(rtol), iters, operator_state(operator))
        if key in cache:
            return cache[key]
    start = torch.randn(shape, generator=torch.Generator().manual_seed(GAIN_SEED), dtype=dtype).to(device)
    with torch.no_grad():
        gain = _top_eigenvalue(lambda v: operator.adjoint(operator(v)), start, float(rtol), iters)
    gain = gain if gain > 0 else 1.0
    if cache is not None:  # keyed on the state after the run, which may have built a mask for this size
        if len(cache) > 64:
            cache.clear()
        cache[(shape, str(device), dtype, float(rtol), iters, operator_state(operator))] = gain
    return gain
