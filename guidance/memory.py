"""The memory a run needs, estimated before it starts, the one refusal every command and method shares, and the
exact measure of a run's tensor memory that the estimates are checked against.

The estimate is the model's measured ``memory_gib_per_megapixel`` (peak memory above the loaded weights, per
megapixel of image, times the batch) where the model has one; otherwise the planner's
(:mod:`guidance.memory_estimate`: weights, activations and the method's extras under the model's memory profile)
for the models it reads (diffusers pipelines and networks); otherwise a lower bound from the sizes of the tensors
the run must hold (the latent states and the decoded float32 images), so that a size no machine could hold
(``--size 100000 100000``) is refused at once on any model. :func:`check_plan` refuses a run before its model
loads, naming the lightest memory profile that fits.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["TensorPeak", "check_memory", "check_plan", "estimate_memory_gib", "free_memory_gib", "scaled_side"]

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


def _planned(model, height: int, width: int, batch: int, method: str | None, options: dict | None):
    """(the planner's Plan of the run on the loaded ``model``, the bytes of its weights already on the device, its
    ModelSpec) or None when the planner does not read the model. The ModelSpec is read once per memory profile."""
    from .backbones.base import FlowModel
    from .memory_estimate import METHODS, model_spec, plan

    if method is not None and method not in METHODS:
        return None
    inner = vars(model).get("model") if hasattr(model, "__dict__") else None
    if not isinstance(model, FlowModel) and isinstance(inner, FlowModel):  # a view such as the methods' NFE counter
        model = inner
    stamp = getattr(model, "memory_profile", None)
    try:
        cached = _SPECS.get(model)
    except TypeError:  # an unhashable model
        return None
    if cached is None or cached[0] != stamp:
        try:
            cached = (stamp, model_spec(model))
        except (ValueError, AttributeError, StopIteration, TypeError):
            return None
        _SPECS[model] = cached
    device = torch.device(getattr(model, "device", "cpu"))
    dtype = getattr(model, "dtype", None)
    run = plan(cached[1], method or "unguided", height, width, batch, device=device,
               dtype=dtype if isinstance(dtype, torch.dtype) else None, options=options)
    placement = "device" if device.type == "cpu" else _placement(run.profile)
    kept = ("transformer", "unet", "text_encoder", "vae", "decoder") if placement == "device" else \
        ("vae", "decoder") if placement == "text_swap" else ()
    held = {k: v for k, v in run.weights.items() if cached[1].components[k].role in kept}
    return run, sum(held.values()), cached[1]


def _placement(profile: str) -> str:
    from .memory_profiles import PROFILES

    return PROFILES[profile].placement


_SPECS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def check_memory(model, height: int, width: int, batch: int = 1, what: str = "run", method: str | None = None,
                 options: dict | None = None) -> float | None:
    """The estimated peak memory (GiB) of a ``batch`` of ``height`` x ``width`` images (the model's measured GiB per
    megapixel; else the planner's peak of ``method``, default unguided sampling, with its ``options``, under the
    model's memory profile; else :func:`estimate_memory_gib`'s lower bound); a ValueError before anything runs when
    it is beyond the memory free here (CUDA: the device's free memory; CPU: the machine's available memory), naming
    a size that fits and, with the planner, the lightest memory profile that fits. None when the free memory cannot
    be read. Weights the model already holds on the device are not counted twice."""
    free = free_memory_gib(torch.device(getattr(model, "device", "cpu")))
    if free is None:
        return None
    planned = None if getattr(model, "memory_gib_per_megapixel", None) else _planned(model, height, width, batch,
                                                                                      method, options)
    if planned is None:
        estimate, basis = estimate_memory_gib(model, height, width, batch)
        needed = estimate
    else:
        run, held, _ = planned
        estimate, needed = run.peak_gib, (run.peak - held) / 2**30
        basis = f"{run.method} under the memory profile {run.profile!r}; flowsteer memory shows the parts"
    if needed <= HEADROOM * free:
        return estimate
    multiple = int(getattr(model, "size_multiple", 1) or 1)
    if planned is None:
        scale = math.sqrt(HEADROOM * free / needed)
        fits = tuple(scaled_side(side, scale, multiple) for side in (height, width))
    else:
        fits = _fitting_size(planned, height, width, multiple, free, options)
    limit = getattr(model, "working_size", None) or getattr(model, "max_size", None)
    resize = (f" (--resize fits an image to the model's working size, {limit} pixels)"
              if limit and what == "restoration" else "")
    lighter = None
    if planned is not None:
        from .memory_estimate import lightest_fitting

        run, held, spec = planned
        lighter, _ = lightest_fitting(spec, run.method, height, width, batch, free * 2**30 + held, run.device,
                                      dtype=run.dtype, options=options)
        lighter = None if lighter == run.profile else lighter
    profile = f"load the model with memory={lighter!r} (--memory {lighter})" if lighter else ""
    if fits:
        advice = (f"use at most {fits[0]}x{fits[1]}{' or fewer images' if batch > 1 else ''}{resize}"
                  f"{', or ' + profile if profile else ''} or a machine with more memory")
    else:
        advice = f"no smaller size fits; {profile + ' or use' if profile else 'use'} a machine with more memory"
    raise ValueError(f"a {height}x{width} {what}{f' of {batch} images' if batch > 1 else ''} needs about "
                     f"{estimate:.1f} GiB ({basis}), more than the {free:.1f} GiB free here; {advice}")


def _fitting_size(planned, height: int, width: int, multiple: int, free: float,
                  options: dict | None) -> tuple[int, int] | None:
    """The largest (height, width) of the same shape, in multiples of ``multiple``, whose plan fits the free memory
    (bisection on the scale of the sides); None when not even the smallest does."""
    from .memory_estimate import plan

    run, held, spec = planned

    def sides(scale: float) -> tuple[int, int]:
        return scaled_side(height, scale, multiple), scaled_side(width, scale, multiple)

    def fits(size: tuple[int, int]) -> bool:
        trial = plan(spec, run.method, *size, run.batch, run.profile, device=run.device, dtype=run.dtype,
                     options=options)
        return trial.peak - held <= HEADROOM * free * 2**30

    low, high = 0.0, 1.0
    if not fits(sides(low)):
        return None
    for _ in range(16):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(sides(middle)) else (low, middle)
    return sides(low)


def check_plan(source, method: str, height: int | None, width: int | None, batch: int = 1, profile: str | None = None,
               *, device=None, dtype=None, what: str = "run", options: dict | None = None, space: str = "pixel",
               local_files_only: bool = False) -> str | None:
    """Before ``source`` (a hub id or folder) loads: the memory profile to load it with. ``profile`` "auto" becomes
    the lightest profile whose plan of the run (``method`` on ``batch`` images of ``height`` x ``width``, default
    the family's size) fits the free memory of ``device``, and a ValueError names the estimate when none does; an
    explicit profile whose plan does not fit is refused in one line naming the lightest profile that fits. None
    (the profile unchanged) when the planner cannot read the source (the loading reports why) or the free memory is
    unknown or the planner does not cover ``method``."""
    from .loading.devices import check_device
    from .memory_estimate import HEADROOM as PLAN_HEADROOM, METHODS, lightest_fitting, model_spec, plan
    from .memory_profiles import AUTO, check_profile

    profile = check_profile(profile) if profile is not None else None
    device = check_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    free = free_memory_gib(device) if method in METHODS else None
    try:
        spec = None if free is None else model_spec(source, local_files_only=local_files_only)
    except (ValueError, OSError):
        spec = None
    if spec is None or spec.measured_gib_per_megapixel:  # a measured figure is checked once the model is loaded
        return None if profile == AUTO else profile
    settings = dict(device=device, dtype=dtype, options=options, space=space)
    target = profile or "none"
    if not (height and width or spec.default_size):
        return None if profile == AUTO else profile  # no size to plan; the run's own check comes after loading
    if target != AUTO and plan(spec, method, height, width, batch, target, **settings).peak \
            <= PLAN_HEADROOM * free * 2**30:
        return profile
    name, plans = lightest_fitting(spec, method, height, width, batch, free * 2**30, device, dtype=dtype,
                                   options=options, space=space)
    images = f" of {batch} images" if batch > 1 else ""
    if name is None:
        least = min(plans.values(), key=lambda p: p.peak)
        raise ValueError(f"a {least.height}x{least.width} {what}{images} with {method} on {spec.name} needs about "
                         f"{least.peak_gib:.1f} GiB even with the memory profile {least.profile!r}, more than the "
                         f"{free:.1f} GiB free here; use a smaller size or a machine with more memory (flowsteer "
                         f"memory shows the parts)")
    if target == AUTO:
        return name
    run = plans[target] if target in plans else plan(spec, method, height, width, batch, target, **settings)
    raise ValueError(f"a {run.height}x{run.width} {what}{images} with {method} on {spec.name} needs about "
                     f"{run.peak_gib:.1f} GiB with the memory profile {target!r}, more than the {free:.1f} GiB free "
                     f"here; use --memory {name} (about {plans[name].peak_gib:.1f} GiB)")


def _storages(tensor: torch.Tensor):
    """The storages behind a tensor (a wrapper subclass: those of the tensors it flattens to)."""
    if type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__"):
        for name in tensor.__tensor_flatten__()[0]:
            yield from _storages(getattr(tensor, name))
        return
    try:
        yield tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage
        return


class TensorPeak(TorchDispatchMode):
    """The exact peak of tensor memory on one device inside a ``with`` block: the bytes of every live storage that
    an operator creates, plus those of the tensors and modules' weights given as ``roots``, each counted once
    (views share their storage) and uncounted when it is freed (a finalizer on the storage). ``peak`` and
    ``current`` are bytes; allocator slack and kernels' internal workspaces are not counted.

        with TensorPeak(model.transformer, x) as measured:
            model.velocity(x, sigma, cond)
        measured.peak
    """

    def __init__(self, *roots, device: torch.device | str = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        for root in roots:
            tensors = [*root.parameters(), *root.buffers()] if isinstance(root, torch.nn.Module) else [root]
            for tensor in tensors:
                self._add(tensor)

    def _drop(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _add(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        for storage in _storages(tensor):
            key = id(storage)
            if key in self.live or storage.device.type != self.device.type:
                continue
            size = storage.nbytes()
            if size:
                self.live[key] = size
                self.current += size
                weakref.finalize(storage, self._drop, key)
                self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self._add(tensor)
        return out
