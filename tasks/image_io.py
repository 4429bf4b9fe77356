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
from PIL import Image, ImageOps

from guidance.files import write_atomic

_SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
                 ".webp": "WEBP"}


def _to_unit_float(image: Image.Image) -> torch.Tensor:
    """(H, W, C) float32 in [0, 1] from an image in mode L, RGB, I or F."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        image = image.convert("I")
    raw = torch.frombuffer(bytearray(image.tobytes()), dtype={"L": torch.uint8, "RGB": torch.uint8,
                                                             "I": torch.int32, "F": torch.float32}[image.mode])
    scale = {"L": 255.0, "RGB": 255.0, "I": 65535.0, "F": 1.0}[image.mode]
    values = raw.to(torch.float32) / scale
    return values.reshape(image.height, image.width, -1).clamp(0, 1)


def load_image(source: str | os.PathLike | Image.Image, channels: int = 3) -> torch.Tensor:
    """Load a path or PIL image as a (1, channels, H, W) float32 tensor in [-1, 1] (rules in the module doc)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if isinstance(source, Image.Image):
        image = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"image file {str(path)!r} does not exist")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
                image.info.update(opened.info)
                exif = opened.getexif()
        except OSError as error:
            raise ValueError(f"cannot read {str(path)!r} as an image: {error}") from None
        if exif:
            image.info["exif"] = exif.tobytes()
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    if image.mode not in ("L", "RGB", "I", "F") and not image.mode.startswith("I;16"):
        image = image.convert("RGB")
    unit = _to_unit_float(image)
    if unit.shape[-1] == 3 and channels == 1:
        unit = (unit * torch.tensor([0.299, 0.587, 0.114])).sum(-1, keepdim=True)
    elif unit.shape[-1] == 1 and channels == 3:
        unit = unit.expand(-1, -1, 3)
    return (unit.permute(2, 0, 1)[None] * 2 - 1).contiguous()


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (1, C, H, W) or (C, H, W) tensor in [-1, 1] (C = 1 or 3) as an 8-bit PIL image (values clipped)."""
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"can only save one image at a time, got a batch of {image.shape[0]}; index it first")
        image = image[0]
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (1, C, H, W) or (C, H, W) with C = 1 or 3, got {tuple(image.shape)}")
    image = image.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(image).all()):
        raise ValueError("image contains NaN or infinite values; nothing was written")
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    if pixels.shape[-1] == 1:
        return Image.fromarray(pixels[..., 0].numpy(), mode="L")
    return Image.fromarray(pixels.numpy(), mode="RGB")


def save_image(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a tensor in [-1, 1] to ``path`` atomically; the format follows the extension (PNG, JPEG, ...)."""
    path = Path(path)
    fmt = _SAVE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format of {str(path)!r}; use one of {sorted(_SAVE_FORMATS)}")
    pil = to_pil(image)
    return write_atomic(path, lambda temporary: pil.save(temporary, format=fmt))
