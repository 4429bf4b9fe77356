"""Blur by a fixed kernel: y = k * x per channel, same size, with a chosen boundary rule."""

from __future__ import annotations

import kornia
import torch

from .base import LinearOperator

PADDINGS = ("reflect", "replicate", "circular", "constant")


def check_kernel_size(kernel_size, name: str = "kernel_size") -> int:
    """A blur kernel size must be a positive odd integer (the kernel is centred on a pixel)."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size <= 0 or kernel_size % 2 == 0:
        raise ValueError(f"{name} must be a positive odd integer, got {kernel_size!r}")
    return kernel_size


class Convolution(LinearOperator):
    """Blur with a fixed 2-D kernel (the same for every channel), output the size of the input.

    A(x) = k ⋆ x with ``padding`` in {reflect, replicate, circular, constant (zeros)}; filtering is
    kornia's ``filter2d``. The adjoint is the vector-Jacobian product, exact for every boundary rule.

    Args:
        kernel: (kh, kw) tensor, odd sides; it is used as given (normalise it beforehand if needed).
        padding: boundary rule.
        separable: optional 1-D factors (k_y, k_x) with kernel = k_y k_xᵀ; filtering then costs kh + kw
            rather than kh·kw multiplications per pixel.
    """

    def __init__(self, kernel: torch.Tensor, padding: str = "reflect", noise_std: float = 0.0, poisson_rate=None,
                 separable: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__(noise_std=noise_std, poisson_rate=poisson_rate)
        kernel = torch.as_tensor(kernel)
        if kernel.ndim != 2:
            raise ValueError(f"kernel must be a 2-D (height, width) tensor, got shape {tuple(kernel.shape)}")
        for side in kernel.shape:
            check_kernel_size(int(side), "kernel side")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        self.padding = padding
        self.register_buffer("kernel", kernel.to(torch.get_default_dtype()))
        if separable is not None:
            k_y, k_x = (torch.as_tensor(k).to(torch.get_default_dtype()) for k in separable)
            if k_y.shape != kernel.shape[:1] or k_x.shape != kernel.shape[1:]:
                raise ValueError(f"separable factors of shapes {tuple(k_y.shape)}, {tuple(k_x.shape)} do not "
                                 f"match the {tuple(kernel.shape)} kernel")
            self.register_buffer("kernel_y", k_y)
            self.register_buffer("kernel_x", k_x)
        self.separable = separable is not None

    def _check_size(self, height: int, width: int) -> None:
        if self.padding != "reflect":
            return
        kh, kw = self.kernel.shape
        if height <= kh // 2 or width <= kw // 2:
            raise ValueError(
                f"image of {height}x{width} is too small for a {kh}x{kw} kernel with reflect padding: "
                f"height must exceed {kh // 2} and width {kw // 2}; use a larger image, a smaller kernel "
                f"or padding='constant'"
            )

    def A(self, x: torch.Tensor) -> torch.Tensor:
        if self.separable:
            k_x, k_y = (k.to(device=x.device, dtype=x.dtype)[None] for k in (self.kernel_x, self.kernel_y))
            return kornia.filters.filter2d_separable(x, k_x, k_y, border_type=self.padding)
        kernel = self.kernel.to(device=x.device, dtype=x.dtype)[None]
        return kornia.filters.filter2d(x, kernel, border_type=self.padding)
