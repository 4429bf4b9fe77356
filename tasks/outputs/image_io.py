"""Image files <-> float tensors in [-1, 1] (NCHW), with atomic writes.

Conversion rules on load, applied in this order:

1. EXIF orientation is applied (the pixels are turned as a viewer shows them).
2. Bit depth: 8-bit modes are divided by 255, 16-bit and 32-bit integer modes ("I;16", "I") by 65535,
   float mode "F" is taken as [0, 1]; everything is clipped to [0, 1] and then mapped to [-1, 1].
3. Transparency (RGBA, LA, palette images with a transparent colour) is composited over a WHITE background.
4. Channels: with ``channels=3`` grayscale is replicated to R = G = B and other colour spaces (CMYK, YCbCr,
   ...) are converted to RGB by PIL; with ``channels=1`` colour is reduced to BT.601 luma
   (0.299 R + 0.587 G + 0.114 B, as PIL's "L" conversion).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from guidance.loading.files import write_atomic
from guidance.loading.images import image_tensor, open_image, to_pil  # noqa: F401  (to_pil re-exported: tasks.to_pil)

_SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
                 ".webp": "WEBP"}


def load_image(source, channels: int = 3) -> torch.Tensor:
    """An image as a (B, channels, H, W) float32 tensor in [-1, 1], from a path or PIL image (B = 1; rules in the
    module doc), a NumPy array (diffusers' convention: uint8, or float in [0, 1]; (H, W[, C]) or (B, H, W, C)) or a
    tensor (flowsteer's convention: float in [-1, 1], (C, H, W) or (B, C, H, W)), wherever an image is taken
    (:func:`guidance.loading.images.image_tensor` converts all but paths)."""
    if not isinstance(source, (str, os.PathLike)):
        return image_tensor(source, channels)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"image file {str(path)!r} does not exist")
    try:
        with open_image(path) as opened:
            opened.load()
            image = opened.copy()
            image.info.update(opened.info)
            exif = opened.getexif()
    except OSError as error:
        raise ValueError(f"cannot read {str(path)!r} as an image: {error}") from None
    if exif:
        image.info["exif"] = exif.tobytes()
    return image_tensor(image, channels)


def save_image(image, path: str | os.PathLike, grid: bool = False) -> Path | list[Path]:
    """Write an image in [-1, 1] to ``path`` atomically; the format follows the extension (PNG, JPEG, ...). A batch
    of B > 1 is written one file per image (``name-0.png``, ``name-1.png``, ...; the list of paths is returned), or
    with ``grid=True`` as one grid image at ``path``. A PIL image is written as it is."""
    path = Path(path)
    fmt = _SAVE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format of {str(path)!r}; use one of {sorted(_SAVE_FORMATS)}")
    if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[0] > 1:
        pictures = [to_pil(one[None]) for one in image]  # every image checked before anything is written
        if grid:
            from .grid import image_grid

            sheet = image_grid([[one[None] for one in image]])
            return write_atomic(path, lambda temporary: sheet.save(temporary, format=fmt))
        return [write_atomic(path.with_name(f"{path.stem}-{i}{path.suffix}"),
                             lambda temporary, picture=picture: picture.save(temporary, format=fmt))
                for i, picture in enumerate(pictures)]
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    return write_atomic(path, lambda temporary: pil.save(temporary, format=fmt))
