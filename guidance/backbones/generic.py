"""A flow model from any velocity network, with or without an autoencoder.

Calling convention of the network (the only thing a user model has to follow)::

    v = network(x, t)            or   network(x, t, cond)   when a condition is given
    x: (B, C, h, w) latents (or pixels) in the network's dtype
    t: (B,) tensor, t = timestep_scale * s with s in [0, 1] (1 = noise, 0 = data), float32
    v: tensor (B, C, h, w) predicting eps - x0; an object with ``.sample`` (diffusers UNet2DModel and
       friends) or a tuple whose first element is that tensor is accepted too

``timestep_scale`` is 1 for networks trained on s itself and 1000 for networks trained on diffusers'
timesteps (SD3-like). The schedule comes from a diffusers flow-matching scheduler (``set_timesteps`` on a
copy) or, without one, is ``linspace(1, 0, N + 1)`` through the static shift s' = k s / (1 + (k - 1) s).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .autoencoder import LatentCodec
from .base import FlowModel, check_num_steps, sigma_batch, to_arguments

__all__ = ["GenericFlowModel", "shifted_linear_sigmas"]


def shifted_linear_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``num_steps + 1`` sigmas: s = linspace(1, 0, N + 1) mapped by s' = k s / (1 + (k - 1) s), float32."""
    check_num_steps(num_steps)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).to(torch.float32)


def _first_param(module) -> torch.Tensor | None:
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            return p
    return None


class GenericFlowModel(FlowModel):
    """Adapter for a text-free velocity network (see the module docstring for its calling convention).

    Args:
        network: an ``nn.Module`` (e.g. diffusers ``UNet2DModel``) or any callable ``f(x, t[, cond]) -> v``.
        autoencoder: a diffusers ``AutoencoderKL`` / ``AutoencoderTiny`` (scale and shift from its config), or
            None for a pixel-space model.
        decoder, encoder: optional cheaper autoencoders for :meth:`decode` and :meth:`encode`.
        scheduler: a diffusers ``FlowMatchEulerDiscreteScheduler`` giving the schedule, or None.
        shift: static shift k of the plain schedule (used when ``scheduler`` is None).
        timestep_scale: t = timestep_scale * s is what the network receives.
        channels: latent channels (pixel channels for pixel models); default from the autoencoder or the
            network's ``config.in_channels``.
        sample_size: default image side in pixels; default from the network's ``config.sample_size``.
        size_multiple: image sides must be multiples of this; default: the autoencoder factor times the
            network's own downsampling (2 ** (levels - 1) for a diffusers UNet).
        device, dtype: where and in which precision the network runs (default: its parameters', else CPU
            float32).
        method_options: recommended options per guidance method (see :class:`FlowModel`).
        operator_options: recommended options per operator and method (see :class:`FlowModel`).
        restore_options: recommended restoration settings (see :class:`FlowModel`).
        working_size, memory_gib_per_megapixel: the longest side the model is meant for and its measured memory per
            megapixel (see :class:`FlowModel`).
    """

    def __init__(
        self,
        network: Callable[..., Any],
        autoencoder=None,
        *,
        decoder=None,
        encoder=None,
        scheduler=None,
        shift: float = 1.0,
        timestep_scale: float = 1.0,
        channels: int | None = None,
        sample_size: int | None = None,
        size_multiple: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        method_options: dict[str, dict[str, Any]] | None = None,
        operator_options: dict[str, dict[str, dict[str, Any]]] | None = None,
        restore_options: dict[str, Any] | None = None,
        working_size: int | None = None,
        memory_gib_per_megapixel: float | None = None,
    ):
        if not callable(network):
            raise TypeError(f"network must be callable as network(x, t), got {type(network).__name__}")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.network = network
        self.method_options = {str(k): dict(v) for k, v in (method_options or {}).items()}
        self.operator_options = {str(op): {str(m): dict(o) for m, o in methods.items()}
                                 for op, methods in (operator_options or {}).items()}
        self.restore_options = dict(restore_options or {})
        self.working_size = None if working_size is None else int(working_size)
        self.memory_gib_per_megapixel = None if memory_gib_per_megapixel is None else float(memory_gib_per_megapixel)
        self.scheduler = scheduler
        self.shift = float(shift)
        self.timestep_scale = float(timestep_scale)
        param = _first_param(network)
        if device is None:
            device = param.device if param is not None else "cpu"
        self.device = torch.device(device)
        self.dtype = dtype or (param.dtype if param is not None else torch.float32)
        config = getattr(network, "config", None)
        config = config if isinstance(config, dict) else {}  # diffusers configs are dicts

        self.codec = LatentCodec(autoencoder, decoder, encoder) if autoencoder is not None else None
        if (decoder is not None or encoder is not None) and autoencoder is None:
            raise ValueError("a decoder or encoder needs an autoencoder (pixel models encode and decode nothing)")
        if self.codec is not None:
            self.spatial_factor = self.codec.spatial_factor
            self.channels = self.codec.latent_channels
            self.image_channels = self.codec.image_channels
            if channels is not None and channels != self.channels:
                raise ValueError(f"channels={channels} but the autoencoder has {self.channels} latent channels")
            if config.get("in_channels") and config["in_channels"] != self.channels:
                raise ValueError(
                    f"the network takes {config['in_channels']} channels but the autoencoder makes "
                    f"{self.channels}; they do not belong together"
                )
        else:
            self.spatial_factor = 1
            self.channels = channels or config.get("in_channels")
            if not self.channels:
                raise ValueError("pass channels=... (the network has no config.in_channels to read it from)")
            self.image_channels = self.channels

        if size_multiple is None:
            own = 1
            if config.get("down_block_types") and config.get("block_out_channels"):
                own = 2 ** (len(config["block_out_channels"]) - 1)
            elif config.get("patch_size"):
                own = int(config["patch_size"])
            size_multiple = self.spatial_factor * own
        self.size_multiple = int(size_multiple)
        if sample_size is None and config.get("sample_size"):
            side = config["sample_size"]
            side = side[0] if isinstance(side, (tuple, list)) else side
            sample_size = int(side) * self.spatial_factor
        self.default_size = (sample_size, sample_size) if sample_size else None

    def to(self, *args, **kwargs) -> "GenericFlowModel":
        """Move / cast the network, the autoencoder and a separate decoder in place (see :meth:`FlowModel.to`);
        returns self. A network that is a plain function (no ``.to``) cannot be moved and is refused."""
        device, dtype = to_arguments(*args, **kwargs)
        if (device is not None or dtype is not None) and not callable(getattr(self.network, "to", None)):
            raise ValueError(f"the network is a {type(self.network).__name__} without .to(), which cannot be moved; "
                             f"move its weights yourself and build GenericFlowModel(..., device=, dtype=)")
        return super().to(device=device, dtype=dtype)

    def _components(self) -> list:
        network = [self.network] if callable(getattr(self.network, "to", None)) else []
        return network + (self.codec.modules() if self.codec is not None else [])

    @property
    def components(self) -> dict[str, Any]:
        """The parts as a diffusers pipeline names them: the network (``unet`` for a UNet, else ``transformer``),
        ``vae`` (None for a pixel model) and ``scheduler`` (None without one); a separate decoder or encoder
        (TAESD) is not one of them."""
        network = "unet" if "unet" in type(self.network).__name__.lower() else "transformer"
        vae = self.codec.autoencoder if self.codec is not None else None
        return {network: self.network, "vae": vae, "scheduler": self.scheduler}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the model as a folder that :func:`guidance.load_model` loads back to the same model, as diffusers'
        ``save_pretrained`` writes a pipeline: ``model_index.json`` (with the adapter's settings under
        ``"flowsteer"``: ``timestep_scale``, ``shift``, the recommended options, ...), one subfolder per component
        (weights in safetensors), and the ``calibration/`` tables of a loaded folder. The network and autoencoder
        must be diffusers models; a separate decoder or encoder is not written (pass it to load_model again)."""
        import diffusers

        folder = Path(save_directory)
        parts = {name: part for name, part in self.components.items() if part is not None}
        foreign = [f"{name} ({type(part).__name__})" for name, part in parts.items()
                   if not hasattr(diffusers, type(part).__name__) or not hasattr(part, "save_pretrained")]
        if foreign:
            raise ValueError(f"save_pretrained writes diffusers components only, and {', '.join(foreign)} is not "
                             f"one; save it yourself (torch.save of its state_dict)")
        folder.mkdir(parents=True, exist_ok=True)
        for name, part in parts.items():
            part.save_pretrained(folder / name)
        settings = {"timestep_scale": self.timestep_scale, "shift": self.shift, "size_multiple": self.size_multiple,
                    "method_options": self.method_options, "operator_options": self.operator_options,
                    "restore_options": self.restore_options, "working_size": self.working_size,
                    "memory_gib_per_megapixel": self.memory_gib_per_megapixel}
        if self.default_size is not None:
            settings["sample_size"] = self.default_size[0]
        index = {"_class_name": "FlowsteerGenericPipeline", "_diffusers_version": diffusers.__version__,
                 **{name: ["diffusers", type(part).__name__] for name, part in parts.items()},
                 "flowsteer": {key: value for key, value in settings.items() if value not in (None, {})}}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        calibration = getattr(self, "calibration_dir", None)
        if calibration is not None and Path(calibration).is_dir():
            shutil.copytree(calibration, folder / "calibration", dirs_exist_ok=True)
        return folder

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        self.check_size(height, width)
        return (self.channels, height // self.spatial_factor, width // self.spatial_factor)

    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The scheduler's sigmas (set on a copy) or the shifted linear schedule; ``num_steps + 1`` values."""
        if self.scheduler is None:
            return shifted_linear_sigmas(num_steps, self.shift)
        check_num_steps(num_steps)
        if self.scheduler.config.get("use_dynamic_shifting", False):
            raise ValueError(
                "the scheduler uses dynamic shifting, which needs a mu the generic model cannot derive; "
                "pass a scheduler with use_dynamic_shifting=False or use shift=..."
            )
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(num_steps, device="cpu")
        return scheduler.sigmas.to(torch.float32)

    def velocity(self, x: torch.Tensor, sigma, cond: Any = None, grad: bool = False) -> torch.Tensor:
        """v = network(x, timestep_scale * s[, cond]) as float32."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape (B, {self.channels}, h, w), got {tuple(x.shape)}")
        t = sigma_batch(sigma, x.shape[0], self.device) * self.timestep_scale
        args = (x.to(device=self.device, dtype=self.dtype), t)
        if cond is not None:
            args = args + (cond,)
        with torch.set_grad_enabled(grad):
            out = self.network(*args)
            if hasattr(out, "sample"):
                out = out.sample
            elif isinstance(out, (tuple, list)):
                out = out[0]
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"the network must return a velocity of shape {tuple(x.shape)}, got {got}")
            return out.float().to(x.device)

    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = (E(x) - shift) * scale, or the image itself for a pixel model."""
        if self.codec is None:
            if image.ndim != 4 or image.shape[1] != self.image_channels:
                raise ValueError(
                    f"encode expects images of shape (B, {self.image_channels}, H, W), got {tuple(image.shape)}"
                )
            return image.float()
        self.codec.check_image(image)
        self.check_size(int(image.shape[-2]), int(image.shape[-1]))
        return self.codec.encode(image, generator).to(image.device)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """x = D(z / scale + shift), or the latent itself for a pixel model."""
        if self.codec is None:
            return latent.float()
        return self.codec.decode(latent).to(latent.device)
