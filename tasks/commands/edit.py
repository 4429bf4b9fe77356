"""Text-guided image editing inside a mask with FlowChef, inversion-free (``guidance.methods.flowchef_edit``).

    flowsteer edit photo.png --mask mask.png --source-prompt "a photo of a cat" \\
        --edit-prompt "a photo of a dog" --model MODEL --out results/dog

The mask is an image of the photo's size: WHITE (1) marks the region to edit, BLACK (0) the region to keep
(grey values blend; colour masks are read as their luma, transparent pixels as white). Sampling starts from
noise: the first ``source_steps`` steps (a third by default) pull the whole latent toward the encoded photo, later
steps only the kept region, while a masked contrast between the two prompts steers the edited one. The kept region follows the photo as the
autoencoder reconstructs it, so it is close to the input, not identical.

From code: ``edit("photo.png", "mask.png", "a photo of a cat", "a photo of a dog", model=model, out="dog")``
(image and mask may also be tensors).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from guidance import get_method
from guidance.loading.devices import check_device
from guidance.loading.files import write_text_atomic
from guidance.loading.images import ImageOutput, check_output_type
from operators.checks import MAX_STEPS, check_int, check_seed

from ..outputs.folders import prepare_output_dir, write_outputs
from ..outputs.grid import save_grid
from ..outputs.image_io import load_image, save_image

__all__ = ["OUTPUT_NAMES", "Edit", "edit", "read_mask"]

OUTPUT_NAMES = ("edited.png", "grid.png", "metrics.json")
INPUTS = ("source_image", "mask", "source_prompt", "edit_prompt")  # flowchef_edit arguments that are not options
DEFAULT_STEPS = 30  # the FlowChef Flux editing reference


@dataclass
class Edit(ImageOutput):
    """The ``edited`` image and the ``source`` image (1, 3, H, W) in [-1, 1], the ``mask`` (1, 1, H, W) in [0, 1]
    (1 = edit), ``metrics`` (time, NFE, mean absolute change inside / outside the mask, and
    the autoencoder's own round-trip error, the floor of the change outside) and every ``settings`` value;
    ``images`` is the edited image as diffusers returns images (``output_type``)."""

    edited: torch.Tensor
    source: torch.Tensor
    mask: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    output_type: str = "pil"

    @property
    def image(self) -> torch.Tensor:
        return self.edited


def read_mask(mask) -> torch.Tensor:
    """A mask file, PIL image or NumPy array (white = edit) or tensor (H, W) / (1, 1, H, W) in [0, 1] (1 = edit) as a
    (1, 1, H, W) float tensor."""
    from .restore import read_image

    if isinstance(mask, torch.Tensor):
        m = mask.float()
        while m.ndim < 4:
            m = m[None]
        if m.ndim != 4 or m.shape[:2] != (1, 1):
            raise ValueError(f"a mask tensor must have shape (H, W) or (1, 1, H, W), got {tuple(mask.shape)}")
        if not bool(torch.isfinite(m).all()) or m.min() < 0 or m.max() > 1:
            raise ValueError("mask values must lie in [0, 1] (1 = region to edit, 0 = region to keep)")
        return m
    if not isinstance(mask, (str, os.PathLike)):  # PIL or NumPy, as images are taken
        m = (load_image(mask, channels=1) + 1) / 2
        if m.shape[0] != 1:
            raise ValueError(f"edit takes one mask, got a batch of {m.shape[0]}")
        return m
    return (read_image(mask, "mask", channels=1) + 1) / 2


def _read_source(image) -> torch.Tensor:
    """The input image from a path (errors name its role), a PIL image, a NumPy array or a tensor."""
    from .restore import read_image

    if isinstance(image, (str, os.PathLike)):
        return read_image(image, "input image")
    source = load_image(image)
    if source.shape[0] != 1:
        raise ValueError(f"edit takes one image, got a batch of {source.shape[0]}; edit them one at a time")
    return source


def _change(edited: torch.Tensor, source: torch.Tensor, weight: torch.Tensor) -> float | None:
    """Mean |edited − source| over the pixels weighted by ``weight`` (None when the region is empty)."""
    total = float(weight.sum())
    if total <= 0:
        return None
    return float(((edited - source).abs().mean(1, keepdim=True) * weight).sum() / total)


def edit(image, mask, source_prompt: str, edit_prompt: str, *, model: Any = "default",
         num_steps: int = DEFAULT_STEPS, seed: int = 0, options: dict | None = None,
         guidance_scale: float | None = None, resize: bool = False, out: str | os.PathLike | None = None,
         overwrite: bool = False, progress: bool = True, device: str | None = None, dtype: Any = None,
         output_type: str = "pil") -> Edit:
    """Edit ``image`` inside ``mask`` (white = edit) from ``source_prompt`` toward ``edit_prompt`` with FlowChef.

    ``options`` are flowchef_edit's (step_size, inner_steps, source_steps, edit_guidance, source_weight, ...).
    Defaults follow the Flux reference (30 steps, 10 of them anchoring the whole image): source_steps is a third
    of ``num_steps``; step_size is 0.6, lowered for small latents so that the source pull stays stable
    (2 · step_size · source_weight / n <= 0.5 for n latent elements). ``guidance_scale`` is the
    model's CFG for both prompts (default: off, or the embedded guidance of Flux dev). With ``out``, writes
    edited.png, grid.png (input, mask, edited) and metrics.json; everything cheap is checked before the model
    loads."""
    from guidance.methods import method_options

    from .restore import fit_size, open_model, peak_memory, resize_image

    check_output_type(output_type)
    check_int(num_steps, "the number of steps (--steps)", 1, MAX_STEPS)
    check_seed(seed, "the seed (--seed)")
    for name, prompt in (("source prompt", source_prompt), ("edit prompt", edit_prompt)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"the {name} must be a non-empty text (--{name.replace(' ', '-')})")
    options = dict(options or {})
    taken = sorted(set(options) & set(INPUTS))
    if taken:
        raise ValueError(f"{taken[0]!r} is an input of edit, not an option; pass it as the image, mask or prompt")
    if guidance_scale is not None:
        options["guidance_scale"] = guidance_scale
    get_method("flowchef_edit", **options)  # unknown options fail before the model loads
    device = check_device(device)  # before anything loads: a missing GPU is named, not met in torch
    source, pixel_mask = _read_source(image), read_mask(mask)
    size = tuple(source.shape[-2:])
    if tuple(pixel_mask.shape[-2:]) != size:
        raise ValueError(f"the mask is {pixel_mask.shape[-2]}x{pixel_mask.shape[-1]} pixels but the image is "
                         f"{size[0]}x{size[1]}; give a mask of the image's size (white = edit, black = keep)")
    if out is not None:
        inputs = [p for p in (image, mask) if isinstance(p, (str, os.PathLike))]
        out = prepare_output_dir(out, OUTPUT_NAMES, overwrite=overwrite, inputs=inputs)

    net = open_model(model, device=device, dtype=dtype, progress=progress)
    if not getattr(net, "takes_text", False):
        name = getattr(net, "name_or_path", None) or type(net).__name__
        raise ValueError(f"editing follows the edit prompt, but the model {name!r} takes no text: use a "
                         f"text-conditioned model (SD3 / SD3.5 or FLUX.1, e.g. --model "
                         f"stabilityai/stable-diffusion-3.5-medium or a local folder of one)")
    target = fit_size(net, *size, resize, what="input image")
    source = resize_image(source, target)
    if target != size:
        pixel_mask = F.interpolate(pixel_mask, size=target, mode="bilinear", antialias=True).clamp(0, 1)
    options.setdefault("source_steps", max(1, round(num_steps / 3)))
    if "step_size" not in options:
        n = math.prod(net.latent_shape(*target))
        weight = float(options.get("source_weight", method_options("flowchef_edit")["source_weight"]))
        options["step_size"] = min(0.6, n / (4 * weight)) if weight > 0 else 0.6

    if net.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(net.device)
    begin = time.perf_counter()
    result = get_method("flowchef_edit", **options)(
        net, None, num_steps=num_steps, generator=torch.Generator().manual_seed(seed), progress=progress,
        source_image=source.to(net.device), mask=pixel_mask.to(net.device), source_prompt=source_prompt,
        edit_prompt=edit_prompt)
    if net.device.type == "cuda":
        torch.cuda.synchronize(net.device)
    seconds = time.perf_counter() - begin
    edited = result.image.detach().float().cpu().clamp(-1, 1)[:1]
    with torch.no_grad():  # the autoencoder's round trip D(E(x)): the floor of the change outside the mask
        reconstruction = net.decode(result.info["source_latent"][:1]).float().cpu().clamp(-1, 1)
    metrics = {"seconds": seconds, "nfe": result.nfe, "change_inside_mask": _change(edited, source, pixel_mask),
               "change_outside_mask": _change(edited, source, 1 - pixel_mask),
               "autoencoder_error": float((reconstruction - source.cpu()).abs().mean()), **peak_memory(net.device)}
    settings = {
        "input": str(image) if isinstance(image, (str, os.PathLike)) else "tensor",
        "mask": str(mask) if isinstance(mask, (str, os.PathLike)) else "tensor", "source_prompt": source_prompt,
        "edit_prompt": edit_prompt, "method": "flowchef_edit",
        "options": {k: v for k, v in {**method_options("flowchef_edit"), **options}.items() if k not in INPUTS},
        "num_steps": num_steps, "seed": seed,
        "resize": resize, "input_size": list(size), "height": target[0], "width": target[1],
        "model": str(model) if isinstance(model, (str, os.PathLike)) else type(net).__name__,
        "device": str(net.device), "dtype": str(getattr(net, "dtype", "")).replace("torch.", ""),
        "out": None if out is None else str(out)}
    result = Edit(edited=edited, source=source, mask=pixel_mask, metrics=metrics, settings=settings,
                  output_type=output_type)
    if out is not None:
        save_edit(result, out)
    return result


def save_edit(result: Edit, out: str | os.PathLike) -> Path:
    """Write edited.png, grid.png (input, mask, edited) and metrics.json (metrics plus settings) atomically."""
    out = Path(out)
    metrics = json.dumps({**result.metrics, "settings": result.settings}, indent=2, default=str) + "\n"
    cells = [[result.source, result.mask * 2 - 1, result.edited]]
    write_outputs([(out / "edited.png", lambda path: save_image(result.edited, path)),
                   (out / "grid.png", lambda path: save_grid(path, cells, [["input", "mask", "edited"]])),
                   (out / "metrics.json", lambda path: write_text_atomic(path, metrics))])
    return out


# -- `flowsteer edit` ------------------------------------------------------------------------------------------
def run(args) -> int:
    """Edit one image and write the results."""
    from .restore import cli_messages, parse_options

    out = args.out or f"{Path(args.input).stem}_edited"
    with cli_messages():
        result = edit(args.input, args.mask, args.source_prompt, args.edit_prompt, model=args.model,
                      num_steps=args.steps, seed=args.seed, options=parse_options(args.option),
                      guidance_scale=args.guidance_scale, resize=args.resize, out=out,
                      overwrite=args.overwrite, progress=not args.quiet, device=args.device, dtype=args.dtype)
    m = result.metrics
    change = ", ".join(f"{where} {m[f'change_{where}_mask']:.3g}" for where in ("inside", "outside")
                       if m[f"change_{where}_mask"] is not None)
    print(f"flowchef_edit: {m['nfe']} NFE, {m['seconds']:.1f} s; mean change {change} (autoencoder round trip "
          f"{m['autoencoder_error']:.3g})")
    print(f"wrote {', '.join(OUTPUT_NAMES)} to {out}")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "edit", help="edit an image inside a mask toward a text prompt (FlowChef, inversion-free)",
        description="Text-guided editing with FlowChef: the region where MASK is white follows --edit-prompt, the "
                    "black region stays close to INPUT. Writes edited.png, grid.png and metrics.json into --out.")
    parser.add_argument("input", metavar="INPUT", help="the image to edit")
    parser.add_argument("--mask", required=True, metavar="MASK",
                        help="mask image of INPUT's size: white = edit, black = keep (grey blends)")
    parser.add_argument("--source-prompt", required=True, metavar="TEXT", help="describes INPUT")
    parser.add_argument("--edit-prompt", required=True, metavar="TEXT", help="describes the edited image")
    parser.add_argument("--model", default="default",
                        help="hub id or local folder of a text-to-image model (SD3, Flux; default: default)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps (default {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default 0)")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="a flowchef_edit option, e.g. --option source_steps=10 --option edit_guidance=4.5 "
                             "(repeatable; flowsteer methods lists them)")
    parser.add_argument("--guidance-scale", type=float, metavar="W",
                        help="the model's CFG for both prompts (default: off; Flux dev keeps its embedded guidance)")
    parser.add_argument("--resize", action="store_true",
                        help="resize image and mask to the nearest size the model accepts instead of stopping")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: <INPUT stem>_edited)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="model weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
