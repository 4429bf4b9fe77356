"""Devices and dtypes as users name them, checked once where a model is placed, with one-line errors."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "RUNS_ON", "check_device", "check_dtype"]

#: the device types flowsteer runs on (``meta`` holds no data; xpu, hpu, ... are not supported)
RUNS_ON = ("cpu", "cuda", "mps")

#: dtype names accepted wherever a dtype is taken (``"bf16"`` etc. as in common usage).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "float64": torch.float64, "double": torch.float64}


def check_device(device) -> torch.device | None:
    """``device`` (a name or a torch.device; None stays None) as a torch.device that exists here; otherwise a
    ValueError that names the device and how to choose one that does."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in RUNS_ON:
        why = " (a meta device holds no data, only shapes)" if device.type == "meta" else ""
        raise ValueError(f"device {str(device)!r}: flowsteer runs on 'cpu', 'cuda' (or 'cuda:N') and 'mps', not on "
                         f"{device.type!r} devices{why}; use device='cpu' (--device cpu) or 'cuda'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: there is no CUDA device here (torch {torch.__version__}); "
                             f"use device='cpu' (--device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps': Metal is not available here; use device='cpu' (--device cpu)")
    return device


def check_dtype(dtype) -> torch.dtype | None:
    """``dtype`` (a torch floating dtype or a name from :data:`DTYPES`; None stays None) as a torch.dtype;
    otherwise a ValueError listing the names."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name in DTYPES:
            return DTYPES[name]
    raise ValueError(f"dtype {dtype!r} is not a floating dtype; use torch.float32, torch.bfloat16 or torch.float16 "
                     f"(or one of the names {', '.join(DTYPES)})")
