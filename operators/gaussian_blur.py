"""Gaussian blur."""

from __future__ import annotations

import kornia
import torch
import torch.nn.functional as F

from .convolution import Convolution, check_kernel_size

CENTRINGS = ("centred", "official")


def official_taps(kernel_size: int, sigma: float) -> torch.Tensor:
    """The 1-D factor of FlowChef's blur kernel, float64, summing to 1: t_j ∝ exp(-p_j² / 2σ²) at
    p_j = j + 1/2 − ⌈k/2⌉, j = 0 .. k−1 (the official ``linspace(-k//2 + 0.5, k//2 - 0.5, k)``: centred on the
    tap grid for even k, half a pixel off for odd k)."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size <= 0:
        raise ValueError(f"kernel_size must be a positive integer, got {kernel_size!r}")
    positions = torch.arange(kernel_size, dtype=torch.float64) + 0.5 - (kernel_size + 1) // 2
    taps = torch.exp(-positions.square() / (2 * float(sigma) ** 2))
    return taps / taps.sum()


class GaussianBlur(Convolution):
    """Isotropic Gaussian blur, k(u) ∝ exp(-|u|² / 2σ²) on a centred ``kernel_size`` square (kornia's kernel).

    ``centring="official"`` reproduces instead the kernel of FlowChef's official code (Patel et al., ICCV 2025;
    FlowChef/FlowChef commit 9b705fc, ``inverseproblems/pixel_models/rfpp/inverse_operators.py`` and
    ``src/inverse_operators.py``, ``GaussianDeblurOperator``): taps at p_j = j + 1/2 − ⌈k/2⌉ (see
    :func:`official_taps`), applied as a cross-correlation with k//2 zeros of padding on every side, so
    y_i = Σ_j t_j x_{i + j − k//2}. For odd k that blur is shifted by half a pixel; for even k (50 taps in the
    SD1.5 deblurring script) it is centred between pixels and the output grows to (H + 1) x (W + 1). flowsteer
    centres its kernels on a pixel and keeps the image size, so that A is a same-size blur; the official form
    exists for parity runs only and needs ``padding="constant"`` (zeros, as the official code pads).

    The centred kernel is deepinv's ``physics.functional.gaussian_blur(sigma=(σ, σ), psf_size=(k, k))``, and the
    operator equals deepinv's ``Blur(filter, padding=p)`` (``deepinv/physics/blur.py``) for every padding p here
    (``constant`` being deepinv's zeros) and ``BlurFFT`` for ``circular``, to float64 precision: the kernel is
    symmetric, so deepinv's convolution and this cross-correlation agree.

    Args:
        kernel_size: odd side of the kernel (61 in DPS / FLAIR benchmarks); any positive side with
            ``centring="official"``.
        sigma: standard deviation in pixels (> 0).
        padding: boundary rule (see :class:`Convolution`).
        centring: ``"centred"`` (default) or ``"official"``.
    """

    def __init__(self, kernel_size: int = 61, sigma: float = 3.0, padding: str = "reflect", noise_std: float = 0.0,
                 poisson_rate: float | None = None, centring: str = "centred"):
        if centring not in CENTRINGS:
            raise ValueError(f"centring must be one of {CENTRINGS}, got {centring!r}")
        if not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"sigma must be a number > 0 (pixels), got {sigma!r}")
        if centring == "centred":
            check_kernel_size(kernel_size)
            taps = kornia.filters.get_gaussian_kernel1d(kernel_size, float(sigma), dtype=torch.float64)[0]
            taps = taps / taps.sum()
        else:
            if padding != "constant":
                raise ValueError(f"centring='official' pads with zeros, as FlowChef's official code does; use "
                                 f"padding='constant' (got {padding!r})")
            taps = official_taps(kernel_size, sigma)
            if kernel_size % 2 == 0:  # one zero tap makes the side odd: the same sums, on a one-larger image
                taps = torch.cat([taps, taps.new_zeros(1)])
        super().__init__(torch.outer(taps, taps), padding=padding, noise_std=noise_std, poisson_rate=poisson_rate,
                         separable=(taps, taps))
        self.kernel_size = kernel_size
        self.sigma = float(sigma)
        self.centring = centring
        self.grows = centring == "official" and kernel_size % 2 == 0  # output (H + 1) x (W + 1)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        if self.grows:
            # y_i = Σ_{d=-k/2}^{k/2-1} t_{d+k/2} x_{i+d}, i = 0 .. H: a same-size filter of the zero-extended image
            x = F.pad(x, (0, 1, 0, 1))
        return super().A(x)

    def input_shape(self, output_shape: torch.Size) -> tuple[int, ...]:
        shape = tuple(output_shape)
        return (*shape[:-2], shape[-2] - 1, shape[-1] - 1) if self.grows else shape
