"""Side-by-side image grids with captions, for restore outputs and benchmark reports."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from guidance.loading.files import write_atomic
from guidance.loading.images import to_pil

__all__ = ["MIN_CELL", "enlarge", "image_grid", "save_grid"]

#: the smallest side of a grid cell in pixels: smaller images are enlarged by an integer factor to reach it
MIN_CELL = 128
#: caption font size (pixels) and the height of one caption line with the bitmap font fallback
FONT_SIZE = 12
CAPTION_HEIGHT = 14


@lru_cache(maxsize=1)
def _font():
    """Pillow's scalable default font at FONT_SIZE; its small bitmap font where FreeType is missing."""
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _line_height(font) -> int:
    try:
        ascent, descent = font.getmetrics()
    except AttributeError:  # the bitmap font
        return CAPTION_HEIGHT
    return ascent + descent + 1


def _text_width(font, line: str) -> int:
    try:
        return math.ceil(font.getlength(line))
    except AttributeError:  # pragma: no cover - very old Pillow
        return 6 * len(line)


def _as_rgb(image: torch.Tensor) -> torch.Tensor:
    """(1, C, h, w) in [-1, 1] -> (3, h, w), gray replicated."""
    image = image.detach().float().cpu()[:1]
    if image.shape[1] == 1:
        image = image.expand(-1, 3, -1, -1)
    return image[0]


def enlarge(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour enlargement by an integer ``factor``: every pixel becomes a factor x factor block."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"the enlargement factor must be an integer >= 1, got {factor!r}")
    if factor == 1:
        return image
    return image.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def image_grid(rows: Sequence[Sequence[torch.Tensor]], captions: Sequence[Sequence[str]] | None = None,
               padding: int = 2, min_cell: int = MIN_CELL) -> Image.Image:
    """A PIL grid of images (each (1, C, h, w) in [-1, 1]). Every cell fits the largest image, enlarged by an
    integer factor until its shorter side is at least ``min_cell`` pixels (0: no enlargement); each image is
    enlarged by the largest integer factor that fits the cell (nearest neighbour: pixels are repeated, never
    blurred) and centred in it. Optional captions (same nesting; ``"\\n"`` starts a new line, e.g.
    ``"flair\\n27.31 dB"``) are written under the cells."""
    if isinstance(min_cell, bool) or not isinstance(min_cell, int) or min_cell < 0:
        raise ValueError(f"min_cell must be an integer >= 0 (pixels), got {min_cell!r}")
    cells = [image for row in rows for image in row]
    if not cells:
        raise ValueError("image_grid needs at least one image")
    height = max(int(image.shape[-2]) for image in cells)
    width = max(int(image.shape[-1]) for image in cells)
    scale = max(1, math.ceil(min_cell / min(height, width)))
    image_height, image_width = height * scale, width * scale
    font = _font()
    lines = [[str(text).split("\n") for text in row] for row in captions] if captions else []
    line_height = _line_height(font)
    caption = line_height * max((len(t) for row in lines for t in row), default=0) + 2 if captions else 0
    cell_width = max([image_width] + [_text_width(font, line) + 4 for row in lines for t in row for line in t])
    columns = max(len(row) for row in rows)
    canvas = Image.new("RGB", (columns * (cell_width + padding) + padding,
                               len(rows) * (image_height + caption + padding) + padding), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            left, top = padding + c * (cell_width + padding), padding + r * (image_height + caption + padding)
            image = _as_rgb(image)
            h, w = int(image.shape[-2]), int(image.shape[-1])
            factor = max(1, min(image_height // h, image_width // w))
            canvas.paste(to_pil(enlarge(image, factor)),
                         (left + (cell_width - w * factor) // 2, top + (image_height - h * factor) // 2))
            if r < len(lines) and c < len(lines[r]):
                for n, line in enumerate(lines[r][c]):
                    draw.text((left + 2, top + image_height + 1 + n * line_height), line, fill="black", font=font)
    return canvas


def save_grid(path: str | os.PathLike, rows, captions=None, padding: int = 2, min_cell: int = MIN_CELL) -> Path:
    """Write :func:`image_grid` as a PNG atomically."""
    grid = image_grid(rows, captions, padding=padding, min_cell=min_cell)
    return write_atomic(path, lambda temporary: grid.save(temporary, format="PNG"))
