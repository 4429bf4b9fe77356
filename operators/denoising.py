"""Denoising: the identity forward model, y = x + n."""

from __future__ import annotations

import torch

from .base import LinearOperator


class Denoising(LinearOperator):
    """A = I: the measurement is the image plus the operator's noise. Aᵀ = A^+ = I."""

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y

    A_dagger = A_adjoint
