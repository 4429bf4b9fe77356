"""Forward models y = A(x) + n on images (float tensors in [-1, 1], NCHW).

``op(x)`` is the noiseless, differentiable A(x); ``op.measure(x, generator)`` draws the operator's noise once.
Linear operators add ``adjoint`` (A^T) and, where cheap, ``pseudo_inverse`` (A^+), as in deepinv's
``LinearPhysics``.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

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

    def __init__(self, noise_std: float = 0.0, poisson_rate: float | None = None):
        super().__init__()
        if not isinstance(noise_std, (int, float)) or not math.isfinite(noise_std) or noise_std < 0:
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
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
        """y = A(x) + n, with the noise drawn once from ``generator``."""
        self.check_input(x)
        check_finite(x, "x")
        y = self.A(x)
        if self.poisson_rate is not None:
            counts = poisson(self.poisson_rate * ((y + 1) / 2).clamp_min(0), generator)
            y = 2 * counts.to(y.dtype) / self.poisson_rate - 1
        if self.noise_std > 0:
            y = y + self.noise_std * randn_like(y, generator)
        return y

    # -- input checks -------------------------------------------------------------------------------
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
        check_image(y, "y")
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
        check_image(y, "y")
        return self.A_dagger(y)

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} offers no cheap pseudo-inverse; use adjoint() or a least-squares solver"
        )

    def A_dagger_cg(self, y: torch.Tensor, max_iters: int = 100, rtol: float | None = None) -> torch.Tensor:
        """A^+ y = A^T (A A^T)^{-1} y by conjugate gradients on the normal equations of the second kind.

        Exact (to ``rtol``) when A A^T is well conditioned, e.g. anti-aliased downsampling.
        """
        if rtol is None:
            rtol = 1e-10 if y.dtype == torch.float64 else 1e-6
        dims = tuple(range(1, y.ndim))

        def dot(a, b):
            return (a * b).sum(dim=dims, keepdim=True)

        u = torch.zeros_like(y)
        r = y.clone()
        p = r.clone()
        rr = dot(r, r)
        stop = (rtol**2) * rr
        for _ in range(max_iters):
            Ap = self.A(self.A_adjoint(p))
            alpha = rr / dot(p, Ap).clamp_min(torch.finfo(y.dtype).tiny)
            u = u + alpha * p
            r = r - alpha * Ap
            rr_new = dot(r, r)
            if bool((rr_new <= stop).all()):
                break
            p = r + (rr_new / rr.clamp_min(torch.finfo(y.dtype).tiny)) * p
            rr = rr_new
        return self.A_adjoint(u)


def operator_gain(operator, image_shape: tuple[int, ...], device: torch.device | str = "cpu", iters: int = 10) -> float:
    """‖A‖² = the largest eigenvalue of AᵀA (power iteration from a constant image, which is already the top
    eigenvector of blurs and downsamplers): 1 for masks and normalised blurs, about 1/f² for SR×f."""
    if not getattr(operator, "is_linear", False):
        return 1.0
    x = torch.ones((1, *tuple(image_shape)[1:]), device=device)
    gain = 1.0
    for _ in range(iters):
        ax = operator.adjoint(operator(x))
        gain = float((ax * x).sum() / (x * x).sum())
        norm = ax.norm()
        if not norm > 0:
            return 1.0
        x = ax / norm
    return gain if gain > 0 else 1.0
