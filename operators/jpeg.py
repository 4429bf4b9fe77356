"""JPEG compression as a (non-linear, differentiable) forward model."""

from __future__ import annotations

import kornia
import torch

from .base import Operator


def check_quality(quality) -> int:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer in 1..100, got {quality!r}")
    return quality


class JPEGCompression(Operator):
    """y = JPEG_q(x): encode and decode at ``quality`` with kornia's differentiable codec (YCbCr 4:2:0,
    the standard quantisation tables scaled by quality, rounding replaced by a differentiable surrogate in
    the backward pass). Works on RGB images in [-1, 1]; values outside are clipped as the codec does.
    """

    in_channels = 3

    def __init__(self, quality: int = 50, noise_std: float = 0.0, poisson_rate: float | None = None):
        super().__init__(noise_std=noise_std, poisson_rate=poisson_rate)
        self.quality = check_quality(quality)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        quality = torch.full((x.shape[0],), float(self.quality), device=x.device, dtype=x.dtype)
        image = ((x + 1) / 2).clamp(0, 1)
        return 2 * kornia.enhance.jpeg_codec_differentiable(image, quality) - 1

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [f"quality={self.quality}", super().extra_repr()]))
