"""Restore one image: degrade (when simulating) or take a measurement, solve the inverse problem with a guidance
method over a frozen flow model, and measure the result.

    restoration = restore(model, image, "sr:factor=4", method="flair", simulate=True, seed=0, num_steps=28)
    restoration.restored, restoration.measurement, restoration.metrics, restoration.settings

With ``simulate=True`` the input is a clean image, degraded by the operator with a seeded generator (the standard
benchmark protocol) and kept as the reference; otherwise the input is the measurement y itself.

From files (what ``flowsteer restore`` runs)::

    restoration = restore_file("photo.png", "sr:factor=4", "flair", model="path/to/model", simulate=True,
                               out="results/photo")   # restored.png, measurement.png, grid.png, metrics.json
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import json
import math
import os
import resource
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from guidance import MeasurementFidelity, get_method
from guidance import memory
from guidance.features.consistency import check_consistency_steps, pixel_consistency
from guidance.loading.devices import check_device, check_dtype
from guidance.loading.files import write_text_atomic
from guidance.loading.images import ImageOutput, check_output_type
from guidance.loading.models import quiet_loading
from guidance.memory import scaled_side
from operators import Operator, as_operator, make_operator, operator_name, operator_spec
from operators.checks import MAX_BATCH, MAX_STEPS, check_flag, check_int, check_seed

from ..outputs.grid import save_grid
from ..outputs.image_io import load_image, save_image
from ..outputs.metrics import LpipsUnavailable, lpips_metric, psnr, ssim
from ..outputs.folders import prepare_output_dir, write_outputs

__all__ = ["OUTPUT_NAMES", "Restoration", "allowed_size", "fit_size", "input_shape", "open_model", "parse_options",
           "peak_memory", "quality_metrics", "read_image", "resize_image", "restore", "restore_file", "steps_argument"]

OUTPUT_NAMES = ("restored.png", "measurement.png", "grid.png", "metrics.json")


@dataclass
class Restoration(ImageOutput):
    """The ``restored`` images (B, 3, H, W) in [-1, 1] (B = 1 for one input), the ``measurement`` y as measured
    (its own shape), the ``reference`` when known, ``metrics`` (PSNR, SSIM, LPIPS against the reference, means over
    the batch with ``per_image`` rows for B > 1; time, peak memory, NFE), every ``settings`` value used, and the
    method's ``samples`` (K, 3, H, W) — (B, K, 3, H, W) for a batch — before averaging and consistency. ``images``
    are the restorations as diffusers returns images (``output_type``: "pil", "np" or "pt")."""

    restored: torch.Tensor
    measurement: torch.Tensor
    reference: torch.Tensor | None
    metrics: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    samples: torch.Tensor | None = None
    output_type: str = "pil"

    @property
    def image(self) -> torch.Tensor:
        return self.restored


def max_rss_gib() -> float:
    """The process's resident-set high-water mark in GiB (ru_maxrss: bytes on macOS, KiB elsewhere)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024) / 2**30


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory: GPU bytes allocated by torch since the last reset on CUDA, else the process's resident-set
    high-water mark (covers the whole process so far)."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30, "peak_memory_kind": "cuda"}
    return {"peak_memory_gib": max_rss_gib(), "peak_memory_kind": "process RSS high-water mark"}


def quality_metrics(restored: torch.Tensor, reference: torch.Tensor, lpips=None) -> dict[str, Any]:
    """PSNR and SSIM (kornia) and LPIPS (AlexNet) of ``restored`` against ``reference``, means over the batch (and,
    for a batch of several, ``per_image``: each image's). LPIPS that cannot be computed offline is reported as
    ``"unavailable: <reason>"``, never as a number from random weights."""
    lpips = lpips_metric(restored.device) if lpips is None else lpips
    columns = {"psnr": psnr(restored, reference).tolist(), "ssim": ssim(restored, reference).tolist()}
    if isinstance(lpips, LpipsUnavailable):
        columns["lpips"] = [f"unavailable: {lpips.reason}"] * restored.shape[0]
    else:
        columns["lpips"] = lpips(restored, reference).reshape(-1).tolist()
    out = {k: (v[0] if isinstance(v[0], str) else float(sum(v) / len(v))) for k, v in columns.items()}
    if restored.shape[0] > 1:
        out["per_image"] = [dict(zip(columns, values)) for values in zip(*columns.values())]
    return out


def restore(model, image, operator: str | Operator, method: str = "flair", *, simulate: bool = False,
            reference=None, num_steps: int | None = None, seed: int = 0, noise_std: float | None = None,
            cond: Any = None, space: str = "pixel", options: dict | None = None, progress: bool = True,
            lpips=None, samples: int = 1, consistency_steps: int | None = None,
            num_inference_steps: int | None = None, output_type: str = "pil",
            objective_options: dict | None = None, resize: bool = False) -> Restoration:
    """Restore ``image`` with ``method`` over the flow ``model``: a path, PIL image, NumPy array or tensor
    (:func:`tasks.load_image`), one image or a batch of B, each restored from its own measurement (image b of a
    batch gets what it gets alone: the seeds are per image). ``restored`` is then (B, C, H, W) and ``images`` the
    B restorations as PIL images.

    Args:
        operator: an operator or a spec such as ``"sr:factor=4"`` (see ``flowsteer operators``).
        simulate: ``image`` is clean: measure it with the operator (seeded) and use it as the reference.
        reference: the clean image when known (not simulating); metrics are computed against it.
        noise_std: measurement noise when building the operator from a spec (default: the operator's own).
        cond: the model's conditioning (default ``model.condition()``: an empty prompt for text models).
        space: where the measurement objective lives, ``"pixel"`` or ``"latent"``.
        options: the method's own options (``flowsteer methods`` lists them), over those the model recommends for
            this method on this operator (``model.recommended_options(method, operator_name(operator))``).
        samples: K restorations from seeds ``seed + 1 .. seed + K`` in one batched call; the result is their mean,
            an estimate of the posterior mean E[x | y] (lower MSE than any single sample: the fidelity setting),
            and ``metrics["sample_std"]`` their mean per-pixel standard deviation.
        consistency_steps: the most projected Landweber iterations that make the result consistent with y in
            pixel space, stopped at the noise level (:func:`guidance.features.consistency.pixel_consistency`); None: the
            model's recommendation (``model.restore_options``), else 0 (off).
        num_steps, num_inference_steps: the number of steps (default 28) under flowsteer's or diffusers' name; give
            one of them.
        output_type: the form of the result's ``images`` ("pil", "np" or "pt").
        objective_options: further :class:`~guidance.objectives.MeasurementFidelity` arguments (``weight``,
            ``reduction``), as the parity presets give them.
        resize: as ``--resize``: an image (with ``simulate``) or a measurement whose restoration is a size the model
            does not take is resized (bicubic) to the nearest size it takes, no longer side than its working size,
            the reference with it; False refuses such sizes in one line.

    The settings record, under ``resolved``, the scalar values the method reports having used (for FLAIR: its
    data learning rate, stopping threshold and the origin of its weight table).
    """
    check_output_type(output_type)
    num_steps = steps_argument(num_steps, num_inference_steps, 28)
    check_seed(seed)
    check_flag(resize, "resize")
    image, reference = (None if x is None else _as_batch(x) for x in (image, reference))
    if isinstance(operator, str):
        spec = operator
        operator = make_operator(operator, **({} if noise_std is None else {"noise_std": noise_std}))
    else:  # an Operator, or a callable / nn.Module taken as one; recorded by a spec that rebuilds it when one can
        operator = as_operator(operator)
        spec = operator_spec(operator) or f"{type(operator).__name__} (not describable by a spec)"
    original = tuple(image.shape[-2:])
    if resize:
        image, reference = _fit_to_model(model, image, reference, operator, spec, simulate)
    device = torch.device(getattr(model, "device", "cpu"))
    image = image.to(device=device, dtype=torch.float32)
    operator = operator.to(device)
    if simulate:  # each image measured with the seed's noise, as alone
        reference = image
        y = torch.cat([operator.measure(one[None].cpu(), torch.Generator(device="cpu").manual_seed(seed))
                       for one in image]).to(device)
    else:
        y = image
    height, width = (int(v) for v in (reference.shape[-2:] if reference is not None else
                                      input_shape(operator, tuple(y.shape))[-2:]))
    if reference is None:  # the size comes from the measurement: say so when the model cannot take it
        check_measurement_size(model, tuple(y.shape[-2:]), (height, width), resize_flag=False)
    objective_options = dict(objective_options or {})
    recorded_objective = {k: v for k, v in objective_options.items() if k != "unmasked_image"}
    if objective_options.get("official_quirks") and "unmasked_image" not in objective_options:
        if reference is None:
            raise ValueError("official_quirks=True encodes the complete image, as FlowChef's official code does: "
                             "give the clean reference (or simulate the measurement from it)")
        objective_options["unmasked_image"] = reference.to(device=device, dtype=torch.float32)
    objective = MeasurementFidelity(operator, y, space=space, **objective_options)
    # the user's options override the model's recommendation for this method on this operator
    options = {**model.recommended_options(method, operator_name(operator)), **(options or {})}
    solver = get_method(method, **options)
    check_sampling(samples, consistency_steps, operator, spec)
    skipped = None
    if consistency_steps is None:
        consistency_steps = int((model.restore_options or {}).get("consistency_steps", 0))
        if consistency_steps and not getattr(operator, "is_linear", False):
            # a recommendation, not a request: said, recorded, and skipped where it cannot apply
            skipped = (f"the model recommends {consistency_steps} pixel-consistency steps, but {spec!r} is not "
                       f"linear: restoring without them (pass consistency_steps=0, --consistency-steps 0, to "
                       f"silence this)")
            warnings.warn(skipped, stacklevel=2)
            consistency_steps = 0
    count = y.shape[0]  # measurements; each restored from the same seeds as alone
    seeds = [torch.Generator(device="cpu").manual_seed(seed + 1 + k) for _ in range(count) for k in range(samples)]
    if samples > 1:
        if "unmasked_image" in objective_options and objective_options["unmasked_image"].shape[0] > 1:
            objective_options["unmasked_image"] = objective_options["unmasked_image"].repeat_interleave(samples, 0)
        objective = MeasurementFidelity(operator, y.repeat_interleave(samples, 0), space=space, **objective_options)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    result = solver(model, objective, num_steps=num_steps, cond=cond, height=height, width=width, progress=progress,
                    generator=seeds[0] if len(seeds) == 1 else seeds, batch_size=count * samples)
    images = result.image.float().clamp(-1, 1)
    grouped = images.reshape(count, samples, *images.shape[1:])
    restored = grouped.mean(1)
    metrics: dict[str, Any] = {"samples": samples}
    if samples > 1:
        metrics["sample_std"] = float(grouped.std(1).mean())
    if consistency_steps:
        restored, taken = pixel_consistency(restored, operator, y, max_steps=consistency_steps, return_steps=True)
        metrics["consistency_steps_taken"] = int(taken[0]) if count == 1 else taken.tolist()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    metrics = {"seconds": time.perf_counter() - begin, "nfe": result.nfe, **metrics, **peak_memory(device)}
    if reference is not None:
        metrics.update(quality_metrics(restored, reference.to(restored.device), lpips))
    settings = {"operator": spec, "noise_std": float(operator.noise_std), "method": method,
                "options": dict(options or {}), "num_steps": num_steps, "seed": seed, "simulate": simulate,
                "space": space, "height": height, "width": width, "samples": samples,
                "consistency_steps": consistency_steps,
                "resolved": {k: v for k, v in (result.info or {}).items() if isinstance(v, (bool, int, float, str))}}
    if recorded_objective:
        settings["objective"] = recorded_objective
    if skipped:
        settings["consistency_skipped"] = skipped
    if resize:
        settings.update({"resize": True, "input_size": list(original)})
    return Restoration(restored=restored, measurement=y, reference=reference, metrics=metrics, settings=settings,
                       samples=images if count == 1 else grouped, output_type=output_type)


def _fit_to_model(model, image: torch.Tensor, reference: torch.Tensor | None, operator: Operator, spec: str,
                  simulate: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``resize=True`` of :func:`restore`, as ``--resize`` of :func:`restore_file`: the clean image (``simulate``)
    or the measurement resized so that the restoration is a size the model takes (:func:`fit_size`), and the
    reference to the restoration's size."""
    if simulate:
        size = fit_size(model, *image.shape[-2:], True, what="input image", operator=operator)
        return resize_image(image, size), None if reference is None else resize_image(reference, size)
    x_shape = input_shape(operator, tuple(image.shape))
    size = fit_size(model, x_shape[-2], x_shape[-1], True,
                    what=f"restored image (from the {image.shape[-2]}x{image.shape[-1]} measurement)")
    if size != tuple(x_shape[-2:]):
        image = resize_image(image, _operator_output(operator, spec, (1, x_shape[1], *size))[-2:])
    return image, None if reference is None else resize_image(reference, size)


def steps_argument(num_steps: int | None, num_inference_steps: int | None, default: int) -> int:
    """The step count from ``num_steps`` or diffusers' ``num_inference_steps`` (``default`` when neither is given);
    both given is refused instead of one being silently ignored."""
    if num_inference_steps is None:
        return default if num_steps is None else num_steps
    if num_steps is not None and num_steps != num_inference_steps:
        raise ValueError(f"num_steps={num_steps!r} and num_inference_steps={num_inference_steps!r} are the same "
                         f"setting (diffusers' name and flowsteer's); give one of them")
    return num_inference_steps


def _as_batch(image) -> torch.Tensor:
    """A tensor as it is (a measurement may have its own channels, e.g. colorization's one), batched; any other
    image form through :func:`load_image`."""
    if isinstance(image, torch.Tensor):
        return (image[None] if image.ndim == 3 else image).float()
    return load_image(image)


def check_sampling(samples: int, consistency_steps: int | None, operator: Operator, spec: str) -> None:
    """Refuse a sample count below 1, negative consistency steps, or consistency steps for a nonlinear operator."""
    check_int(samples, "samples", 1, MAX_BATCH)
    if consistency_steps is not None:
        check_consistency_steps(consistency_steps, operator,
                                f"set the consistency steps to 0 for {spec!r} (--consistency-steps 0)")


# -- from files ----------------------------------------------------------------------------------------------
def input_shape(operator: Operator, output_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The image shape an operator maps to a measurement of ``output_shape`` (the same shape when it cannot say,
    e.g. JPEG or a non-linear composition)."""
    try:
        return tuple(operator.input_shape(tuple(output_shape)))
    except (AttributeError, ValueError, NotImplementedError):
        return tuple(output_shape)


def parse_options(items: Iterable[str] | None) -> dict[str, Any]:
    """``["step_size=0.3", "window=(0,10)", "optimizer=adam"]`` -> a dict (Python literals, true / false in any
    case as booleans, else strings; each method then checks its options' types, see
    :func:`guidance.methods.check_options`)."""
    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option expects key=value (e.g. --option step_size=0.3), got {item!r}")
        if value.strip().lower() in ("true", "false"):  # --option check_divergence=false
            options[key.strip()] = value.strip().lower() == "true"
            continue
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return options


def read_image(path: str | os.PathLike, what: str = "input image", channels: int = 3) -> torch.Tensor:
    """:func:`load_image` with errors that name the file's role and the fix."""
    if not Path(path).is_file():
        raise ValueError(f"the {what} {str(path)!r} does not exist (or is not a file); check the path")
    from guidance.loading.images import ImageTooLargeError

    try:
        return load_image(path, channels=channels)
    except ImageTooLargeError as error:  # an image, but too large: its own fix, under the file's role
        raise ImageTooLargeError(str(error).replace("the image file", f"the {what}", 1)) from None
    except ValueError as error:
        raise ValueError(f"{error}; the {what} must be an image file such as PNG or JPEG") from None


def allowed_size(model, height: int, width: int, multiple: int = 1) -> tuple[int, int]:
    """The nearest (height, width) the model accepts: multiples of ``size_multiple`` (and of ``multiple``, e.g. an
    operator's factor), at most ``max_size``."""
    multiple = math.lcm(int(getattr(model, "size_multiple", 1) or 1), int(multiple))
    largest = getattr(model, "max_size", None)

    def side(value: int) -> int:
        value = max(multiple, math.floor(value / multiple + 0.5) * multiple)
        return min(value, largest // multiple * multiple) if largest else value

    return side(height), side(width)


def working_limit(model) -> int | None:
    """The longest side ``--resize`` fits an image to: the model's ``working_size``, else its ``max_size``."""
    return getattr(model, "working_size", None) or getattr(model, "max_size", None)


def fit_size(model, height: int, width: int, resize: bool, what: str = "image", operator=None) -> tuple[int, int]:
    """(height, width) when the model (and ``operator``: an SR factor) accepts them; with ``resize`` the nearest
    allowed size, scaled down (aspect kept) so the longer side is at most the model's working size; else a
    ValueError naming the allowed sizes and offering ``--resize``."""
    factor = operator_multiple(operator)
    limit = working_limit(model)
    if resize and limit and max(height, width) > limit:
        scale = limit / max(height, width)
        multiple = math.lcm(int(model.size_multiple), factor)
        height, width = (scaled_side(side, scale, multiple) for side in (height, width))
    target = allowed_size(model, height, width, factor)
    if target == (height, width) or resize:
        return target
    largest = getattr(model, "max_size", None)
    limit = f", at most {largest}" if largest else ""
    multiple = math.lcm(int(model.size_multiple), factor)
    why = (f"{type(model).__name__} takes multiples of {model.size_multiple}" +
           (f" and the operator's factor is {factor}, so sides must be multiples of {multiple}" if factor > 1 else ""))
    lower = lambda side: max(multiple, side // multiple * multiple)  # noqa: E731
    examples = " or ".join(dict.fromkeys(f"{a}x{b}" for a, b in ((lower(height), lower(width)),
                                                                 (lower(height) + multiple, lower(width) + multiple))))
    raise ValueError(f"the {what} is {height}x{width} pixels but {why}{limit} (e.g. {examples}); pass --resize "
                     f"to resize it to {target[0]}x{target[1]} (or resize it yourself)")


def check_measurement_size(model, measured: tuple[int, int], implied: tuple[int, int], resize_flag: bool) -> None:
    """Refuse a measurement whose restored image (``implied``, e.g. 30x30 from a 15x15 measurement at SR x2) is a
    size the model does not take, naming the measurement's size, the image it implies and a measurement size that
    works (e.g. 16x16 -> 32x32); ``resize_flag``: offer ``--resize`` (the command line), else resizing first."""
    target = allowed_size(model, *implied)
    if tuple(target) == tuple(implied):
        return
    (mh, mw), (ih, iw) = measured, implied
    multiple = int(getattr(model, "size_multiple", 1) or 1)
    largest = getattr(model, "max_size", None)
    rule = f"sides that are multiples of {multiple}" + (f", at most {largest}" if largest else "")
    exact = target[0] * mh % ih == 0 and target[1] * mw % iw == 0
    fits = (target[0] * mh // ih, target[1] * mw // iw)
    if (ih, iw) == (mh, mw):
        how = f"a measurement of such a size (e.g. {target[0]}x{target[1]})"
    elif ih % mh == 0 and iw % mw == 0 and ih // mh == iw // mw:
        factor = ih // mh
        how = (f"a measurement whose size times {factor} is a multiple of {multiple}"
               + (f" (e.g. {fits[0]}x{fits[1]} -> {target[0]}x{target[1]})" if exact else ""))
    else:
        how = "a measurement that gives such an image" + (f" (e.g. {fits[0]}x{fits[1]})" if exact else "")
    resize = (f"pass --resize to resize the measurement{f' to {fits[0]}x{fits[1]}' if exact else ''}" if resize_flag
              else f"resize the measurement{f' to {fits[0]}x{fits[1]}' if exact else ''} first")
    raise ValueError(f"the measurement is {mh}x{mw} (HxW), so the restored image would be {ih}x{iw}, but "
                     f"{type(model).__name__} takes {rule}: give {how}, or {resize}")


def check_memory(model, height: int, width: int, samples: int = 1, method: str | None = None,
                 options: dict | None = None) -> float | None:
    """The estimated peak memory (GiB) of restoring a ``height`` x ``width`` image with ``samples`` seeds by
    ``method``; a ValueError before anything runs when it is beyond the memory free here
    (:func:`guidance.memory.check_memory`)."""
    return memory.check_memory(model, height, width, samples, "restoration", method, options)


def operator_multiple(operator) -> int:
    """The multiple an operator needs of image sides (an integer downsampling factor; 1 when it needs none)."""
    factor = getattr(operator, "factor", 1)
    return factor if isinstance(factor, int) and not isinstance(factor, bool) and factor > 1 else 1


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resize of (B, C, H, W) in [-1, 1] to ``size`` (a no-op when it already has it)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=tuple(size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def open_model(source: Any = "default", device: str | torch.device | None = None, dtype: Any = None,
               progress: bool = True, decoder: Any = None, encoder: Any = None, memory: str | None = None):
    """:func:`guidance.load_model` on ``device`` (default CUDA when available, else CPU) in ``dtype`` (a torch
    dtype or its name; default bfloat16 on CUDA, float32 on CPU), with the autoencoders ``decoder`` / ``encoder``
    in place of the model's VAE when given and the memory profile ``memory``; a missing model's error suggests
    close known names."""
    from guidance.loading.models import ModelNotFoundError, load_model
    from guidance.backbones.base import FlowModel

    if isinstance(source, FlowModel):
        if decoder is not None or encoder is not None:
            raise ValueError("a decoder or encoder cannot be swapped into an already-built model; load the model "
                             "by its id or folder, or build it with decoder= / encoder=")
        if memory is not None:
            raise ValueError("a memory profile is applied when a model loads; load the model by its id or folder, "
                             "or apply one to the built model with guidance.memory_profiles.apply_profile")
        return source
    device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = check_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with quiet_loading(not progress):
        try:
            return load_model(source, device=device, dtype=dtype, decoder=decoder, encoder=encoder, memory=memory)
        except ModelNotFoundError as error:
            from .listings import KNOWN_MODELS

            close = difflib.get_close_matches(str(source), [m[0] for m in KNOWN_MODELS], n=1, cutoff=0.6)
            if close and close[0] != str(source):
                hint = f"{str(source)!r} (did you mean {close[0]!r}?)"
                raise ModelNotFoundError(str(error).splitlines()[0].replace(repr(str(source)), hint, 1)) from None
            raise


def make_condition(model, prompt: str | None = None, guidance_scale: float | None = None):
    """The model's condition for ``prompt`` and CFG ``guidance_scale``; None (the model's default) when neither."""
    if prompt is None and guidance_scale is None:
        return None
    return model.condition(prompt, guidance_scale=guidance_scale)


def _operator_output(operator: Operator, spec: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The measurement shape for images of ``shape``; a ValueError naming the operator when they do not fit."""
    try:
        with torch.no_grad():
            return tuple(operator(torch.zeros(shape)).shape)
    except ValueError as error:
        raise ValueError(f"the operator {spec!r} does not fit a {shape[-2]}x{shape[-1]} image: "
                         f"{str(error).splitlines()[0]}") from None


def restore_file(input: str | os.PathLike, operator: str, method: str = "flair", *, model: Any = "default",
                 out: str | os.PathLike | None = None, reference: str | os.PathLike | None = None,
                 simulate: bool = False, seed: int = 0, num_steps: int = 28, noise_std: float | None = None,
                 space: str = "pixel", options: dict | None = None, prompt: str | None = None,
                 guidance_scale: float | None = None, resize: bool = False, overwrite: bool = False,
                 progress: bool = True, device: str | None = None, dtype: Any = None, samples: int = 1,
                 consistency_steps: int | None = None, memory: str | None = None) -> Restoration:
    """Restore the image file ``input`` (the clean image with ``simulate``, else the measurement) and write
    ``restored.png``, ``measurement.png``, ``grid.png`` and ``metrics.json`` into ``out`` (default
    ``<input stem>_restored``), each atomically. Everything cheap (files, operator, method, output folder) is
    checked before the model loads. ``model`` is anything :func:`guidance.load_model` takes; ``memory`` a memory
    profile (a run the planner says does not fit is refused before the model loads)."""
    if space not in ("pixel", "latent"):
        raise ValueError(f"space must be 'pixel' or 'latent', got {space!r}")
    if simulate and reference is not None:
        raise ValueError("--reference is for measured inputs; with --simulate the input itself is the reference")
    check_int(num_steps, "the number of steps (--steps)", 1, MAX_STEPS)
    check_seed(seed, "the seed (--seed)")
    image = read_image(input, "clean input image" if simulate else "measurement")
    clean = read_image(reference, "reference image") if reference is not None else None
    spec = operator if isinstance(operator, str) else type(operator).__name__
    op = make_operator(operator, **({} if noise_std is None else {"noise_std": noise_std}))
    options = dict(options or {})
    get_method(method, **options)  # unknown methods and options fail now, before the model loads
    check_sampling(samples, consistency_steps, op, spec)
    out = Path(out) if out is not None else Path(f"{Path(input).stem}_restored")
    inputs = [input, *([reference] if reference is not None else []), *([op.path] if hasattr(op, "path") else [])]
    out = prepare_output_dir(out, OUTPUT_NAMES, overwrite=overwrite, inputs=inputs)

    original = tuple(image.shape[-2:])
    if simulate and not resize and not operator_multiple(op) > 1:
        _operator_output(op, spec, tuple(image.shape))  # e.g. a file mask of another size (an SR factor: below)
    elif not simulate:
        x_shape = input_shape(op, tuple(image.shape))
        produced = _operator_output(op, spec, x_shape)
        if produced[1] == 1 and image.shape[1] == 3:  # e.g. colorization: the measurement is grayscale
            image = read_image(input, "measurement", channels=1)
        if produced != tuple(image.shape):
            raise ValueError(f"the measurement is {image.shape[-2]}x{image.shape[-1]} with {image.shape[1]} "
                             f"channel(s) but {spec!r} measures {tuple(produced[1:])} from a "
                             f"{x_shape[-2]}x{x_shape[-1]} image; pass the measured image (or use --simulate with a "
                             f"clean image)")
        if clean is not None and tuple(clean.shape[-2:]) != tuple(x_shape[-2:]):
            raise ValueError(f"the reference is {clean.shape[-2]}x{clean.shape[-1]} but the restored image will be "
                             f"{x_shape[-2]}x{x_shape[-1]}; pass the clean image that matches the measurement")

    from .memory_option import preload_profile

    planned = None if resize else original if simulate else tuple(x_shape[-2:])
    memory = preload_profile(model, memory, method, planned, samples, device, dtype, "restoration", options, space)
    net = open_model(model, device=device, dtype=dtype, progress=progress, memory=memory)
    if simulate:
        size = fit_size(net, *original, resize, what="input image", operator=op)
        check_memory(net, *size, samples, method, options)
        image = resize_image(image, size)
        _operator_output(op, spec, tuple(image.shape))
    else:
        x_shape = input_shape(op, tuple(image.shape))
        if not resize:
            check_measurement_size(net, original, tuple(x_shape[-2:]), resize_flag=True)
        size = fit_size(net, x_shape[-2], x_shape[-1], resize,
                        what=f"restored image (from the {original[0]}x{original[1]} measurement)")
        check_memory(net, *size, samples, method, options)
        if size != tuple(x_shape[-2:]):
            image = resize_image(image, _operator_output(op, spec, (1, x_shape[1], *size))[-2:])
        clean = None if clean is None else resize_image(clean, size)
    cond = make_condition(net, prompt, guidance_scale)
    result = restore(net, image, op, method, simulate=simulate, reference=clean, num_steps=num_steps, seed=seed,
                     cond=cond, space=space, options=options, progress=progress, samples=samples,
                     consistency_steps=consistency_steps)
    from guidance.methods import method_options

    result.settings.update({
        **({"operator": spec} if isinstance(operator, str) else {}),  # the spec as the user wrote it
        "options": {**method_options(method), **result.settings["options"]},
        "model": str(model) if isinstance(model, (str, os.PathLike)) else type(net).__name__,
        "input": str(input), "reference": None if reference is None else str(reference), "out": str(out),
        "prompt": prompt, "guidance_scale": guidance_scale, "resize": resize, "input_size": list(original),
        "device": str(net.device), "dtype": str(getattr(net, "dtype", "")).replace("torch.", "")})
    save_restoration(result, out)
    return result


def save_restoration(result: Restoration, out: str | os.PathLike) -> Path:
    """Write restored.png, measurement.png, grid.png and metrics.json (metrics plus ``settings``) atomically."""
    out = Path(out)
    psnr_value = result.metrics.get("psnr")
    name = result.settings.get("method", "restored")
    restored_caption = name if psnr_value is None else f"{name}\n{psnr_value:.2f} dB"
    cells, captions = [result.measurement, result.restored], ["measurement", restored_caption]
    if result.reference is not None:
        cells.append(result.reference)
        captions.append("reference")
    metrics = json.dumps({**result.metrics, "settings": result.settings}, indent=2, default=str) + "\n"
    write_outputs([(out / "restored.png", lambda path: save_image(result.restored, path)),
                   (out / "measurement.png", lambda path: save_image(result.measurement, path)),
                   (out / "grid.png", lambda path: save_grid(path, [cells], [captions])),
                   (out / "metrics.json", lambda path: write_text_atomic(path, metrics))])
    return out


# -- `flowsteer restore` --------------------------------------------------------------------------------------
@contextlib.contextmanager
def cli_messages():
    """For a command's run: warnings, and what the ``flowsteer`` logger says (e.g. that a cached calibration table
    is used), as ``flowsteer: warning: <first line>`` on stderr, and a divergence error that also says how to set
    method options on the command line."""
    import logging

    from guidance import DivergenceError

    def show(message, *args, **kwargs):
        print(f"flowsteer: warning: {str(message).strip().splitlines()[0]}", file=sys.stderr)

    class Lines(logging.Handler):
        def emit(self, record):
            show(record.getMessage())

    handler, logger = Lines(logging.WARNING), logging.getLogger("flowsteer")
    logger.addHandler(handler)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        try:
            yield
        except DivergenceError as error:
            raise DivergenceError(f"{str(error).strip().splitlines()[0]} (set method options with "
                                  f"--option NAME=VALUE)") from error
        finally:
            logger.removeHandler(handler)


def _format_metric(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value).split(":")[0]


def run(args) -> int:
    """Restore one image and write the results."""
    with cli_messages():
        result = restore_file(
            args.input, args.operator, args.method, model=args.model, out=args.out, reference=args.reference,
            simulate=args.simulate, seed=args.seed, num_steps=args.steps, noise_std=args.noise_std,
            space=args.space, options=parse_options(args.option), prompt=args.prompt,
            guidance_scale=args.guidance_scale, resize=args.resize, overwrite=args.overwrite,
            progress=not args.quiet, device=args.device, dtype=args.dtype, samples=args.samples,
            consistency_steps=args.consistency_steps, memory=args.memory)
    metrics = result.metrics
    quality = ", ".join(f"{k.upper()} {_format_metric(metrics[k])}" for k in ("psnr", "ssim", "lpips") if k in metrics)
    print(f"{args.method}: {metrics['nfe']} NFE, {metrics['seconds']:.1f} s" + (f"; {quality}" if quality else ""))
    print(f"wrote {', '.join(OUTPUT_NAMES)} to {result.settings['out']}")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "restore", help="restore an image (super-resolution, deblurring, inpainting, ...) with a guidance method",
        description="Solve an inverse problem over a frozen flow model. INPUT is the measurement, or with "
                    "--simulate a clean image that is first degraded by the operator. Writes restored.png, "
                    "measurement.png, grid.png and metrics.json into --out.")
    parser.add_argument("input", metavar="INPUT", help="the measured image (or the clean image with --simulate)")
    parser.add_argument("--operator", required=True, metavar="SPEC",
                        help="forward operator, e.g. 'sr:factor=4' or 'gaussian_blur:sigma=3' (flowsteer operators)")
    parser.add_argument("--method", default="flair", help="guidance method (flowsteer methods; default flair)")
    parser.add_argument("--model", default="default",
                        help="hub id, local folder or 'default' (flowsteer models; default: default)")
    parser.add_argument("--reference", metavar="CLEAN", help="the clean image, for metrics (without --simulate)")
    parser.add_argument("--simulate", action="store_true",
                        help="INPUT is clean: degrade it with the operator (seeded), restore, compare")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated noise and the sampler (default 0)")
    parser.add_argument("--steps", type=int, default=28, help="sampling steps (default 28)")
    parser.add_argument("--samples", type=int, default=1, metavar="K",
                        help="restore K times (seeds batched in one call) and keep the mean: an estimate of the "
                             "posterior mean, sharper in PSNR, softer in detail (default 1)")
    parser.add_argument("--consistency-steps", type=int, metavar="N",
                        help="at most N pixel-space Landweber iterations making the result consistent with the "
                             "measurement, stopped at the noise level (default: the model's recommendation, else 0)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: <INPUT stem>_restored)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    parser.add_argument("--resize", action="store_true",
                        help="resize the image to the nearest size the model accepts instead of stopping")
    parser.add_argument("--noise-std", type=float, metavar="S", help="measurement noise std in [-1, 1] units "
                        "(default: the operator's)")
    parser.add_argument("--space", choices=("pixel", "latent"), default="pixel",
                        help="where the measurement objective lives (default pixel)")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="a method option, e.g. --option step_size=0.3 --option window=(0,10) (repeatable)")
    parser.add_argument("--prompt", help="text prompt for text-conditioned models (default: none)")
    parser.add_argument("--guidance-scale", type=float, metavar="W", help="CFG scale (default: the model's)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="model weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    from .memory_option import add_memory_argument

    add_memory_argument(parser)
    parser.set_defaults(run=run)
