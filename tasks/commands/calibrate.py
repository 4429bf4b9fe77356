"""Calibrate FLAIR's regularization weights (CRW) for a model on a folder of clean images and cache the table.

    flowsteer calibrate --model stabilityai/stable-diffusion-3.5-medium --images photos/ --size 1024
    flowsteer calibrate --model MODEL --images photos/ --size 768 1024      # height x width

The table lands in the CRW cache (see :mod:`guidance.features.calibration`), keyed by the model, its CFG setting and the
image size; ``flowsteer restore --method flair`` with the same model, prompt/CFG and size then finds it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from guidance.features.calibration import CRW_POINTS, CRWTable, calibrate
from guidance.memory import check_memory
from operators.checks import MAX_BATCH, MAX_STEPS, check_int, check_seed

from .generate import add_size_argument, parse_size
from .restore import (
    allowed_size,
    make_condition,
    cli_messages,
    open_model,
    read_image,
    resize_image,
)

__all__ = ["IMAGE_SUFFIXES", "calibrate_folder", "clear_tables", "load_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _height_width(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def center_crop(image: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize (1, C, H, W) by the smallest scale that covers ``size`` (a side, or (height, width)), then crop
    its centre to that size."""
    (height, width), (rows, cols) = image.shape[-2:], _height_width(size)
    scale = max(rows / height, cols / width)
    image = resize_image(image, (max(rows, round(height * scale)), max(cols, round(width * scale))))
    top, left = (image.shape[-2] - rows) // 2, (image.shape[-1] - cols) // 2
    return image[..., top:top + rows, left:left + cols]


def load_folder(folder: str | os.PathLike, size: int | tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Every PNG / JPEG in ``folder`` (sorted by name), resized and centre-cropped to ``size`` (a side, or
    (height, width)): (N, C, height, width)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"the image folder {str(folder)!r} does not exist (or is not a folder); check --images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{str(folder)!r} holds no PNG or JPEG images; put clean images there")
    return torch.cat([center_crop(read_image(p, "calibration image", channels), size) for p in files])


def calibrate_folder(model: Any, images: str | os.PathLike, *, size: int | tuple[int, int] | None = None,
                     prompt: str | None = None,
                     guidance_scale: float | None = None, num_points: int = CRW_POINTS,
                     cache_dir: str | os.PathLike | None = None, seed: int = 0, batch_size: int = 8,
                     progress: bool = True, device: str | None = None, dtype: Any = None,
                     memory: str | None = None) -> CRWTable:
    """Measure and cache the CRW table of ``model`` (anything :func:`guidance.load_model` takes) on the images
    of a folder, resized and centre-cropped to ``size``: a side N for N x N or (height, width) (default: the
    model's native size). Its path is ``table.metadata["path"]``. ``memory`` is a memory profile (a batch the planner
    says does not fit is refused before the model loads)."""
    check_int(num_points, "the calibration points (--points)", 2, MAX_STEPS)
    if size is not None:
        if not isinstance(size, int) and not (isinstance(size, (tuple, list)) and len(size) == 2):
            raise ValueError(f"the image size (--size) is a side N or (height, width), got {size!r}")
        for side, value in zip(("height", "width"), _height_width(size)):
            check_int(value, f"the image {side} (--size)", 1, None)
    check_int(batch_size, "the batch size", 1, MAX_BATCH)
    check_seed(seed, "the seed (--seed)")
    if not Path(images).is_dir():
        raise ValueError(f"the image folder {str(images)!r} does not exist (or is not a folder); check --images")
    from guidance.features.calibration import crw_cache_dir
    from guidance.loading.devices import check_device

    from ..outputs.folders import check_writable

    device = check_device(device)  # before anything loads
    check_writable(crw_cache_dir(cache_dir), "--cache-dir", "the calibration cache folder")  # before any work
    from .memory_option import preload_profile

    planned = None if size is None else _height_width(size)
    memory = preload_profile(model, memory, "unguided", planned, batch_size, device, dtype, "calibration batch")
    net = open_model(model, device=device, dtype=dtype, progress=progress, memory=memory)
    if size is None:
        if not getattr(net, "default_size", None):
            raise ValueError(f"{type(net).__name__} has no native size; pass --size")
        size = int(net.default_size[0]), int(net.default_size[1])
    height, width = _height_width(size)
    allowed = allowed_size(net, height, width)
    if allowed != (height, width):
        largest = f", at most {net.max_size}" if getattr(net, "max_size", None) else ""
        given, fit = (height, allowed[0]) if height == width else (f"{height} {width}", " ".join(map(str, allowed)))
        raise ValueError(f"--size {given} does not fit {type(net).__name__}: sides must be multiples of "
                         f"{net.size_multiple}{largest}; use --size {fit}")
    check_memory(net, height, width, batch_size, "calibration batch")
    batch = load_folder(images, (height, width), net.image_channels)
    cond = make_condition(net, prompt, guidance_scale)
    return calibrate(net, batch, cond, num_points=num_points, generator=torch.Generator().manual_seed(seed),
                     batch_size=batch_size, cache_dir=cache_dir, progress=progress)


# -- `flowsteer calibrate` ------------------------------------------------------------------------------------
def clear_tables(model: Any = "default", cache_dir: str | os.PathLike | None = None, device: str | None = None,
                 dtype: Any = None, progress: bool = True) -> list[Path]:
    """Delete the CRW tables cached for ``model`` (anything :func:`guidance.load_model` takes; every guidance
    setting and size) and return the files removed (:func:`guidance.features.calibration.clear_crw`)."""
    from guidance.features.calibration import clear_crw
    from guidance.loading.devices import check_device

    net = open_model(model, device=check_device(device), dtype=dtype, progress=progress)
    return clear_crw(net, cache_dir)


def run(args: argparse.Namespace) -> int:
    """Calibrate and print where the table went, with a short summary (or, with --clear, remove the tables)."""
    if args.clear:
        if args.images is not None:
            raise ValueError("--clear removes the model's cached tables and calibrates nothing: drop --images (or "
                             "drop --clear to calibrate)")
        from guidance.features.calibration import crw_cache_dir

        removed = clear_tables(args.model, args.cache_dir, args.device, args.dtype, progress=not args.quiet)
        for path in removed:
            print(f"removed {path}")
        if not removed:
            print(f"no calibration table of {args.model!r} in {crw_cache_dir(args.cache_dir)}: nothing to remove")
        return 0
    if args.images is None:
        raise ValueError("--images DIR is required: a folder of clean images to calibrate on (or --clear to remove "
                         "the model's cached tables)")
    with cli_messages():
        table = calibrate_folder(args.model, args.images, size=parse_size(args.size), prompt=args.prompt,
                                 guidance_scale=args.guidance_scale, num_points=args.points,
                                 cache_dir=args.cache_dir, seed=args.seed, batch_size=args.batch_size,
                                 progress=not args.quiet, device=args.device, dtype=args.dtype,
                                 memory=args.memory)
    meta, weights = table.metadata, table.weights
    peak = int(weights.argmax())
    print(f"calibrated on {meta['num_images']} images at {meta['height']}x{meta['width']}, {len(table)} points, "
          f"guidance {meta['guidance']}: w(s) from {weights[0]:.3f} (s=1) to {weights[-1]:.3f} (s=0), "
          f"peak {weights[peak]:.3f} at s={table.sigmas[peak]:.2f}")
    print(f"wrote {meta['path']}")
    print(f"flowsteer restore --method flair uses it for this model, prompt/CFG setting and size (and says so); "
          f"flowsteer calibrate --clear --model {args.model}"
          f"{f' --cache-dir {args.cache_dir}' if args.cache_dir else ''} removes it")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "calibrate", help="measure FLAIR's regularization weights (CRW) for a model and cache them",
        description="Measure the model's velocity error over time on clean images, turn it into FLAIR's "
                    "calibrated regularization weights and cache the table for later restorations.")
    parser.add_argument("--model", default="default", help="hub id, local folder or 'default' (default: default)")
    parser.add_argument("--images", metavar="DIR", help="a folder of clean PNG / JPEG images (required unless "
                                                        "--clear)")
    parser.add_argument("--clear", action="store_true",
                        help="remove the tables cached for --model (every guidance setting and size) instead of "
                             "calibrating; later FLAIR runs then use the official, shipped or default table")
    add_size_argument(parser, "the model's native size; the images are resized and centre-cropped to it")
    parser.add_argument("--prompt", help="the prompt used when restoring (default: none)")
    parser.add_argument("--guidance-scale", type=float, metavar="W", help="CFG scale used when restoring")
    parser.add_argument("--points", type=int, default=CRW_POINTS,
                        help=f"time points on [0, 1] (default {CRW_POINTS})")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="where the table is written (default: $FLOWSTEER_CACHE/crw or ~/.cache/flowsteer/crw)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per network call (default 8)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="model weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    from .memory_option import add_memory_argument

    add_memory_argument(parser)
    parser.set_defaults(run=run)
