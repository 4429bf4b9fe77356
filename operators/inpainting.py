"""Inpainting: y = (1 − m) ⊙ x with a 0/1 mask m (1 = missing)."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable

import torch

from .base import LinearOperator, tensor_version
from .masks import (BOX_LAYOUTS, NAMED_MASKS, as_mask, box_mask, check_box_args, flair_box_mask, freeform_mask,
                    mask_from_file, named_mask_path, random_mask)


class Inpainting(LinearOperator):
    """Masking, A x = (1 − m) ⊙ x: the missing pixels are zeroed; self-adjoint (A^T = A); the pseudo-inverse
    divides by 1 − m where it is positive and fills 0 elsewhere, A^+ = A for a 0/1 mask (zero fill).

    Mask convention, the same everywhere in flowsteer (this class, :mod:`operators.masks`, mask files read by
    ``inpaint_mask`` and ``flowsteer edit``): 1 (white) = missing, the pixels to fill; 0 (black) = kept.
    :meth:`missing_for` gives the mask m for an image, :meth:`observed_for` the weights 1 − m that A applies.
    A mask that marks every pixel missing (nothing is measured) or none (A is the identity) is allowed but warned
    about, once per operator: when a tensor mask is given, or when a mask function first builds one.

    State: a tensor mask is the buffer ``fixed_mask``; a mask built by the mask function for an H x W image is
    the buffer ``mask_HxW`` (shape (1, 1, H, W), 1 = missing), registered when it is first built. Both are in
    ``state_dict()`` and move with ``.to()``. Loading a state_dict into an operator of the same class takes its
    built masks as they are (even masks the operator's own parameters would not make), and drops the masks the
    operator had built that the state_dict lacks; sizes it holds no mask for are built from the parameters.

    Args:
        mask: a fixed mask tensor (H, W) / (B, C, H, W) in [0, 1], 1 = missing, 0 = kept; or a function
            ``(height, width) -> mask`` (same convention) that makes the mask for each image size on first use.
    """

    structural_zeros = True
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

    # -- masks ----------------------------------------------------------------------------------------
    def _built_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The buffer ``mask_HxW``, built by the mask function (and registered) on first use."""
        name = built_mask_name(height, width)
        mask = self._buffers.get(name)
        if mask is None:
            with torch.inference_mode(False):  # a buffer, even when first used under inference mode
                mask = as_mask(self._make_mask(height, width)).to(device)
            if tuple(mask.shape[-2:]) != (height, width):
                raise ValueError(f"the mask function returned a mask of shape {tuple(mask.shape)} for a "
                                 f"{height}x{width} image; it must return (height, width) or (B, C, height, width)")
            self._warn_if_degenerate(mask)
            self.register_buffer(name, mask)
        return mask

    def _converted(self, kind: str, source: torch.Tensor, like: torch.Tensor, make) -> torch.Tensor:
        """``make(source)`` on ``like``'s device and dtype, cached while ``source`` is unchanged (same tensor, same
        in-place version), so that A costs one multiplication and never reads a stale mask."""
        key = (kind, tuple(source.shape), like.device, like.dtype)
        stamp = (id(source), tensor_version(source))
        hit = self._cache.get(key)
        if hit is None or hit[0] != stamp:
            with torch.inference_mode(False):  # usable by autograd even when first made under inference mode
                hit = (stamp, make(source.to(device=like.device, dtype=like.dtype)))
            self._cache[key] = hit
        return hit[1]

    def _mask_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_mask is not None:
            mask = self.fixed_mask
            if mask.shape[0] not in (1, x.shape[0]) or mask.shape[1] not in (1, x.shape[1]):
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not broadcast to the image of shape {tuple(x.shape)}"
                )
            return mask
        return self._built_mask(x.shape[-2], x.shape[-1], x.device)

    def missing_for(self, x: torch.Tensor) -> torch.Tensor:
        """The mask m for an image ``x`` (1 = missing), on its device and in its dtype."""
        return self._converted("missing", self._mask_tensor(x), x, lambda m: m)

    def observed_for(self, x: torch.Tensor) -> torch.Tensor:
        """The weights 1 − m that A multiplies ``x`` by (1 = observed): the diagonal of A."""
        return self._converted("observed", self._mask_tensor(x), x, lambda m: 1 - m)

    #: The diagonal of A, 1 − m (1 = observed), under the name the latent-space fidelity weighting reads.
    mask_for = observed_for

    def measured_for(self, x: torch.Tensor) -> torch.Tensor:
        """True where 1 − m > 0: the holes (m = 1) are structural zeros of A x and get no noise."""
        return self._converted("measured", self._mask_tensor(x), x, lambda m: m < 1)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return self.observed_for(x) * x

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self._check_size(y.shape[-2], y.shape[-1])
        return self.observed_for(y) * y

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        """A^+ y = y / (1 − m) where 1 − m > 0, else 0: zero fill, A^+ = A for a 0/1 mask."""
        self._check_size(y.shape[-2], y.shape[-1])
        observed = self.observed_for(y)
        return torch.where(observed > 0, y / torch.where(observed > 0, observed, 1), torch.zeros_like(y))

    # -- state ----------------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Accept the built masks ``mask_HxW`` of a saved operator of the same class (see the class docstring)."""
        saved = {key[len(prefix):]: value for key, value in state_dict.items()
                 if key.startswith(prefix) and BUILT_MASK.fullmatch(key[len(prefix):])}
        if saved and self._make_mask is None:
            error_msgs.append(f"{prefix}{', '.join(sorted(saved))}: masks built by a mask function, but this "
                              f"{type(self).__name__} has a fixed mask (fixed_mask); load the state_dict into an "
                              f"operator of the class that saved it (BoxInpainting, RandomInpainting, ...)")
            saved = {}
        for name, value in list(saved.items()):
            height, width = (int(side) for side in BUILT_MASK.fullmatch(name).groups())
            problem = check_saved_mask(value, height, width)
            if problem:
                error_msgs.append(f"{prefix}{name}: {problem}")
                del saved[name]
        for name in [n for n in self._buffers if BUILT_MASK.fullmatch(n) and n not in saved]:
            del self._buffers[name]  # built from the parameters; the loaded state defines the operator
        home = next((t.device for t in self.buffers() if t is not None), None)
        for name, value in saved.items():  # the default loader below copies the values into these
            current = self._buffers.get(name)
            if current is None or current.shape != value.shape:
                device = current.device if current is not None else (home or value.device)
                dtype = current.dtype if current is not None else value.dtype
                self._buffers[name] = torch.empty(value.shape, device=device, dtype=dtype)
        if prefix + "fixed_mask" in state_dict and self.fixed_mask is not None:
            value = state_dict[prefix + "fixed_mask"]
            if isinstance(value, torch.Tensor) and value.shape != self.fixed_mask.shape:
                error_msgs.append(f"{prefix}fixed_mask: the saved mask has shape {tuple(value.shape)} but this "
                                  f"operator's mask has shape {tuple(self.fixed_mask.shape)}; build the operator "
                                  f"with a mask of the saved size")
        elif prefix + "fixed_mask" in state_dict:
            error_msgs.append(f"{prefix}fixed_mask: a fixed mask, but this {type(self).__name__} builds its masks "
                              f"with a mask function; load the state_dict into an Inpainting with a tensor mask "
                              f"(or the class that saved it)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._cache.clear()
        for name in saved:
            if name in self._buffers:
                self._warn_if_degenerate(self._buffers[name])


BUILT_MASK = re.compile(r"mask_(\d+)x(\d+)")


def built_mask_name(height: int, width: int) -> str:
    """The buffer name of the mask built for an image of ``height`` x ``width``."""
    return f"mask_{height}x{width}"


def check_saved_mask(value, height: int, width: int) -> str | None:
    """What is wrong with a saved ``mask_HxW`` entry (None: nothing): a floating 4-D tensor (1 or B, 1 or C, H, W)
    with values in [0, 1]."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return f"a built mask must be a floating tensor, got {type(value).__name__}"
    if value.ndim != 4 or tuple(value.shape[-2:]) != (height, width):
        return (f"the saved mask has shape {tuple(value.shape)}, but its name says it is for a {height}x{width} image, "
                f"shape (1, 1, {height}, {width}); the state_dict was not saved from an inpainting operator")
    if value.numel() and (not bool(torch.isfinite(value).all()) or value.min() < 0 or value.max() > 1):
        return "mask values must lie in [0, 1] (1 = missing, 0 = kept)"
    return None


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
