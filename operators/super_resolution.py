"""Super-resolution forward models: downsampling by an integer factor."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import LinearOperator, tensor_version


def check_factor(factor) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    return factor


def keys_cubic(u: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel W(u) (a = -0.5: the bicubic of PIL and MATLAB)."""
    u = u.abs()
    near = ((a + 2) * u - (a + 3)) * u * u + 1
    far = ((a * u - 5 * a) * u + 8 * a) * u - 4 * a
    return torch.where(u <= 1, near, torch.where(u < 2, far, torch.zeros_like(u)))


def antialiased_bicubic_taps(factor: int, a: float = -0.5) -> tuple[torch.Tensor, int]:
    """1-D taps of anti-aliased bicubic downsampling by ``factor`` and the left padding they need.

    Output pixel i has its centre at input coordinate c_i = (i + 1/2)·f − 1/2; it averages the inputs j
    with |j − c_i| < 2f weighted by W((j − c_i)/f) (the kernel stretched by f, MATLAB's ``imresize``
    anti-aliasing), normalised to sum 1. The taps are the same for every i, so this is a strided
    convolution.
    """
    half = (factor - 1) / 2
    first = math.floor(half - 2 * factor) + 1
    last = math.ceil(half + 2 * factor) - 1
    offsets = torch.arange(first, last + 1, dtype=torch.float64) - half
    taps = keys_cubic(offsets / factor, a)
    return taps / taps.sum(), -first


class Downsampling(LinearOperator):
    """Shared shape rules of downsampling by an integer ``factor``: sides divisible by it, output f times smaller."""

    min_side = 1

    def __init__(self, factor: int = 4, noise_std: float = 0.0, poisson_rate: float | None = None):
        super().__init__(noise_std=noise_std, poisson_rate=poisson_rate)
        self.factor = check_factor(factor)

    def _check_size(self, height: int, width: int) -> None:
        for name, value in (("height", height), ("width", width)):
            if value % self.factor:
                lower = value - value % self.factor
                raise ValueError(
                    f"image {name} {value} is not divisible by the super-resolution factor {self.factor}; "
                    f"crop or pad it to a multiple of {self.factor} (e.g. {lower or self.factor} or {lower + self.factor})"
                )
            if value < self.min_side:
                raise ValueError(f"image {name} {value} is too small for {type(self).__name__}: it must be at least {self.min_side}")

    def input_shape(self, output_shape):
        b, c, h, w = output_shape
        return (b, c, h * self.factor, w * self.factor)


SR_PADDINGS = ("reflect", "symmetric")


def reflect_indices(length: int, before: int, after: int, device=None) -> torch.Tensor:
    """Indices that pad a side of ``length`` by ``before`` / ``after`` samples with whole-sample reflection
    (``F.pad(mode="reflect")``, a b c | b a): j → −j below 0, j → 2(n−1)−j above n−1. One reflection: pads < length."""
    j = torch.arange(-before, length + after, device=device)
    j = torch.where(j < 0, -j, j)
    return torch.where(j >= length, 2 * (length - 1) - j, j)


def symmetric_indices(length: int, before: int, after: int, device=None) -> torch.Tensor:
    """Indices that pad a side of ``length`` by ``before`` / ``after`` samples with half-sample (symmetric)
    reflection, j → −j−1 below 0 and j → 2n−1−j above n−1: the edge sample is repeated (a b c | c b a), where
    whole-sample reflection (``F.pad(mode="reflect")``) skips it (a b c | b a). One reflection: pads ≤ length."""
    j = torch.arange(-before, length + after, device=device)
    j = torch.where(j < 0, -j - 1, j)
    return torch.where(j >= length, 2 * length - 1 - j, j)


class BicubicDownsampling(Downsampling):
    """y = D_f(x): anti-aliased Keys-bicubic (a = -0.5) downsampling by ``factor``, the super-resolution
    operator of FLAIR's benchmarks.

    kornia's ``resize(antialias=True)`` pre-blurs with a Gaussian instead of stretching the cubic kernel,
    so the separable strided convolution is written here. The pseudo-inverse solves A Aᵀ u = y by conjugate
    gradients (A Aᵀ is well conditioned for this low-pass kernel) and returns Aᵀ u.

    ``padding`` is the border rule: ``"reflect"`` (whole-sample, a b c | b a) or ``"symmetric"`` (half-sample,
    a b c | c b a: j → −j−1 below 0, j → 2n−1−j above n−1), the rule of FLAIR's official bicubic SR (``SRConv``
    in ``src/flair/functions/svd_operators.py``, built by ``sr_bicubic`` in ``src/flair/functions/degradation.py``;
    Erbach et al., "Solving Inverse Problems with FLAIR", NeurIPS 2025, prs-eth/FLAIR commit ``c4f55f7``).
    The official taps are W((t − 2f + 1/2)/f), t = 0..4f−1, with output i centred at input
    i·f + ⌊f/2⌋ − 1/2. For even f that is (i + 1/2)·f − 1/2, the centre of :func:`antialiased_bicubic_taps`,
    with the same 4f taps, so ``padding="symmetric"`` reproduces the official operator exactly. For odd f the
    official centre is (i + 1/2)·f − 1, half an input pixel before the block's centre (4f taps at half-integer
    offsets), while the taps here stay centred on the block (4f − 1 taps); the two differ for odd factors.
    The official operator applies the matrix through its SVD with 1-D singular values below 3e-2 zeroed; none
    are that small for these kernels (the smallest is 0.20, at ×12 on 768 pixels), so nothing is truncated.

    A is separable: A(X) = D_H X D_Wᵀ per channel, with D (n/f × n) the padded, strided 1-D filter of a side of n
    pixels. The adjoint runs the two strided convolutions transposed and folds the padding back onto the pixels it
    copied; the pseudo-inverse is A⁺(Y) = D_H⁺ Y D_W⁺ᵀ with D⁺ = Dᵀ(D Dᵀ)⁻¹, computed once per side, device and
    dtype in float64 (D Dᵀ is small and well conditioned): exact, two matrix products, nothing read back from the
    device.

    deepinv (``deepinv/physics/blur.py``): ``DownsamplingMatlab(factor=f)`` (MATLAB's ``imresize``: the same centres,
    stretched kernel and half-sample symmetric borders) equals ``padding="symmetric"`` for every factor, and
    ``Downsampling(filter="bicubic", factor=2, padding="reflect")`` equals the default at f = 2, to float64
    precision. For other factors deepinv's ``Downsampling`` keeps input sample m·f of its filtered image, with the
    filter (4f taps at half-integer offsets) centred half a pixel later, so output m is centred at m·f + 1/2
    rather than at the block centre (m + 1/2)·f − 1/2: (f − 2)/2 pixels earlier (one pixel at ×4); for odd f the
    two centres differ by a half-integer and no shift aligns them.
    """

    def __init__(self, factor: int = 4, noise_std: float = 0.0, poisson_rate: float | None = None,
                 padding: str = "reflect"):
        super().__init__(factor, noise_std=noise_std, poisson_rate=poisson_rate)
        if padding not in SR_PADDINGS:
            raise ValueError(f"padding must be one of {SR_PADDINGS} (whole- or half-sample reflection at the "
                             f"border), got {padding!r}")
        self.padding = padding
        taps, self.pad_left = antialiased_bicubic_taps(self.factor)
        self.pad_right = taps.numel() - self.factor - self.pad_left
        # reflect padding needs pad < side, symmetric padding pad <= side
        self.min_side = max(self.pad_left, self.pad_right) + (padding == "reflect")
        self.register_buffer("taps", taps.to(torch.get_default_dtype()))
        self._inverses: dict = {}  # (side, device, dtype) -> D⁺ of that side (see A_dagger)

    def _indices(self, length: int, device=None) -> torch.Tensor:
        """The source pixel of every padded position along a side of ``length``."""
        pad = reflect_indices if self.padding == "reflect" else symmetric_indices
        return pad(length, self.pad_left, self.pad_right, device=device)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "reflect":
            return F.pad(x, (self.pad_left, self.pad_right, self.pad_left, self.pad_right), mode="reflect")
        rows = symmetric_indices(x.shape[-2], self.pad_left, self.pad_right, device=x.device)
        cols = symmetric_indices(x.shape[-1], self.pad_left, self.pad_right, device=x.device)
        return x.index_select(-2, rows).index_select(-1, cols)

    def _filter_matrix(self, length: int) -> torch.Tensor:
        """D (length / f × length), float64 on the CPU: the padded, strided 1-D filter along a side of ``length``."""
        f, taps = self.factor, self.taps.double().cpu()
        k = taps.numel()
        outputs = length // f
        rows = torch.arange(outputs).repeat_interleave(k)
        positions = (torch.arange(outputs)[:, None] * f + torch.arange(k)[None, :]).flatten()
        matrix = torch.zeros(outputs, length, dtype=torch.float64)
        return matrix.index_put_((rows, self._indices(length)[positions]), taps.repeat(outputs), accumulate=True)

    def _inverse(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """D⁺ = Dᵀ(D Dᵀ)⁻¹ (length × length / f) of a side of ``length``, made once per side, device and dtype."""
        key = (length, device, dtype, tensor_version(self.taps))
        if key not in self._inverses:
            d = self._filter_matrix(length)
            self._inverses[key] = torch.linalg.solve(d @ d.T, d).T.to(device=device, dtype=dtype)
        return self._inverses[key]

    def A(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        taps = self.taps.to(device=x.device, dtype=x.dtype)
        x = self._pad(x)
        x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), stride=(self.factor, 1), groups=channels)
        return F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), stride=(1, self.factor), groups=channels)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Aᵀ y: the two strided convolutions transposed, then each padded pixel added back onto its source."""
        channels, f = y.shape[1], self.factor
        height, width = y.shape[-2] * f, y.shape[-1] * f
        self._check_size(height, width)
        taps = self.taps.to(device=y.device, dtype=y.dtype)
        # the padded sides are (n / f − 1) f + taps long: the transposed convolutions need no output padding
        x = F.conv_transpose2d(y, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), stride=(1, f), groups=channels)
        x = F.conv_transpose2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), stride=(f, 1), groups=channels)
        rows, cols = self._indices(height, y.device), self._indices(width, y.device)
        x = x.new_zeros(*x.shape[:-2], height, x.shape[-1]).index_add(-2, rows, x)
        return x.new_zeros(*x.shape[:-1], width).index_add(-1, cols, x)

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        """A⁺ y = D_H⁺ y D_W⁺ᵀ (see the class docstring)."""
        height, width = y.shape[-2] * self.factor, y.shape[-1] * self.factor
        self._check_size(height, width)
        rows = self._inverse(height, y.device, y.dtype)
        cols = self._inverse(width, y.device, y.dtype)
        return rows @ y @ cols.T


class AveragePoolDownsampling(Downsampling):
    """y = mean over non-overlapping f×f blocks (FlowChef's SR×4 operator).

    Aᵀ y = nearest upsampling of y / f²; A^+ y = nearest upsampling of y (A A^+ = I).
    """

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.factor)

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        return y.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor, dim=-1)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.A_dagger(y) / self.factor**2
