"""Images in and out of flowsteer's own form, float tensors in [-1, 1] (NCHW).

In: :func:`image_tensor` takes a PIL image, a NumPy array (diffusers' convention) or a tensor. For PIL images, in
this order: EXIF orientation is applied; 8-bit modes are divided by 255, 16-bit and 32-bit integer modes by 65535,
mode "F" is taken as [0, 1]; transparency is composited over white; grayscale is replicated to RGB, or with
``channels=1`` colour is reduced to BT.601 luma (0.299 R + 0.587 G + 0.114 B).

Out, as diffusers returns images: ``output_type="pil"`` (a list of PIL images), ``"np"`` (a (B, H, W, C) float32
array in [0, 1]) or ``"pt"`` (a (B, C, H, W) float32 tensor in [0, 1]); sampling results also take ``"latent"``
(the final latent, undecoded).
"""

from __future__ import annotations

import os
import re
import warnings

import torch
from PIL import Image

from operators.base import image_input, is_pil_or_array, with_channels

__all__ = ["OUTPUT_TYPES", "ImageOutput", "ImageTooLargeError", "check_output_type", "image_tensor", "open_image",
           "output_images", "to_pil"]

#: the forms of ``.images``, as diffusers names them; "latent" (the final latent, undecoded) only where a result
#: keeps one (:func:`guidance.sample` and the methods, not the tasks' results, which hold images)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_output_type(output_type: str, latent: bool = False) -> str:
    """``output_type`` when it is one of :data:`OUTPUT_TYPES`; "latent" only with ``latent=True`` (a result that
    keeps its latent)."""
    if output_type == "latent" and not latent:
        raise ValueError("output_type='latent' returns the final latent, which only guidance.sample and the methods "
                         "keep; this result holds images: use 'pil', 'np' or 'pt'")
    if output_type not in OUTPUT_TYPES:
        allowed = OUTPUT_TYPES if latent else OUTPUT_TYPES[:-1]
        raise ValueError(f"output_type must be one of {', '.join(map(repr, allowed))}, as diffusers names them, "
                         f"got {output_type!r}")
    return output_type


class ImageTooLargeError(ValueError):
    """An image file declares more pixels than PIL reads safely (a decompression bomb); the message names the file,
    its pixel count and the fix."""


def open_image(path: str | os.PathLike, what: str = "image file") -> Image.Image:
    """``PIL.Image.open(path)`` (lazy; use it in a ``with``), refusing in one line a file whose header declares
    more pixels than PIL reads safely (``PIL.Image.MAX_IMAGE_PIXELS``: a decompression bomb, or a photo far too
    large), before any pixel is decoded. Other failures are PIL's own (OSError for a file that is no image)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        found = [int(n) for n in re.findall(r"\d+", str(error))]
        pixels = f"{found[0]:,} pixels" if found else "more pixels than allowed"
        limit = Image.MAX_IMAGE_PIXELS or (found[1] if len(found) > 1 else 0)
        side = int(limit ** 0.5)
        raise ImageTooLargeError(
            f"the {what} {os.fspath(path)!r} declares {pixels}, more than the {limit:,} read safely (a "
            f"decompression bomb or a far too large image); resize it below that (e.g. {side}x{side}) or, for a "
            f"file you trust, raise PIL.Image.MAX_IMAGE_PIXELS") from None


def _tensor_image(tensor: torch.Tensor, channels: int) -> torch.Tensor:
    """A tensor in flowsteer's convention: (C, H, W) or (B, C, H, W), float in [-1, 1] (uint8: 0..255)."""
    if tensor.numel() == 0:
        raise ValueError(f"the image tensor is empty (shape {tuple(tensor.shape)}, no pixels); pass an image of at "
                         f"least 1x1 pixels, (C, H, W) or (B, C, H, W) in [-1, 1]")
    if tensor.ndim == 3:
        tensor = tensor[None]
    if tensor.ndim != 4 or tensor.shape[1] not in (1, 3):
        raise ValueError(f"an image tensor must have shape (C, H, W) or (B, C, H, W) with C = 1 or 3, got "
                         f"{tuple(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        return with_channels(tensor.float() / 255, channels) * 2 - 1
    if not tensor.is_floating_point():
        raise ValueError(f"an image tensor must be float in [-1, 1] or uint8, got {tensor.dtype}")
    tensor = tensor.detach().float()
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("the image tensor contains NaN or infinite values")
    low, high = float(tensor.min()), float(tensor.max())
    if low < -1 - 1e-3 or high > 1 + 1e-3:
        fix = "map [0, 255] images with x / 127.5 - 1 (or pass them as uint8)" if high > 2 else \
            "map [0, 1] images with x * 2 - 1"
        raise ValueError(f"an image tensor is taken in [-1, 1] (flowsteer's convention), got values in "
                         f"[{low:.3g}, {high:.3g}]; {fix}")
    return with_channels((tensor.clamp(-1, 1) + 1) / 2, channels) * 2 - 1


def image_tensor(source, channels: int = 3) -> torch.Tensor:
    """A PIL image (B = 1), a NumPy array (uint8 / uint16 / bool, or float in [0, 1]; (H, W[, C]) or (B, H, W, C))
    or a tensor (float in [-1, 1] or uint8; (C, H, W) or (B, C, H, W)) as a (B, channels, H, W) float32 tensor in
    [-1, 1]."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if source is None:
        raise ValueError("no image was given (None): pass a path, a PIL image, a NumPy array or a tensor")
    if isinstance(source, torch.Tensor):
        return _tensor_image(source, channels).contiguous()
    if not is_pil_or_array(source):
        raise ValueError(f"cannot read an image from a {type(source).__name__}: pass a path, a PIL image, a NumPy "
                         f"array or a tensor")
    return image_input(source, channels)  # the operators' own conversion: op(pil_image) reads it the same


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (1, C, H, W) or (C, H, W) tensor in [-1, 1] (C = 1 or 3) as an 8-bit PIL image (values clipped)."""
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"can only convert one image at a time, got a batch of {image.shape[0]}; index it "
                             f"first (or ask for output_type='pil', a list)")
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


def output_images(image: torch.Tensor | None, output_type: str = "pil"):
    """A batch (B, C, H, W) in [-1, 1] as ``output_type``: a list of B PIL images, a (B, H, W, C) NumPy array in
    [0, 1] or a (B, C, H, W) tensor in [0, 1] (on the CPU, float32)."""
    check_output_type(output_type)  # "latent" is no form of an image (ImageOutput.images gives the latent itself)
    if image is None:
        raise ValueError("there is no image: the method ran with decode=False (or on sequences); use .x")
    if output_type == "pil":
        return [to_pil(one) for one in image]
    unit = ((image.detach().to("cpu", torch.float32).clamp(-1, 1) + 1) / 2).contiguous()
    return unit if output_type == "pt" else unit.permute(0, 2, 3, 1).numpy()


class ImageOutput:
    """``.images``: the result's ``image`` batch as its ``output_type`` (converted when read); with "latent", the
    final latent ``x`` itself, as diffusers returns latents (flowsteer's (B, C, h, w) layout, unpacked, float32)."""

    output_type: str = "pil"

    @property
    def images(self):
        if self.output_type == "latent":
            check_output_type("latent", latent=hasattr(self, "x"))
            return self.x
        return output_images(self.image, self.output_type)
