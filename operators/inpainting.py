"""Inpainting: y = m ⊙ x with a 0/1 mask m (1 = observed)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .base import LinearOperator
from .masks import as_mask, box_mask, check_box_args, freeform_mask, mask_from_file, random_mask


class Inpainting(LinearOperator):
    """Masking, A x = m ⊙ x; self-adjoint (A^T = A) and its own pseudo-inverse (zero fill), A^+ = A.

    Args:
        mask: a fixed mask tensor (H, W) / (B, C, H, W), 1 = observed, 0 = missing; or a function
            ``(height, width) -> mask`` that makes the mask for each image size on first use (cached).
    """

    def __init__(self, mask: torch.Tensor | Callable[[int, int], torch.Tensor], noise_std: float = 0.0,
                 poisson_rate: float | None = None):
        super().__init__(noise_std=noise_std, poisson_rate=poisson_rate)
        self._make_mask = mask if callable(mask) and not isinstance(mask, torch.Tensor) else None
        self.register_buffer("fixed_mask", None if self._make_mask else as_mask(mask))
        self._cache: dict = {}

    def _check_size(self, height: int, width: int) -> None:
        if self.fixed_mask is not None and tuple(self.fixed_mask.shape[-2:]) != (height, width):
            raise ValueError(
                f"mask shape {tuple(self.fixed_mask.shape[-2:])} does not match the image size ({height}, {width}); "
                f"resize the mask to the image (or the image to the mask)"
            )

    def mask_for(self, x: torch.Tensor) -> torch.Tensor:
        """The mask for an image ``x``, on its device and in its dtype."""
        if self.fixed_mask is not None:
            mask = self.fixed_mask
            if mask.shape[0] not in (1, x.shape[0]) or mask.shape[1] not in (1, x.shape[1]):
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not broadcast to the image of shape {tuple(x.shape)}"
                )
            return mask.to(device=x.device, dtype=x.dtype)
        key = (x.shape[-2], x.shape[-1], x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = as_mask(self._make_mask(x.shape[-2], x.shape[-1])).to(device=x.device, dtype=x.dtype)
        return self._cache[key]

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask_for(x) * x

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self._check_size(y.shape[-2], y.shape[-1])
        return self.mask_for(y) * y

    A_dagger = A_adjoint


class BoxInpainting(Inpainting):
    """A missing box: ``size`` (pixels, int or (h, w)) or ``fraction`` of the area (default a quarter),
    centred unless ``top``/``left`` are given."""

    def __init__(self, size: int | tuple[int, int] | None = None, fraction: float | None = None,
                 top: int | None = None, left: int | None = None, noise_std: float = 0.0,
                 poisson_rate: float | None = None):
        size, fraction = check_box_args(size, fraction)
        super().__init__(lambda h, w: box_mask(h, w, size=size, fraction=fraction, top=top, left=left),
                         noise_std=noise_std, poisson_rate=poisson_rate)
        self.size, self.fraction, self.top, self.left = size, fraction, top, left


class RandomInpainting(Inpainting):
    """Uniformly random missing pixels: exactly ``fraction`` of them, drawn from ``seed``."""

    def __init__(self, fraction: float = 0.5, seed: int = 0, noise_std: float = 0.0,
                 poisson_rate: float | None = None):
        random_mask(2, 2, fraction, seed)  # validates the arguments now rather than at first use
        super().__init__(lambda h, w: random_mask(h, w, fraction, seed), noise_std=noise_std,
                         poisson_rate=poisson_rate)
        self.fraction, self.seed = fraction, seed


class FreeformInpainting(Inpainting):
    """Free-form brush-stroke holes drawn from ``seed`` (see :func:`operators.masks.freeform_mask`)."""

    def __init__(self, strokes: int = 4, max_vertices: int = 8, max_width: float = 0.08, seed: int = 0,
                 noise_std: float = 0.0, poisson_rate: float | None = None):
        freeform_mask(8, 8, strokes, max_vertices, max_width, seed)  # validates the arguments now
        super().__init__(lambda h, w: freeform_mask(h, w, strokes, max_vertices, max_width, seed),
                         noise_std=noise_std, poisson_rate=poisson_rate)
        self.strokes, self.max_vertices, self.max_width, self.seed = strokes, max_vertices, max_width, seed


class FileMaskInpainting(Inpainting):
    """A mask read from an image file: white = missing, black = kept (``invert=True`` swaps)."""

    def __init__(self, path: str | os.PathLike, invert: bool = False, threshold: float = 0.5,
                 noise_std: float = 0.0, poisson_rate: float | None = None):
        super().__init__(mask_from_file(path, invert=invert, threshold=threshold), noise_std=noise_std,
                         poisson_rate=poisson_rate)
        self.path = os.fspath(path)
