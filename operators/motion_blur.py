"""Motion blur: random camera-shake trajectories (DPS / FLAIR benchmarks) and straight-line kernels (kornia)."""

from __future__ import annotations

import math

import kornia
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

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


def _official_trajectory(rng: np.random.RandomState, size: int, intensity: float) -> np.ndarray:
    """One kernel of the official generator, drawn from ``rng`` (see :func:`official_motion_kernel`)."""
    side = 2 * size  # drawn at twice the size, then reduced with Lanczos for anti-aliasing
    diagonal = (side**2 + side**2) ** 0.5
    slack = 0.1  # the generator's constant that keeps steps and angles away from zero
    # step lengths ~ Beta(1, 30)·(1 − intensity + 0.1)·diagonal, kept while shorter than the path length L
    length = 0.75 * diagonal * (rng.uniform() + rng.uniform(0, intensity**2))
    steps, total = [], 0
    while total < length:
        step = rng.beta(1, 30) * (1 - intensity + slack) * diagonal
        if step < length:
            steps.append(step)
            total = total + step
    # turning angles: |θ| ~ Triangular(0, intensity·θmax, θmax + 0.1), sign flipped with probability Beta(2, 20)
    max_angle = rng.uniform(0, intensity * math.pi)
    flip = rng.beta(2, 20)
    angles = [rng.uniform(low=-max_angle, high=max_angle)]
    while len(angles) < len(steps):
        angle = rng.triangular(0, intensity * max_angle, max_angle + slack)
        sign = np.sign(angles[-1])
        angles.append(angle * (-sign if rng.uniform() < flip else sign))
    path = np.cumsum(np.asarray(steps) * np.exp(1j * np.asarray(angles)))  # complex positions x + iy
    centre_of_mass = sum(path) / len(steps)  # a sequential sum, as the generator computes it
    path = path - centre_of_mass
    path = path * np.exp(1j * rng.uniform(0, math.pi))  # a random rotation
    path = path + (side + 1j * side) / 2
    canvas = Image.new("RGB", (side, side))
    ImageDraw.Draw(canvas).line([(z.real, z.imag) for z in path], width=int(diagonal / 150))
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=int(diagonal * 0.01)))
    canvas = canvas.resize((size, size), resample=Image.Resampling.LANCZOS).convert("L")
    kernel = np.asarray(canvas, dtype=np.float32).copy()
    kernel /= np.sum(kernel)
    return kernel


def official_motion_kernel(size: int = 61, intensity: float = 0.5, seed: int = 42, draw: int = 0) -> torch.Tensor:
    """The camera-shake kernel of FLAIR's official code, seed for seed: a float32 (size, size) tensor, sum 1.

    FLAIR (Erbach et al., "Solving Inverse Problems with FLAIR", NeurIPS 2025) blurs with the generator of
    LeviBorodenko/motionblur, vendored as ``src/flair/motionblur/motionblur.py`` of prs-eth/FLAIR (commit
    ``c4f55f7``), which draws from numpy's global random state after ``np.random.seed(seed)``. Here the same
    stream comes from a local ``np.random.RandomState(seed)`` (numpy's global state is left alone), consumed in
    the same order: a path length L = 0.75·d·(U(0,1) + U(0, intensity²)) on a 2·size canvas of diagonal d, steps
    Beta(1, 30)·(1.1 − intensity)·d until they sum to L, turning angles with random sign flips, a random rotation
    about the path's centre of mass; Pillow draws the path as a 1-pixel line, blurs it (Gaussian, radius
    int(0.01·d)), reduces it to ``size`` with Lanczos and takes its grey level; the kernel is normalised in
    float32. ``draw`` = n returns the (n+1)-th kernel of the stream: the official motion-blur operator
    (``MotionBlurOperator`` in ``src/flair/functions/measurements.py``) draws one kernel for the initial weights
    of its ``Blurkernel`` and applies the second, ``draw=1``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if isinstance(intensity, bool) or not isinstance(intensity, (int, float)) or not 0 <= intensity <= 1:
        raise ValueError(f"intensity must be a number in [0, 1], got {intensity!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32) for numpy's RandomState, got {seed!r}")
    if int((2 * (2 * size) ** 2) ** 0.5 / 150) < 1:
        raise ValueError(f"kernel size {size} is too small for the official generator: it draws its path with a line "
                         f"int(2·sqrt(2)·size/150) pixels wide, 0 below size 54 (an empty kernel); use size >= 54 or "
                         f"generator='flowsteer'")
    if isinstance(draw, bool) or not isinstance(draw, int) or draw < 0:
        raise ValueError(f"draw must be a non-negative integer (0: the first kernel after seeding), got {draw!r}")
    rng = np.random.RandomState(seed)
    for _ in range(draw):
        _official_trajectory(rng, size, intensity)
    return torch.from_numpy(_official_trajectory(rng, size, intensity))


GENERATORS = ("flowsteer", "official")


class MotionBlur(Convolution):
    """Camera-shake motion blur with a random trajectory kernel drawn once from ``seed``.

    Defaults follow the DPS and FLAIR benchmarks: kernel size 61, intensity 0.5. ``generator`` picks the kernel:
    ``"flowsteer"`` (:func:`random_trajectory_kernel`, from a torch generator) or ``"official"``, FLAIR's own
    kernel (:func:`official_motion_kernel` with ``draw=1``, the kernel its motion-blur operator applies after
    ``np.random.seed(seed)``; the FLAIR benchmark's config uses seed 42). Both are applied alike: A(x) = k ⋆ x is
    a cross-correlation (kornia's ``filter2d``, the kernel is not flipped) over a reflect-padded image (k//2
    pixels, whole-sample reflection), which is exactly FLAIR's ``Blurkernel`` (``ReflectionPad2d(k//2)`` then
    ``Conv2d``, also a correlation, ``src/flair/utils/blur_util.py``); so ``padding="reflect"`` (the default)
    gives the official measurement, and no flip is needed. deepinv's ``Blur`` (``deepinv/physics/blur.py``) is a
    true convolution: it equals this operator given the flipped kernel, ``Blur(filter=k.flip(-1, -2)[None, None],
    padding="reflect")``, to float64 precision (tests/test_deepinv_parity.py).
    """

    def __init__(self, kernel_size: int = 61, intensity: float = 0.5, seed: int = 0, padding: str = "reflect",
                 noise_std: float = 0.0, poisson_rate: float | None = None, generator: str = "flowsteer"):
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS} (flowsteer's own kernels or FLAIR's official "
                             f"ones), got {generator!r}")
        if generator == "official":
            check_kernel_size(kernel_size)
            kernel = official_motion_kernel(kernel_size, intensity, int(seed), draw=1)
        else:
            kernel = random_trajectory_kernel(kernel_size, intensity, torch.Generator().manual_seed(int(seed)))
        super().__init__(kernel, padding=padding, noise_std=noise_std, poisson_rate=poisson_rate)
        self.kernel_size, self.intensity, self.seed = kernel_size, float(intensity), int(seed)
        self.generator = generator


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
