"""Inpainting: y = (1 − m) ⊙ x with a 0/1 mask m (1 = missing)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from .base import LinearOperator
from .masks import (BOX_LAYOUTS, NAMED_MASKS, as_mask, box_mask, check_box_args, flair_box_mask, freeform_mask,
                    mask_from_file, named_mask_path, random_mask)


class Inpainting(LinearOperator):
    """Masking, A x = (1 − m) ⊙ x: the missing pixels are zeroed; self-adjoint (A^T = A) and its own
    pseudo-inverse (zero fill), A^+ = A.

    Mask convention, the same everywhere in flowsteer (this class, :mod:`operators.masks`, mask files read by
    ``inpaint_mask`` and ``flowsteer edit``): 1 (white) = missing, the pixels to fill; 0 (black) = kept.
    :meth:`missing_for` gives the mask m for an image, :meth:`observed_for` the weights 1 − m that A applies.
    A mask that marks every pixel missing (nothing is measured) or none (A is the identity) is allowed but warned
    about, once per operator: when a tensor mask is given, or when a mask function first builds one.

    Args:
        mask: a fixed mask tensor (H, W) / (B, C, H, W) in [0, 1], 1 = missing, 0 = kept; or a function
            ``(height, width) -> mask`` (same convention) that makes the mask for each image size on first use
            (cached).
    """

    _warn_on_init = True  # a subclass that names its mask (FileMaskInpainting) warns itself once it can

    def __init__(self, mask: torch.Tensor | Callable[[int, int], torch.Tensor], noise_std: float = 0.0,
                 poisson_rate: float | None = None):
        super().__init__(noise_std=noise_std, poisson_rate=poisson_rate)
        self._make_mask = mask if callable(mask) and not isinstance(mask, torch.Tensor) else None
        self.register_buffer("fixed_mask", None if self._make_mask else as_mask(mask))
        self._cache: dict = {}
        self._warned: set[str] = set()
        if self.fixed_mask is not None and self._warn_on_init:
            self._warn_if_degenerate(self.fixed_mask)

    def _mask_source(self) -> str:
        """How the warnings name this operator's mask."""
        return "a tensor mask" if self.fixed_mask is not None else "a generated mask"

    def _warn_if_degenerate(self, mask: torch.Tensor) -> None:
        """Warn (once per case and operator) when ``mask`` marks every pixel missing or none."""
        if not mask.numel():
            return
        if bool((mask == 1).all()):
            case = "every"
            message = ("the mask marks every pixel missing: nothing is measured ({}); mark the pixels to keep "
                       "0 / black (white = missing), or invert the mask if it has them the wrong way round")
        elif bool((mask == 0).all()):
            case = "none"
            message = ("the mask marks no pixel missing: the operator is the identity ({}); mark the pixels to "
                       "fill 1 / white (black = kept)")
        else:
            return
        if case not in self._warned:
            self._warned.add(case)
            warnings.warn(message.format(self._mask_source()), UserWarning, stacklevel=3)

    def _check_size(self, height: int, width: int) -> None:
        if self.fixed_mask is not None and tuple(self.fixed_mask.shape[-2:]) != (height, width):
            raise ValueError(
                f"mask shape {tuple(self.fixed_mask.shape[-2:])} does not match the image size ({height}, {width}); "
                f"resize the mask to the image (or the image to the mask)"
            )

    def missing_for(self, x: torch.Tensor) -> torch.Tensor:
        """The mask m for an image ``x`` (1 = missing), on its device and in its dtype."""
        if self.fixed_mask is not None:
            mask = self.fixed_mask
            if mask.shape[0] not in (1, x.shape[0]) or mask.shape[1] not in (1, x.shape[1]):
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not broadcast to the image of shape {tuple(x.shape)}"
                )
            return mask.to(device=x.device, dtype=x.dtype)
        key = ("missing", x.shape[-2], x.shape[-1], x.device, x.dtype)
        if key not in self._cache:
            mask = as_mask(self._make_mask(x.shape[-2], x.shape[-1]))
            self._warn_if_degenerate(mask)
            self._cache[key] = mask.to(device=x.device, dtype=x.dtype)
        return self._cache[key]

    def observed_for(self, x: torch.Tensor) -> torch.Tensor:
        """The weights 1 − m that A multiplies ``x`` by (1 = observed): the diagonal of A."""
        if self.fixed_mask is not None:
            return 1 - self.missing_for(x)
        key = ("observed", x.shape[-2], x.shape[-1], x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = 1 - self.missing_for(x)
        return self._cache[key]

    #: The diagonal of A, 1 − m (1 = observed), under the name the latent-space fidelity weighting reads.
    mask_for = observed_for

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return self.observed_for(x) * x

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self._check_size(y.shape[-2], y.shape[-1])
        return self.observed_for(y) * y

    A_dagger = A_adjoint


class BoxInpainting(Inpainting):
    """A missing box: ``size`` (pixels, int or (h, w)) or ``fraction`` of the area (default a quarter),
    centred unless ``top``/``left`` are given. ``layout="flair"`` is instead the box of FLAIR's inpainting
    benchmark scaled with the image, rows H/6..5H/6 and columns W/2..5W/6 (768x768: rows 128:640, columns
    384:640, 22.2 % missing; see :func:`operators.masks.flair_box_mask`)."""

    def __init__(self, size: int | tuple[int, int] | None = None, fraction: float | None = None,
                 top: int | None = None, left: int | None = None, noise_std: float = 0.0,
                 poisson_rate: float | None = None, layout: str = "centred"):
        if layout not in BOX_LAYOUTS:
            raise ValueError(f"layout must be one of {BOX_LAYOUTS} (a box set by size/fraction/top/left, or "
                             f"FLAIR's benchmark box), got {layout!r}")
        if layout == "flair":
            given = [name for name, value in (("size", size), ("fraction", fraction), ("top", top), ("left", left))
                     if value is not None]
            if given:
                raise ValueError(f"layout='flair' fixes the box (rows H/6..5H/6, columns W/2..5W/6); drop "
                                 f"{', '.join(given)}, or use the default layout='centred' to place a box yourself")
            make = flair_box_mask
        else:
            size, fraction = check_box_args(size, fraction)
            make = lambda h, w: box_mask(h, w, size=size, fraction=fraction, top=top, left=left)  # noqa: E731
        super().__init__(make, noise_std=noise_std, poisson_rate=poisson_rate)
        self.size, self.fraction, self.top, self.left, self.layout = size, fraction, top, left, layout

    def _mask_source(self) -> str:
        if self.layout == "flair":
            return "the FLAIR box"
        return f"a box of size={self.size!r}" if self.size is not None else f"a box of fraction={self.fraction!r}"


class RandomInpainting(Inpainting):
    """Uniformly random missing pixels: exactly ``fraction`` of them, drawn from ``seed``."""

    def __init__(self, fraction: float = 0.5, seed: int = 0, noise_std: float = 0.0,
                 poisson_rate: float | None = None):
        random_mask(2, 2, fraction, seed)  # validates the arguments now rather than at first use
        super().__init__(lambda h, w: random_mask(h, w, fraction, seed), noise_std=noise_std,
                         poisson_rate=poisson_rate)
        self.fraction, self.seed = fraction, seed

    def _mask_source(self) -> str:
        return f"a random mask of fraction={self.fraction!r}"


class FreeformInpainting(Inpainting):
    """Free-form brush-stroke holes drawn from ``seed`` (see :func:`operators.masks.freeform_mask`)."""

    def __init__(self, strokes: int = 4, max_vertices: int = 8, max_width: float = 0.08, seed: int = 0,
                 noise_std: float = 0.0, poisson_rate: float | None = None):
        freeform_mask(8, 8, strokes, max_vertices, max_width, seed)  # validates the arguments now
        super().__init__(lambda h, w: freeform_mask(h, w, strokes, max_vertices, max_width, seed),
                         noise_std=noise_std, poisson_rate=poisson_rate)
        self.strokes, self.max_vertices, self.max_width, self.seed = strokes, max_vertices, max_width, seed

    def _mask_source(self) -> str:
        return f"free-form strokes of max_width={self.max_width!r}"


class FileMaskInpainting(Inpainting):
    """A mask read from an image file: white = missing (1), black = kept (0), pixels at or above ``threshold``
    (in [0, 1]) count as white; ``invert=True`` swaps. Instead of ``path``, ``name`` picks a mask shipped with
    flowsteer (``operators.masks.NAMED_MASKS``): ``"flair_div2k"`` is the 768x768 mask of FLAIR's DIV2K
    inpainting benchmark (``DIV2k_mask.npy`` of prs-eth/FLAIR, commit ``c4f55f7``, True = observed, stored here
    as a 1-bit PNG, white = missing; 15.94 % missing)."""

    _warn_on_init = False

    def __init__(self, path: str | os.PathLike | None = None, invert: bool = False, threshold: float = 0.5,
                 noise_std: float = 0.0, poisson_rate: float | None = None, name: str | None = None):
        if path is None and name is None:
            raise ValueError(f"inpaint_mask needs the parameter(s) ['path'] (a mask image, white = missing) or "
                             f"['name'] (a shipped mask: {', '.join(map(repr, NAMED_MASKS))})")
        if path is not None and name is not None:
            raise ValueError("give either path (a mask image) or name (a shipped mask) for inpaint_mask, not both")
        file = named_mask_path(name) if name is not None else path
        super().__init__(mask_from_file(file, invert=invert, threshold=threshold), noise_std=noise_std,
                         poisson_rate=poisson_rate)
        self.path, self.name = os.fspath(file), name
        self.invert, self.threshold = bool(invert), threshold
        self._warn_if_degenerate(self.fixed_mask)

    def spec_arguments(self) -> dict | None:
        arguments = super().spec_arguments()
        if arguments is not None and self.name is not None:
            arguments["path"] = None  # a shipped mask is recorded by its name, not by where it is installed
        return arguments

    def _check_size(self, height: int, width: int) -> None:
        mask_height, mask_width = self.fixed_mask.shape[-2:]
        if self.name is not None and (mask_height, mask_width) != (height, width):
            raise ValueError(
                f"the shipped mask {self.name!r} is {mask_height}x{mask_width} but the image is {height}x{width}; "
                f"resize or crop the image to {mask_height}x{mask_width} first (--resize works when the model's "
                f"working size is {max(mask_height, mask_width)})"
            )
        super()._check_size(height, width)

    def _mask_source(self) -> str:
        source = f"the shipped mask {self.name!r}" if self.name is not None else f"the mask file {self.path!r}"
        return source + (" with invert=True" if self.invert else "")
