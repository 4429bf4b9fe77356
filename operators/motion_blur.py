"""Motion blur: random camera-shake trajectories (DPS / FLAIR benchmarks) and straight-line kernels (kornia)."""

from __future__ import annotations

import math

import kornia
import torch

from .convolution import Convolution, check_kernel_size


def random_trajectory_kernel(size: int = 61, intensity: float = 0.5,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """A camera-shake blur kernel: a random planar trajectory rasterised into a ``size`` square, sum 1.

    The trajectory is a sequence of unit steps whose heading performs a random walk: each step turns by
    N(0, (0.25·intensity)²) radians, and with probability 0.02·intensity takes an abrupt turn of up to ±π/2.
    intensity = 0 gives a straight line; larger values give curlier, more irregular shake. The path is
    centred and scaled so that its longer side spans a random 50-100 % of the kernel, splatted bilinearly
    onto the grid at sub-pixel positions, smoothed with a 0.5-pixel Gaussian, and normalised. kornia offers
    only straight-line motion kernels, hence this generator.
    """
    check_kernel_size(size, "size")
    if size < 3:
        raise ValueError(f"size must be at least 3 for a random trajectory kernel, got {size}")
    if not isinstance(intensity, (int, float)) or not 0 <= intensity <= 1:
        raise ValueError(f"intensity must be a number in [0, 1], got {intensity!r}")
    steps = 16 * size
    f64 = dict(dtype=torch.float64)
    heading0 = 2 * math.pi * torch.rand((), generator=generator, **f64)
    turns = 0.25 * intensity * torch.randn(steps, generator=generator, **f64)
    jumps = (torch.rand(steps, generator=generator, **f64) < 0.02 * intensity).to(torch.float64)
    turns = turns + jumps * (torch.rand(steps, generator=generator, **f64) - 0.5) * math.pi
    span = 0.5 + 0.5 * torch.rand((), generator=generator, **f64)
    heading = heading0 + torch.cumsum(turns, 0)
    path = torch.cumsum(torch.stack([torch.cos(heading), torch.sin(heading)], dim=1), 0)
    path = path - (path.max(0).values + path.min(0).values) / 2
    extent = (path.max(0).values - path.min(0).values).max().clamp_min(1e-12)
    centre = (size - 1) / 2
    path = path * (span * (size - 3) / extent) + centre  # stays one pixel inside the border
    kernel = torch.zeros(size, size, **f64)
    base = path.floor()
    frac = path - base
    for dy in (0, 1):
        for dx in (0, 1):
            weight = (frac[:, 1] if dy else 1 - frac[:, 1]) * (frac[:, 0] if dx else 1 - frac[:, 0])
            rows = (base[:, 1] + dy).long().clamp(0, size - 1)
            cols = (base[:, 0] + dx).long().clamp(0, size - 1)
            kernel.index_put_((rows, cols), weight, accumulate=True)
    smooth = kornia.filters.get_gaussian_kernel2d((3, 3), (0.5, 0.5), dtype=torch.float64)
    kernel = kornia.filters.filter2d(kernel[None, None], smooth, border_type="constant")[0, 0]
    return kernel / kernel.sum()


class MotionBlur(Convolution):
    """Camera-shake motion blur with a random trajectory kernel drawn once from ``seed``.

    Defaults follow the DPS and FLAIR benchmarks: kernel size 61, intensity 0.5.
    """

    def __init__(self, kernel_size: int = 61, intensity: float = 0.5, seed: int = 0, padding: str = "reflect",
                 noise_std: float = 0.0, poisson_rate: float | None = None):
        generator = torch.Generator().manual_seed(int(seed))
        kernel = random_trajectory_kernel(kernel_size, intensity, generator)
        super().__init__(kernel, padding=padding, noise_std=noise_std, poisson_rate=poisson_rate)
        self.kernel_size, self.intensity, self.seed = kernel_size, float(intensity), int(seed)


class LineMotionBlur(Convolution):
    """Straight-line motion blur (kornia's ``get_motion_kernel2d``).

    Args:
        kernel_size: odd length of the line (>= 3).
        angle: direction of motion in degrees, counter-clockwise.
        direction: in [-1, 1]; 0 spreads evenly along the line, ±1 weights one end (a motion that stops).
    """

    def __init__(self, kernel_size: int = 15, angle: float = 45.0, direction: float = 0.0, padding: str = "reflect",
                 noise_std: float = 0.0, poisson_rate: float | None = None):
        check_kernel_size(kernel_size)
        if kernel_size < 3:
            raise ValueError(f"kernel_size must be at least 3 for a line motion kernel, got {kernel_size}")
        if not isinstance(direction, (int, float)) or not -1 <= direction <= 1:
            raise ValueError(f"direction must be a number in [-1, 1], got {direction!r}")
        kernel = kornia.filters.get_motion_kernel2d(kernel_size, float(angle), float(direction))[0]
        super().__init__(kernel.to(torch.float64) / kernel.sum(), padding=padding, noise_std=noise_std,
                         poisson_rate=poisson_rate)
        self.kernel_size, self.angle, self.direction = kernel_size, float(angle), float(direction)
