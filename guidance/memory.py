"""The memory a run needs, estimated before it starts, and the one refusal every command and method shares.

The estimate is the model's measured ``memory_gib_per_megapixel`` (peak memory above the loaded weights, per
megapixel of image, times the batch) where the model has one; otherwise a lower bound from the sizes of the
tensors the run must hold (the latent states and the decoded float32 images), so that a size no machine could
hold (``--size 100000 100000``) is refused at once on any model.
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_memory", "estimate_memory_gib", "free_memory_gib", "scaled_side"]

#: the share of the free memory a run may plan to use
HEADROOM = 0.9
#: float32 tensors of the latent size a sampling loop holds at once (state, velocity, clean estimate, update)
LATENT_COPIES = 4
#: float32 tensors of the image size a run holds at once (decoded image, clamped copy, output)
IMAGE_COPIES = 3


def estimate_memory_gib(model, height: int, width: int, batch: int = 1) -> tuple[float, str]:
    """(GiB, how it was estimated) for a ``batch`` of ``height`` x ``width`` images on ``model``."""
    per_megapixel = getattr(model, "memory_gib_per_megapixel", None)
    if per_megapixel:
        return per_megapixel * height * width * batch / 1e6, f"{per_megapixel:g} GiB per megapixel on this model"
    latent = math.prod(model.latent_shape(height, width))
    image = int(getattr(model, "image_channels", 3) or 3) * height * width
    gib = 4 * batch * (LATENT_COPIES * latent + IMAGE_COPIES * image) / 2**30
    return gib, "at least, for its tensors alone"


def free_memory_gib(device: torch.device) -> float | None:
    """Memory free for a run on ``device`` in GiB (CUDA: cudaMemGetInfo; CPU: MemAvailable), None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**30
    try:
        import psutil

        return psutil.virtual_memory().available / 2**30
    except (ImportError, OSError):  # pragma: no cover - psutil ships with accelerate
        return None


def scaled_side(side: int, scale: float, multiple: int) -> int:
    """``side * scale`` rounded down to a multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, math.floor(side * scale / multiple) * multiple)


def check_memory(model, height: int, width: int, batch: int = 1, what: str = "run") -> float | None:
    """The estimated peak memory (GiB) of a ``batch`` of ``height`` x ``width`` images (:func:`estimate_memory_gib`);
    a ValueError before anything runs when it is beyond the memory free here (CUDA: the device's free memory; CPU:
    the machine's available memory), naming a size that fits. None when the free memory cannot be read."""
    free = free_memory_gib(torch.device(getattr(model, "device", "cpu")))
    if free is None:
        return None
    estimate, basis = estimate_memory_gib(model, height, width, batch)
    if estimate <= HEADROOM * free:
        return estimate
    scale = math.sqrt(HEADROOM * free / estimate)
    multiple = int(getattr(model, "size_multiple", 1) or 1)
    fits = tuple(scaled_side(side, scale, multiple) for side in (height, width))
    limit = getattr(model, "working_size", None) or getattr(model, "max_size", None)
    resize = (f" (--resize fits an image to the model's working size, {limit} pixels)"
              if limit and what == "restoration" else "")
    raise ValueError(f"a {height}x{width} {what}{f' of {batch} images' if batch > 1 else ''} needs about "
                     f"{estimate:.1f} GiB ({basis}), more than the {free:.1f} GiB free here; use at most "
                     f"{fits[0]}x{fits[1]}{f' or fewer images' if batch > 1 else ''}{resize} or a machine with more "
                     f"memory")
