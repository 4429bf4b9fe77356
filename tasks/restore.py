"""Restore one image: degrade (when simulating) or take a measurement, solve the inverse problem with a guidance
method over a frozen flow model, and measure the result.

    restoration = restore(model, image, "sr:factor=4", method="flair", simulate=True, seed=0, num_steps=28)
    restoration.restored, restoration.measurement, restoration.metrics, restoration.settings

With ``simulate=True`` the input is a clean image, degraded by the operator with a seeded generator (the standard
benchmark protocol) and kept as the reference; otherwise the input is the measurement y itself.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from guidance import MeasurementFidelity, get_method
from operators import Operator, make_operator

from .metrics import LpipsUnavailable, lpips_metric, psnr, ssim

__all__ = ["Restoration", "peak_memory", "quality_metrics", "restore"]


@dataclass
class Restoration:
    """The ``restored`` image (1, 3, H, W) in [-1, 1], the ``measurement`` y as measured (its own shape), the
    ``reference`` when known, ``metrics`` (PSNR, SSIM, LPIPS against the reference; time, peak memory, NFE) and
    every ``settings`` value used."""

    restored: torch.Tensor
    measurement: torch.Tensor
    reference: torch.Tensor | None
    metrics: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory: GPU bytes allocated by torch since the last reset on CUDA, else the process's resident-set
    high-water mark (covers the whole process so far)."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30, "peak_memory_kind": "cuda"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return {"peak_memory_gib": rss_bytes / 2**30, "peak_memory_kind": "process RSS high-water mark"}


def quality_metrics(restored: torch.Tensor, reference: torch.Tensor, lpips=None) -> dict[str, Any]:
    """PSNR and SSIM (kornia) and LPIPS (AlexNet) of ``restored`` against ``reference``. LPIPS that cannot be
    computed offline is reported as ``"unavailable: <reason>"``, never as a number from random weights."""
    lpips = lpips_metric(restored.device) if lpips is None else lpips
    out = {"psnr": float(psnr(restored, reference)[0]), "ssim": float(ssim(restored, reference)[0])}
    if isinstance(lpips, LpipsUnavailable):
        out["lpips"] = f"unavailable: {lpips.reason}"
    else:
        out["lpips"] = float(lpips(restored, reference)[0])
    return out


def restore(model, image: torch.Tensor, operator: str | Operator, method: str = "flair", *, simulate: bool = False,
            reference: torch.Tensor | None = None, num_steps: int = 28, seed: int = 0, noise_std: float | None = None,
            cond: Any = None, space: str = "pixel", options: dict | None = None, progress: bool = True,
            lpips=None) -> Restoration:
    """Restore ``image`` (1, C, H, W) in [-1, 1] with ``method`` over the flow ``model``.

    Args:
        operator: an operator or a spec such as ``"sr:factor=4"`` (see ``flowsteer operators``).
        simulate: ``image`` is clean: measure it with the operator (seeded) and use it as the reference.
        reference: the clean image when known (not simulating); metrics are computed against it.
        noise_std: measurement noise when building the operator from a spec (default: the operator's own).
        cond: the model's conditioning (default ``model.condition()``: an empty prompt for text models).
        space: where the measurement objective lives, ``"pixel"`` or ``"latent"``.
        options: the method's own options (``flowsteer methods`` lists them).
    """
    if isinstance(operator, str):
        spec = operator
        operator = make_operator(operator, **({} if noise_std is None else {"noise_std": noise_std}))
    else:
        spec = type(operator).__name__
    device = torch.device(getattr(model, "device", "cpu"))
    image = image.to(device=device, dtype=torch.float32)
    operator = operator.to(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if simulate:
        reference = image
        y = operator.measure(image.cpu(), generator).to(device)
    else:
        y = image
    height, width = (int(v) for v in (reference.shape[-2:] if reference is not None else
                                      operator.input_shape(tuple(y.shape))[-2:]))
    objective = MeasurementFidelity(operator, y, space=space)
    solver = get_method(method, **(options or {}))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    result = solver(model, objective, num_steps=num_steps, cond=cond, height=height, width=width, progress=progress,
                    generator=torch.Generator(device="cpu").manual_seed(seed + 1))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - begin
    restored = result.image.clamp(-1, 1)
    metrics: dict[str, Any] = {"seconds": seconds, "nfe": result.nfe, **peak_memory(device)}
    if reference is not None:
        metrics.update(quality_metrics(restored, reference.to(restored.device), lpips))
    settings = {"operator": spec, "noise_std": float(operator.noise_std), "method": method,
                "options": dict(options or {}), "num_steps": num_steps, "seed": seed, "simulate": simulate,
                "space": space, "height": height, "width": width}
    return Restoration(restored=restored, measurement=y, reference=reference, metrics=metrics, settings=settings)
