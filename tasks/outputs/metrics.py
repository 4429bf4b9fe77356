"""Image quality metrics against a reference, for images in [-1, 1] (NCHW): PSNR, SSIM (kornia) and LPIPS
(the lpips package with AlexNet features). Every metric is computed in float32 on [0, 1] images, per image.

LPIPS needs torchvision's pretrained AlexNet weights in the torch hub cache. When they are not on this machine
(no network), :func:`lpips_metric` reports LPIPS as unavailable with the reason, and nothing ever scores with
randomly initialised features.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["LPIPS_WEIGHTS", "LpipsUnavailable", "lpips_metric", "psnr", "ssim"]

LPIPS_WEIGHTS = "alexnet-owt-7be5be79.pth"  # what torchvision's alexnet(weights="IMAGENET1K_V1") downloads


def _unit(image: torch.Tensor) -> torch.Tensor:
    return ((image.float() + 1) / 2).clamp(0, 1)


def _check_pair(image: torch.Tensor, reference: torch.Tensor) -> None:
    if image.shape != reference.shape:
        raise ValueError(f"the image {tuple(image.shape)} and its reference {tuple(reference.shape)} differ in "
                         f"shape; compare images of the same size")


def psnr(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,) peak signal-to-noise ratio in dB on [0, 1]: 10 log10(1 / MSE)."""
    _check_pair(image, reference)
    mse = (_unit(image) - _unit(reference)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def ssim(image: torch.Tensor, reference: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """(B,) mean structural similarity (kornia, Gaussian window 11, on [0, 1])."""
    import kornia

    _check_pair(image, reference)
    return kornia.metrics.ssim(_unit(image), _unit(reference), window_size, max_val=1.0).flatten(1).mean(1)


@dataclass
class LpipsUnavailable:
    """LPIPS could not be computed; ``reason`` says why and how to fix it."""

    reason: str


def _alexnet_weights() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_WEIGHTS


@functools.lru_cache(maxsize=2)
def _lpips_model(device: str):
    import lpips

    model = lpips.LPIPS(net="alex", pretrained=True, verbose=False).to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def lpips_metric(device: torch.device | str = "cpu"):
    """A function (image, reference) -> (B,) LPIPS (AlexNet, lower is better), or :class:`LpipsUnavailable` when
    the AlexNet weights are not in the torch hub cache (set ``FLOWSTEER_NO_LPIPS=1`` to skip it on purpose)."""
    if os.environ.get("FLOWSTEER_NO_LPIPS"):
        return LpipsUnavailable("LPIPS switched off (FLOWSTEER_NO_LPIPS is set)")
    weights = _alexnet_weights()
    if not weights.is_file():
        return LpipsUnavailable(
            f"AlexNet weights not found at {weights} (no network to download them); on a machine with a network run "
            f"python -c \"import torchvision; torchvision.models.alexnet(weights='IMAGENET1K_V1')\" once, or copy "
            f"{LPIPS_WEIGHTS} there")
    model = _lpips_model(str(torch.device(device)))

    def metric(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        _check_pair(image, reference)
        with torch.no_grad():
            return model(image.float().clamp(-1, 1), reference.float().clamp(-1, 1)).flatten(1).mean(1)

    return metric
