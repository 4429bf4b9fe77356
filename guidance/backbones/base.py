"""The flow-model interface every backbone adapter implements.

A flow model is a frozen velocity field v_theta(x, s, c) over a latent space, plus an autoencoder
between images (float tensors in [-1, 1], NCHW) and latents. All solver state is float32; the backbone
may run in bf16 inside the adapter. Backbone quirks (timestep scaling, latent packing, position ids,
guidance embeddings, classifier-free guidance) live in the adapter and nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from operators.checks import MAX_STEPS, check_int


def check_num_steps(num_steps) -> int:
    """A step count is an integer in 1 .. :data:`~operators.checks.MAX_STEPS`."""
    return check_int(num_steps, "num_steps", 1, MAX_STEPS)


def to_arguments(*args, **kwargs) -> tuple[torch.device | None, torch.dtype | None]:
    """(device, dtype) of a ``to(device)``, ``to(dtype)``, ``to(device, dtype)`` or ``to(device=..., dtype=...)``
    call, None where not given, checked as everywhere (:func:`guidance.loading.devices.check_device`,
    ``check_dtype``)."""
    from ..loading.devices import check_device, check_dtype

    unknown = sorted(set(kwargs) - {"device", "dtype"})
    if unknown:
        raise ValueError(f"to() takes only device and dtype, got {unknown}; e.g. model.to('cuda', torch.bfloat16)")
    if len(args) > 2:
        raise ValueError(f"to() takes at most two arguments (device, dtype), got {len(args)}")
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for arg in args:
        if isinstance(arg, torch.dtype):
            if dtype is not None:
                raise ValueError("to() got the dtype twice; give it once")
            dtype = arg
        elif isinstance(arg, (str, torch.device)) or (isinstance(arg, int) and not isinstance(arg, bool)):
            if device is not None:
                raise ValueError("to() got the device twice; give it once")
            device = f"cuda:{arg}" if isinstance(arg, int) else arg
        else:
            raise ValueError(f"to() takes a device ('cpu', 'cuda', torch.device) and/or a torch.dtype, got {arg!r}")
    return check_device(device), check_dtype(dtype)


def module_attributes(owner) -> list[torch.nn.Module]:
    """``owner``'s ``nn.Module`` attributes, each once."""
    return list({id(v): v for v in vars(owner).values() if isinstance(v, torch.nn.Module)}.values())


class _EmptyFloat32List(logging.Filter):
    """Drops diffusers' warning "There are modules in X that should be kept in float32: []": ``ModelMixin.to``
    gives it on every cast to a dtype, also when the list is empty (its test is ``fp32_modules is not None`` after
    ``fp32_modules = self._keep_in_fp32_modules or []``), where nothing is kept in float32 and nothing is wrong.
    The warning with modules listed passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []." not in record.getMessage()


@contextlib.contextmanager
def casting():
    """Around flowsteer's own casts of diffusers modules (``model.to(dtype)``, ``load_model(pipeline, dtype=)``):
    without diffusers' empty "modules that should be kept in float32: []" warning (:class:`_EmptyFloat32List`)."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    quiet = _EmptyFloat32List()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def move_modules(owner, modules, *args, **kwargs):
    """The body of a model's ``to(...)``: move (and cast) ``modules`` in place, set ``owner.device`` /
    ``owner.dtype`` to what was given, return ``owner``."""
    device, dtype = to_arguments(*args, **kwargs)
    moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    with casting():
        for module in modules if moves else ():
            module.to(**moves)
    if device is not None:
        owner.device = device
    if dtype is not None:
        owner.dtype = dtype
    return owner


class FlowModel:
    """Abstract frozen rectified-flow model (see ``guidance.flow`` for the time convention).

    Subclasses implement :meth:`velocity`, :meth:`sigmas` and :meth:`latent_shape`; latent models also
    :meth:`encode`, :meth:`decode` and, when they take text, :meth:`condition`.

    Attributes:
        device: where the backbone runs.
        dtype: the backbone's dtype (solver state stays float32).
        spatial_factor: image pixels per latent pixel along each side (1 for pixel-space models).
        size_multiple: image height and width must be multiples of this.
        image_channels: channels of the images the autoencoder takes.
        default_size: (height, width) in pixels used when a caller gives none (the backbone's native size),
            or None when the model has no natural size.
        max_size: the largest height or width the model accepts (None: no limit beyond memory).
        method_options: options its authors recommend per guidance method (``{"flair": {"data_steps": 5}}``),
            applied by the tasks under the user's own options; None: the methods' defaults.
        operator_options: options its authors recommend for one operator (by registry name) and method, over
            ``method_options`` (``{"sr": {"flowchef": {"step_size": 16.0}}}``); None: none.
        restore_options: restoration settings its authors recommend (``{"consistency_steps": 20}``, see
            :func:`tasks.commands.restore.restore`), applied when the user sets none; None: the task's defaults.
        takes_text: whether :meth:`condition` takes a prompt (SD3, Flux); text-free models refuse one.
        working_size: the longest image side the model is meant to work at (``--resize`` fits larger images to it;
            None: ``max_size``, or no limit).
        memory_gib_per_megapixel: measured peak memory of a restoration above the loaded model, GiB per megapixel
            of image, for the estimate that refuses a run far beyond the machine (None: no estimate).
    """

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    spatial_factor: int = 1
    size_multiple: int = 1
    image_channels: int = 3
    default_size: tuple[int, int] | None = None
    max_size: int | None = None
    takes_text: bool = False
    working_size: int | None = None
    memory_gib_per_megapixel: float | None = None
    method_options: dict[str, dict[str, Any]] | None = None
    operator_options: dict[str, dict[str, dict[str, Any]]] | None = None
    restore_options: dict[str, Any] | None = None

    def to(self, *args, **kwargs) -> "FlowModel":
        """Move (and, with a dtype, cast) the model's weights in place, as ``nn.Module.to`` and diffusers
        pipelines do: ``to(device)``, ``to(dtype)``, ``to(device, dtype)`` or ``to(device=..., dtype=...)``.
        Returns the model itself; ``device`` and ``dtype`` follow. Solver state stays float32.

        This generic version moves every ``nn.Module`` of :meth:`_components`; adapters whose weights live
        elsewhere (a pipeline, an exact mixture) override it."""
        return move_modules(self, self._components(), *args, **kwargs)

    def _components(self) -> list[torch.nn.Module]:
        """The modules holding the model's weights, moved by :meth:`to` (default: its ``nn.Module`` attributes)."""
        return module_attributes(self)

    def recommended_options(self, method: str, operator: str | None = None) -> dict[str, Any]:
        """A copy of the options recommended for ``method`` (empty when none), with those for ``method`` on the
        operator registered as ``operator`` (``"sr"``, see :func:`operators.operator_name`) on top."""
        for_operator = (self.operator_options or {}).get(operator, {}) if operator is not None else {}
        return {**(self.method_options or {}).get(method, {}), **for_operator.get(method, {})}

    #: True where the diffusers pipeline batches classifier-free guidance as [negative; positive] in its
    #: ``prompt_embeds`` (SD3, SANA): a diffusers callback then sees them so (:mod:`guidance.callbacks`)
    cfg_in_batch: bool = False

    def pipeline_latents(self, x: torch.Tensor) -> torch.Tensor:
        """The state ``x`` (B, C, h, w) in the layout the diffusers pipeline's loop keeps its ``latents`` in (what
        a diffusers callback gets); the same tensor where the layouts agree."""
        return x

    def from_pipeline_latents(self, latents: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pipeline_latents` for a state shaped as ``like``."""
        return latents

    def pipeline_timestep(self, sigma) -> torch.Tensor:
        """The timestep a diffusers pipeline gives its callbacks at noise level ``sigma``: the flow-matching
        scheduler's ``num_train_timesteps * sigma`` (1000 s), float32, as its ``scheduler.timesteps`` hold it."""
        config = getattr(getattr(self, "scheduler", None), "config", {})
        return torch.as_tensor(sigma, dtype=torch.float32) * float(config.get("num_train_timesteps", 1000))

    def velocity(
        self, x: torch.Tensor, sigma: float | torch.Tensor, cond: Any = None, grad: bool = False
    ) -> torch.Tensor:
        """v_theta(x, s, c) for latents ``x`` of shape (B, C, h, w); returns float32, same shape.

        ``sigma`` is a scalar or a (B,) tensor. Runs without autograd unless ``grad=True`` (methods that
        backpropagate through the network, DPS-style).
        """
        raise NotImplementedError

    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The backbone's native sigma schedule: ``num_steps + 1`` float32 values from ~1 down to 0."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent for an image of ``height`` x ``width`` pixels."""
        raise NotImplementedError

    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image in [-1, 1] (B, image_channels, H, W) -> latent (B, C, h, w), float32. Identity for pixel models."""
        return image

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent (B, C, h, w) -> image in about [-1, 1] (B, image_channels, H, W), float32."""
        return latent

    def condition(self, prompt: Any = None, negative_prompt: Any = None, guidance_scale: float | None = None, **kwargs):
        """Conditioning for :meth:`velocity` (text embeddings computed once and cached; text models override this).
        None for unconditional models, which refuse a prompt, negative prompt, guidance scale or other option in one
        line."""
        given = [name for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt),
                                          ("guidance_scale", guidance_scale)) if value not in (None, "")]
        given += sorted(name for name, value in kwargs.items() if value is not None)
        if given:
            name = getattr(self, "name_or_path", None) or type(self).__name__
            raise ValueError(f"the model {name!r} is unconditional: it takes no {', '.join(given)}; drop "
                             f"{' and '.join('--' + g.replace('_', '-') for g in given)} (or pass cond= for a "
                             f"network that takes its own conditioning)")
        return None

    def __call__(self, prompt: Any = None, **arguments):
        """Generate as a diffusers pipeline is called: ``model("a cat", num_inference_steps=28, guidance_scale=7.0,
        generator=..., output_type="pil")`` is :func:`guidance.sample` with those arguments (flowsteer's or
        diffusers' names, :mod:`guidance.arguments`); ``model()`` samples a text-free model unconditionally (and
        a text model with its empty prompt). Returns the :class:`~guidance.sampler.SampleResult` (``.images``),
        or ``(images,)`` with ``return_dict=False``."""
        return FlowModel.call_function(self, prompt=prompt, **arguments)

    #: what ``model(...)`` runs: :func:`guidance.sample`, set by :mod:`guidance.sampler` (which imports this module,
    #: so this module does not import it)
    call_function: Callable[..., Any] | None = None

    #: False after ``set_progress_bar_config(disable=True)``: the runs on this model show no progress bar
    progress_bar: bool = True

    def set_progress_bar_config(self, disable: bool = False) -> None:
        """As a diffusers pipeline's: ``disable=True`` turns off the progress bars of every run on this model
        (:func:`guidance.sample`, the methods, ``model(...)``), whatever their ``progress``; False shows them
        again where ``progress`` asks for them."""
        if not isinstance(disable, bool):
            raise ValueError(f"disable must be True or False, got {disable!r}")
        self.progress_bar = not disable

    def enable_vae_slicing(self) -> "FlowModel":
        """Encode and decode a batch one image at a time (the autoencoders' ``enable_slicing``), which bounds the
        autoencoder's memory for large batches, as a diffusers pipeline's ``enable_vae_slicing``."""
        for module in self._autoencoders("enable_vae_slicing"):
            module.enable_slicing()
        return self

    def disable_vae_slicing(self) -> "FlowModel":
        """Encode and decode a batch at once again."""
        for module in self._autoencoders("disable_vae_slicing"):
            module.disable_slicing()
        return self

    def _autoencoders(self, what: str) -> list[torch.nn.Module]:
        """The autoencoders in use (``codec.modules()``); refused in one line for a model that has none."""
        codec = getattr(self, "codec", None)
        if codec is None:
            raise ValueError(f"{what}: {type(self).__name__} is a pixel-space model, with no autoencoder to slice")
        modules = codec.modules()
        unsliced = [type(m).__name__ for m in modules if not callable(getattr(m, "enable_slicing", None))]
        if unsliced:
            raise ValueError(f"{what}: {', '.join(unsliced)} cannot encode or decode a batch in slices")
        return modules

    def check_size(self, height: int, width: int) -> None:
        """Raise a ValueError naming the allowed sizes (multiple, maximum) when an image size does not fit."""
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if value % self.size_multiple:
                raise ValueError(
                    f"{name}={value} is not a multiple of {self.size_multiple}, which {type(self).__name__} "
                    f"requires; use e.g. {name}={max(self.size_multiple, round(value / self.size_multiple) * self.size_multiple)}"
                )
            if self.max_size is not None and value > self.max_size:
                raise ValueError(f"{name}={value} is larger than {type(self).__name__} accepts: sides up to "
                                 f"{self.max_size} pixels, multiples of {self.size_multiple}; resize the image")


def sigma_batch(sigma: float | torch.Tensor, batch: int, device: torch.device | str) -> torch.Tensor:
    """A scalar or (B,) sigma as a float32 (B,) tensor on ``device``."""
    s = torch.as_tensor(sigma, dtype=torch.float32).to(device)
    if s.ndim == 0:
        return s.expand(batch)
    if s.ndim != 1 or s.shape[0] not in (1, batch):
        raise ValueError(f"sigma must be a scalar or have shape ({batch},), got {tuple(s.shape)}")
    return s.expand(batch)


def repeat_for_batch(t: torch.Tensor, batch: int, what: str = "condition") -> torch.Tensor:
    """Repeat each of the n rows of ``t`` batch / n times in a row (the pipelines' num_images_per_prompt order)."""
    n = t.shape[0]
    if n == batch:
        return t
    if batch % n:
        raise ValueError(f"a batch of {batch} latents does not fit a {what} of batch {n}; use a multiple of {n}")
    return t.repeat_interleave(batch // n, dim=0)
