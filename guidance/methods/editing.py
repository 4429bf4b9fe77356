"""What every editor of a real image shares: the source image and its latent, the edit mask on the latent grid,
and the text conditions of the source and edit prompts (one rule for FlowChef editing, FlowEdit, RF-Inversion
and inversion editing)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..loading.images import image_tensor
from ..sampler import condition_batch
from .common import CountingModel

__all__ = ["as_pixel_mask", "check_source_image", "is_text", "latent_edit_mask", "refuse_scale_for_condition",
           "same_batch", "text_condition"]


def check_source_image(source_image: Any, method: str, height: int | None = None,
                       width: int | None = None) -> torch.Tensor:
    """The image to edit as a (B, C, H, W) float tensor in [-1, 1] (PIL images and NumPy arrays are converted, as
    images are taken everywhere); ``height`` and ``width``, when given, must be its size."""
    if source_image is None:
        raise ValueError(f"{method} needs source_image, the image to edit (a tensor in [-1, 1], a PIL image or a "
                         f"NumPy array)")
    if not isinstance(source_image, torch.Tensor):
        source_image = image_tensor(source_image)
    if source_image.ndim != 4:
        raise ValueError(f"{method} needs source_image, a (B, C, H, W) tensor in [-1, 1]; got "
                         f"{tuple(source_image.shape)}")
    if not bool(torch.isfinite(source_image).all()):
        raise ValueError(f"source_image contains {int((~torch.isfinite(source_image)).sum())} NaN or infinite "
                         f"value(s); pass a finite image in [-1, 1]")
    image_h, image_w = int(source_image.shape[-2]), int(source_image.shape[-1])
    if (height is not None and height != image_h) or (width is not None and width != image_w):
        raise ValueError(f"height x width = {height}x{width} differs from the source image's {image_h}x{image_w}; "
                         f"leave them unset or resize the image")
    return source_image.float()


def as_pixel_mask(mask: Any, height: int, width: int) -> torch.Tensor:
    """A pixel mask (H, W), (1, H, W) or (B, 1, H, W) in [0, 1] (1 = edit) as a float (B, 1, H, W) tensor."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor (H, W) or (B, 1, H, W) with 1 = edit, got {type(mask).__name__}")
    m = mask.float()
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1] != 1:
        raise ValueError(f"mask must have shape (H, W), (1, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    if tuple(m.shape[-2:]) != (height, width):
        raise ValueError(f"the mask is {m.shape[-2]}x{m.shape[-1]} but the source image is {height}x{width}; "
                         f"resize the mask to the image size")
    if not bool(torch.isfinite(m).all()) or m.min() < 0 or m.max() > 1:
        raise ValueError("mask values must lie in [0, 1] (1 = region to edit, 0 = region to keep)")
    return m


def latent_edit_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The pixel edit mask (B, 1, H, W) averaged over each latent cell: the fraction of edited pixels, (B, 1, h, w)."""
    return F.interpolate(mask, size=latent_hw, mode="area").clamp(0, 1)


def is_text(prompt) -> bool:
    return isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and bool(prompt)
                                       and all(isinstance(p, str) for p in prompt))


def text_condition(model, method: str, prompt, guidance_scale: float | None, role: str):
    """The condition of ``prompt`` (text, encoded once and cached by the model; a condition from
    ``model.condition(...)`` is used as it is). ``guidance_scale`` is the adapter's own guidance for a text prompt:
    None keeps the embedded default of guidance-distilled models (FLUX.1-dev) and turns classifier-free guidance
    off for the others. ``role`` names the argument in errors ("source_prompt", "edit_prompt")."""
    if prompt is None:
        raise ValueError(f"{method} needs {role}, a text (or a condition from model.condition(...))")
    if not is_text(prompt):
        return prompt
    if not getattr(model, "takes_text", True):
        inner = model.model if isinstance(model, CountingModel) else model
        name = getattr(inner, "name_or_path", None) or type(inner).__name__
        raise ValueError(f"{method} needs a text-conditioned model (a pipeline family: SD3, FLUX.1, FLUX.2, "
                         f"Qwen-Image, ...); {name} takes no prompt")
    if guidance_scale is None:
        kwargs = {} if getattr(model, "has_guidance_embedding", False) else {"guidance_scale": 1.0}
    else:
        kwargs = {"guidance_scale": float(guidance_scale)}
    cond = model.condition(prompt, **kwargs)
    if cond is None:
        name = type(model.model if isinstance(model, CountingModel) else model).__name__
        raise ValueError(f"{method} needs a text-conditioned model (a pipeline family: SD3, FLUX.1, FLUX.2, "
                         f"Qwen-Image, ...); {name} takes no prompt")
    return cond


def refuse_scale_for_condition(method: str, prompt, scale, name: str, role: str) -> None:
    """A guidance ``scale`` (the argument ``name``) given for ``prompt`` (the argument ``role``) that is a condition
    would be silently ignored: the condition carries its own guidance. Refused in one line."""
    if scale is not None and prompt is not None and not is_text(prompt):
        raise ValueError(f"{method}: a guidance scale for {role} has no effect on a condition: {name}={scale} applies "
                         f"to a text {role}, but {role} is a condition, which carries its own guidance; set it in "
                         f"model.condition(..., guidance_scale=...) or drop {name}")


def same_batch(method: str, **conds) -> int:
    """The common batch of the conditions (named by their argument; a batch of one is used for every image); a
    ValueError when two batches of several differ."""
    sizes = {name: condition_batch(c) for name, c in conds.items()}
    if len(set(sizes.values()) - {1}) > 1:
        listed = ", ".join(f"{name} has {n}" for name, n in sizes.items())
        raise ValueError(f"{method}: {listed} entries; give one of each per image (or one for all)")
    return max(sizes.values())
