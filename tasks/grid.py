"""Side-by-side image grids with captions, for restore outputs and benchmark reports."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from guidance.files import write_atomic

from .image_io import to_pil

__all__ = ["image_grid", "save_grid"]

CAPTION_HEIGHT = 14


def _as_rgb(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, C, h, w) in [-1, 1] -> (3, H, W): gray replicated, smaller images enlarged by pixel repetition."""
    image = image.detach().float().cpu()[:1]
    if image.shape[1] == 1:
        image = image.expand(-1, 3, -1, -1)
    if tuple(image.shape[-2:]) != size:
        image = F.interpolate(image, size=size, mode="nearest")
    return image[0]


def image_grid(rows: Sequence[Sequence[torch.Tensor]], captions: Sequence[Sequence[str]] | None = None,
               padding: int = 2) -> Image.Image:
    """A PIL grid of images (each (1, C, h, w) in [-1, 1]); every cell takes the size of the largest image,
    smaller ones (e.g. a low-resolution measurement) are shown enlarged with nearest-neighbour pixels. Optional
    captions (same nesting) are written under the cells."""
    cells = [image for row in rows for image in row]
    if not cells:
        raise ValueError("image_grid needs at least one image")
    height = max(int(image.shape[-2]) for image in cells)
    width = max(int(image.shape[-1]) for image in cells)
    if captions:  # room for the longest caption (about 6 pixels a character); images are centred in their cell
        width = max(width, 6 * max(len(str(t)) for row in captions for t in row) + 4)
    caption = CAPTION_HEIGHT if captions else 0
    columns = max(len(row) for row in rows)
    canvas = Image.new("RGB", (columns * (width + padding) + padding,
                               len(rows) * (height + caption + padding) + padding), "white")
    draw = ImageDraw.Draw(canvas)
    image_height = max(int(image.shape[-2]) for image in cells)
    image_width = max(int(image.shape[-1]) for image in cells)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            left, top = padding + c * (width + padding), padding + r * (height + caption + padding)
            canvas.paste(to_pil(_as_rgb(image, (image_height, image_width))), (left + (width - image_width) // 2, top))
            if captions:
                draw.text((left + 2, top + height + 1), str(captions[r][c]), fill="black")
    return canvas


def save_grid(path: str | os.PathLike, rows, captions=None) -> Path:
    """Write :func:`image_grid` as a PNG atomically."""
    grid = image_grid(rows, captions)
    return write_atomic(path, lambda temporary: grid.save(temporary, format="PNG"))
