"""Colorization: the forward model is conversion to grayscale."""

from __future__ import annotations

import kornia
import torch

from .base import LinearOperator


class Colorization(LinearOperator):
    """y = Σ_c w_c x_c with ITU-R BT.601 luma weights w = (0.299, 0.587, 0.114) (kornia's
    ``rgb_to_grayscale``): RGB (B, 3, H, W) -> gray (B, 1, H, W). Since Σ w = 1, [-1, 1] maps to [-1, 1].

    Aᵀ y = w y (per channel); A^+ y = w y / |w|² (minimum-norm right inverse).

    deepinv's ``Decolorize(srf=[0.299, 0.587, 0.114])`` (``deepinv/physics/range.py``) is the same A, Aᵀ and A⁺ to
    float64 precision; its default ``srf="rec601"`` weights are 0.66851 · (0.4472, 0.8781, 0.1706) =
    (0.29896, 0.58702, 0.11405), up to 4.8e-5 from these: gray values of [-1, 1] images differ by up to 1.1e-4.
    """

    in_channels = 3

    def __init__(self, noise_std: float = 0.0, poisson_rate: float | None = None):
        super().__init__(noise_std=noise_std, poisson_rate=poisson_rate)
        self.register_buffer("weights", torch.tensor([0.299, 0.587, 0.114]))

    def _weights(self, like: torch.Tensor) -> torch.Tensor:
        return self.weights.to(device=like.device, dtype=like.dtype).view(1, 3, 1, 1)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return kornia.color.rgb_to_grayscale(x, rgb_weights=self.weights.to(device=x.device, dtype=x.dtype))

    def input_shape(self, output_shape):
        b, _, h, w = output_shape
        return (b, 3, h, w)

    def _check_measurement(self, y: torch.Tensor) -> None:
        if y.shape[1] != 1:
            raise ValueError(f"a colorization measurement has 1 channel, got {y.shape[1]} (shape {tuple(y.shape)})")

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self._check_measurement(y)
        return self._weights(y) * y

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        w = self._weights(y)
        return self.A_adjoint(y) / (w * w).sum()
