"""Inpainting masks: (1, 1, H, W) float tensors with 1 (white) where a pixel is missing, to be filled, and 0
(black) where it is kept. This is the one mask convention of flowsteer: :class:`operators.Inpainting`, mask files
(``inpaint_mask``) and ``flowsteer edit`` (white = edit) all read 1 / white as the region to fill or change."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageDraw, UnidentifiedImageError


def _check_fraction(fraction, name: str = "fraction", closed: bool = False) -> float:
    """``fraction`` as a float in (0, 1), or in [0, 1] when ``closed`` (a mask of none or all of the pixels)."""
    number = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
    if closed and not (number and 0 <= fraction <= 1):
        raise ValueError(f"{name} must be a number in [0, 1], got {fraction!r}")
    if not closed and not (number and 0 < fraction < 1):
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {fraction!r}")
    return float(fraction)


def check_box_args(size, fraction) -> tuple[tuple[int, int] | None, float | None]:
    """Validate a box given by ``size`` (side or (h, w)) or ``fraction`` (default 0.25); return them normalised."""
    if size is not None and fraction is not None:
        raise ValueError("give either size or fraction for a box mask, not both")
    if size is None:
        return None, _check_fraction(0.25 if fraction is None else fraction, closed=True)
    sides = (size, size) if isinstance(size, int) else tuple(size)
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
        raise ValueError(f"size must be a positive integer or a pair of them, got {size!r}")
    return sides, None


def box_mask(height: int, width: int, size: int | tuple[int, int] | None = None, fraction: float | None = None,
             top: int | None = None, left: int | None = None) -> torch.Tensor:
    """A missing rectangle: ``size`` (side or (h, w)) or ``fraction`` of the image area (the box then has the
    image's aspect ratio: sides sqrt(fraction)·H by sqrt(fraction)·W). Centred unless ``top``/``left`` are given;
    ``fraction=0`` is an empty box.
    """
    size, fraction = check_box_args(size, fraction)
    if size is None:
        f = math.sqrt(fraction)
        box_h, box_w = (max(1, round(f * height)), max(1, round(f * width))) if fraction else (0, 0)
    else:
        box_h, box_w = size
    if box_h > height or box_w > width:
        raise ValueError(f"box of {box_h}x{box_w} does not fit in an image of {height}x{width}; use a smaller size")
    top = (height - box_h) // 2 if top is None else top
    left = (width - box_w) // 2 if left is None else left
    if not (0 <= top <= height - box_h and 0 <= left <= width - box_w):
        raise ValueError(
            f"box of {box_h}x{box_w} at top={top}, left={left} leaves the {height}x{width} image; "
            f"top must be in [0, {height - box_h}] and left in [0, {width - box_w}]"
        )
    mask = torch.zeros(1, 1, height, width)
    mask[..., top:top + box_h, left:left + box_w] = 1
    return mask


BOX_LAYOUTS = ("centred", "flair")


def flair_box_mask(height: int, width: int) -> torch.Tensor:
    """The box of FLAIR's inpainting benchmark (Erbach et al., "Solving Inverse Problems with FLAIR", NeurIPS 2025;
    ``configs/inpainting.yaml`` of prs-eth/FLAIR, commit ``c4f55f7``: ``mask: [128, 640, 384, 640]`` at 768x768),
    scaled with the image: rows H/6 to 5H/6, columns W/2 to 5W/6 (end excluded), 2/9 = 22.2 % of the pixels
    missing. Each edge is rounded to the nearest pixel, halves up, so the box is exact whenever H and W are
    multiples of 6 (768: rows 128:640, columns 384:640) and within half a pixel per edge otherwise.
    """
    if min(height, width) < 6:
        raise ValueError(f"the FLAIR box needs an image of at least 6x6 pixels, got {height}x{width}")
    top, bottom = (2 * height + 6) // 12, (10 * height + 6) // 12  # round(H/6), round(5H/6), halves up
    left, right = (width + 1) // 2, (10 * width + 6) // 12
    mask = torch.zeros(1, 1, height, width)
    mask[..., top:bottom, left:right] = 1
    return mask


EXAMPLES = Path(__file__).parent / "examples"

#: Masks shipped with flowsteer, by name: (file under operators/examples/, what it is). White = missing.
NAMED_MASKS = {
    "flair_div2k": ("flair_div2k_mask_768.png", "FLAIR's DIV2K inpainting mask, 768x768, 15.94 % missing"),
}


def named_mask_path(name: str) -> str:
    """The file of a shipped mask (see ``NAMED_MASKS``; ``operators/examples/README.md`` names their sources)."""
    if not isinstance(name, str) or name not in NAMED_MASKS:
        known = "; ".join(f"{key} ({about})" for key, (_, about) in NAMED_MASKS.items())
        raise ValueError(f"unknown mask name {name!r}; the shipped masks are: {known}")
    return str(EXAMPLES / NAMED_MASKS[name][0])


def random_mask(height: int, width: int, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Exactly round(fraction·H·W) missing pixels (1), chosen uniformly at random from ``seed``."""
    _check_fraction(fraction, closed=True)
    generator = torch.Generator().manual_seed(int(seed))
    missing = torch.randperm(height * width, generator=generator)[: round(fraction * height * width)]
    mask = torch.zeros(height * width)
    mask[missing] = 1
    return mask.reshape(1, 1, height, width)


def freeform_mask(height: int, width: int, strokes: int = 4, max_vertices: int = 8, max_width: float = 0.08,
                  seed: int = 0) -> torch.Tensor:
    """Free-form brush strokes (as in DeepFill v2 / LaMa training masks): ``strokes`` polylines of up to
    ``max_vertices`` random segments, each drawn with round joints and a brush up to ``max_width`` times the
    shorter image side, all drawn from ``seed``; the strokes are the missing pixels (1). PIL draws the strokes (kornia has no stroke rasteriser).
    """
    if not isinstance(strokes, int) or strokes < 1:
        raise ValueError(f"strokes must be a positive integer, got {strokes!r}")
    if not isinstance(max_vertices, int) or max_vertices < 1:
        raise ValueError(f"max_vertices must be a positive integer, got {max_vertices!r}")
    _check_fraction(max_width, "max_width")
    generator = torch.Generator().manual_seed(int(seed))

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))

    side = min(height, width)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(strokes):
        brush = max(1, round(uniform(0.3, 1.0) * max_width * side))
        x, y = uniform(0, width - 1), uniform(0, height - 1)
        points = [(x, y)]
        for _ in range(1 + int(uniform(0, max_vertices))):
            angle = uniform(0, 2 * math.pi)
            length = uniform(0.05, 0.25) * side
            x = min(max(x + length * math.cos(angle), 0), width - 1)
            y = min(max(y + length * math.sin(angle), 0), height - 1)
            points.append((x, y))
        draw.line(points, fill=255, width=brush)
        for px, py in points:
            r = brush / 2
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    missing = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).reshape(height, width) > 0
    return missing.float()[None, None]


def mask_from_file(path: str | os.PathLike, invert: bool = False, threshold: float = 0.5) -> torch.Tensor:
    """Load a mask image as a mask (1 = missing). Rule: WHITE marks pixels to fill (missing, 1), BLACK pixels
    are kept (0) — the convention of diffusers' inpainting pipelines; ``invert=True`` swaps it. The image is
    converted to grayscale and thresholded at ``threshold`` (in [0, 1]).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"the mask file must be given as a path, got {type(path).__name__} {path!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"the mask file {path!r} is a directory; give the path of a mask image (white = missing)")
    if not os.path.isfile(path):
        raise ValueError(f"the mask file {path!r} does not exist; check the path")
    try:
        with warnings.catch_warnings():  # PIL warns, then decodes, up to twice its pixel limit: refuse at the limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                gray = image.convert("L")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"the mask file {path!r} is too large to open safely ({error}); give a mask of the image's "
                         f"size") from None
    except UnidentifiedImageError as error:
        raise ValueError(f"the mask file {path!r} is not an image (Pillow cannot identify its format); give a PNG "
                         f"or JPEG mask, white = missing, black = kept") from error
    except PermissionError as error:
        raise ValueError(f"the mask file {path!r} cannot be read (permission denied); check its permissions") from error
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt image data
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"the mask file {path!r} is not an image ({reason}); give a PNG or JPEG mask, "
                         f"white = missing, black = kept") from error
    values = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).reshape(gray.height, gray.width)
    missing = values.float() / 255 >= threshold
    if invert:
        missing = ~missing
    return missing.float()[None, None]


def as_mask(mask) -> torch.Tensor:
    """Bring a user mask of shape (H, W), (1, H, W), (B, 1, H, W) or (B, C, H, W) to 4-D float (1 = missing)."""
    mask = torch.as_tensor(mask)
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[None]
    if mask.ndim != 4:
        raise ValueError(f"mask must have shape (H, W), (1, H, W) or (B, C, H, W), got {tuple(mask.shape)}")
    mask = mask.to(torch.get_default_dtype())
    if mask.numel() and (not bool(torch.isfinite(mask).all()) or mask.min() < 0 or mask.max() > 1):
        raise ValueError("mask values must lie in [0, 1] (1 = missing, to be filled; 0 = kept)")
    return mask
