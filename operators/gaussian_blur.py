"""Gaussian blur."""

from __future__ import annotations

import kornia
import torch

from .convolution import Convolution, check_kernel_size


class GaussianBlur(Convolution):
    """Isotropic Gaussian blur, k(u) ∝ exp(-|u|² / 2σ²) on a centred ``kernel_size`` square (kornia's kernel).

    Args:
        kernel_size: odd side of the kernel (61 in DPS / FLAIR benchmarks).
        sigma: standard deviation in pixels (> 0).
        padding: boundary rule (see :class:`Convolution`).
    """

    def __init__(self, kernel_size: int = 61, sigma: float = 3.0, padding: str = "reflect", noise_std: float = 0.0,
                 poisson_rate: float | None = None):
        check_kernel_size(kernel_size)
        if not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"sigma must be a number > 0 (pixels), got {sigma!r}")
        taps = kornia.filters.get_gaussian_kernel1d(kernel_size, float(sigma), dtype=torch.float64)[0]
        taps = taps / taps.sum()
        super().__init__(torch.outer(taps, taps), padding=padding, noise_std=noise_std, poisson_rate=poisson_rate,
                         separable=(taps, taps))
        self.kernel_size = kernel_size
        self.sigma = float(sigma)
