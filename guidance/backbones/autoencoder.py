"""The map between images in [-1, 1] and the latent space a flow model lives in.

For a diffusers autoencoder E / D with ``scaling_factor`` a and ``shift_factor`` b (read from its config)::

    z = (E(x) - b) * a          x = D(z / a + b)

which is what the SD3 and Flux pipelines do (SD3: a = 1.5305, b = 0.0609; FLUX.1: a = 0.3611, b = 0.1159).
A tiny autoencoder (``AutoencoderTiny``, e.g. TAESD3) used in place of the full VAE, as decoder, encoder or both,
is applied with its own config's a and b, exactly as a pipeline whose ``vae`` was swapped for it would (FLAIR's
official code swaps SD3.5's VAE for TAESD3 for both).

Tiling (:meth:`LatentCodec.enable_tiling`, for large images) runs the autoencoder on overlapping tiles of
``tile_size`` pixels (``tile_size / f`` latent pixels) and blends them linearly over the overlap, so that its
activation memory stops growing with the image; the result differs from the untiled one only near the seams.
"""

from __future__ import annotations

import weakref

import torch


def autoencoder_scale_shift(autoencoder) -> tuple[float, float]:
    """(scaling_factor, shift_factor) from a diffusers autoencoder's config (missing values: 1 and 0)."""
    config = autoencoder.config
    scale = getattr(config, "scaling_factor", None)
    shift = getattr(config, "shift_factor", None)
    return (1.0 if scale is None else float(scale)), (0.0 if shift is None else float(shift))


def autoencoder_spatial_factor(autoencoder) -> int:
    """Image pixels per latent pixel: 2 ** (levels - 1) for AutoencoderKL, the same rule for AutoencoderTiny and
    AutoencoderDC (its decoder's levels), 2 ** (downsampling levels) for the Wan / Qwen-Image video VAEs."""
    config = autoencoder.config
    temporal = getattr(config, "temperal_downsample", None)  # the config's own spelling
    if temporal is not None:
        return int(2 ** len(temporal))
    levels = getattr(config, "block_out_channels", None) or getattr(config, "decoder_block_out_channels", None)
    if levels is None:
        raise ValueError(f"cannot tell the downsampling factor of {type(autoencoder).__name__} from its config")
    factor = getattr(config, "upsampling_scaling_factor", 2)
    return int(factor ** (len(levels) - 1))


def autoencoder_latent_channels(autoencoder) -> int:
    """Latent channels from a diffusers autoencoder's config (``latent_channels``, or ``z_dim`` for video VAEs)."""
    config = autoencoder.config
    channels = getattr(config, "latent_channels", None)
    return int(config.z_dim if channels is None else channels)


#: module -> (its submodule holding the first parameter or buffer, that tensor's name, "_parameters" or "_buffers")
_first_tensor_sites: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: module -> (:func:`placement_stamp` when read, (execution device, dtype))
_placements: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def first_tensor(module: torch.nn.Module) -> torch.Tensor | None:
    """The first parameter of ``module`` (its first buffer without any; None without either). Found by one walk
    over the submodules; later calls read it back from its submodule by name, without a walk."""
    site = _first_tensor_sites.get(module)
    if site is not None:
        owner, name, kind = site
        tensor = getattr(owner, kind).get(name)
        if tensor is not None:
            return tensor
    for kind in ("_parameters", "_buffers"):
        for owner in module.modules():
            for name, tensor in getattr(owner, kind).items():
                if tensor is not None:
                    _first_tensor_sites[module] = (owner, name, kind)
                    return tensor
    return None


def placement_stamp(module: torch.nn.Module) -> tuple:
    """What a move of ``module`` changes, read without walking its submodules: the device and dtype of its first
    parameter (:func:`first_tensor`; ``.to()`` moves it in place, offloading parks it on the CPU or the meta device)
    and the offload hooks on the module itself (accelerate's ``_hf_hook``, set on the module by
    ``enable_model_cpu_offload`` and ``enable_sequential_cpu_offload``; diffusers' hook registry, by name)."""
    tensor = first_tensor(module)
    registry = getattr(module, "_diffusers_hook", None)
    return (None if tensor is None else (tensor.device, tensor.dtype), getattr(module, "_hf_hook", None),
            registry, tuple(getattr(registry, "hooks", ())))


def execution_placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of ``module``'s inputs: an offload hook's execution device (weights parked on the CPU or the
    meta device by ``enable_model_cpu_offload``), else the device of its weights; and its dtype. Both need a walk
    over every submodule (diffusers' ``module.dtype`` walks them too), so they are read once and kept while
    :func:`placement_stamp` is unchanged: moving or casting the module (``.to()``, also from outside flowsteer)
    and adding or removing offload hooks read them again; moving one of its submodules alone does not."""
    stamp = placement_stamp(module)
    kept = _placements.get(module)
    if kept is not None and kept[0] == stamp:
        return kept[1]
    device = None
    for sub in module.modules():
        device = getattr(getattr(sub, "_hf_hook", None), "execution_device", None)
        if device is not None:
            break
    placement = (module.device if device is None else torch.device(device), module.dtype)
    _placements[module] = (stamp, placement)
    return placement


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s inputs must be (see :func:`execution_placement`)."""
    return execution_placement(module)[0]


def set_tiling(autoencoder, tile_size: int | None = None, overlap: float | None = None) -> None:
    """Turn on a diffusers autoencoder's tiled encode / decode with tiles of ``tile_size`` image pixels
    (``tile_size / f`` latent pixels) overlapping by the fraction ``overlap``. None keeps the autoencoder's own
    values: its config's sample_size and 1/4 for AutoencoderKL, 512 and 1/8 for AutoencoderTiny and AutoencoderDC,
    256 and 1/4 for the Qwen-Image VAE. Autoencoders that take a tile and a stride (AutoencoderDC, the video VAEs)
    get the stride that leaves the overlap, rounded to whole latent pixels."""
    if not hasattr(autoencoder, "enable_tiling") or not (hasattr(autoencoder, "tile_sample_min_size")
                                                         or hasattr(autoencoder, "tile_sample_stride_height")):
        raise ValueError(f"{type(autoencoder).__name__} cannot tile; use a diffusers AutoencoderKL, AutoencoderTiny, "
                         f"AutoencoderDC or a video VAE")
    factor = autoencoder_spatial_factor(autoencoder)
    strided = hasattr(autoencoder, "tile_sample_stride_height")
    own = autoencoder.tile_sample_min_height if strided else autoencoder.tile_sample_min_size
    own = own[0] if isinstance(own, (tuple, list)) else own
    size = own if tile_size is None else tile_size
    if overlap is not None:
        fraction = overlap
    elif strided:
        fraction = 1 - autoencoder.tile_sample_stride_height / own
    else:
        fraction = autoencoder.tile_overlap_factor
    if isinstance(size, bool) or not isinstance(size, int) or size < factor or size % factor:
        raise ValueError(f"tile_size must be a positive multiple of the autoencoder's factor {factor} (pixels), "
                         f"got {size!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 0.5:
        raise ValueError(f"the tile overlap must be a fraction in (0, 0.5], got {fraction!r}")
    shared = int(size // factor * fraction)  # latent pixels two neighbouring tiles share
    if shared < 1:
        raise ValueError(f"tiles of {size} pixels ({size // factor} latent pixels) overlapping by {fraction} share "
                         f"less than one latent pixel; use a larger tile_size or overlap")
    if strided:
        stride = size - shared * factor
        autoencoder.enable_tiling(size, size, stride, stride)
        return
    autoencoder.enable_tiling()
    autoencoder.tile_sample_min_size = size
    autoencoder.tile_latent_min_size = size // factor
    autoencoder.tile_overlap_factor = float(fraction)


def encoder_output(out, generator: torch.Generator | None = None) -> torch.Tensor:
    """The latent of an autoencoder's ``encode`` output: a posterior sample drawn with ``generator`` (its mean
    without one), AutoencoderTiny's ``latents`` or AutoencoderDC's deterministic ``latent``."""
    if hasattr(out, "latent_dist"):
        dist = out.latent_dist
        return dist.mean if generator is None else dist.sample(generator=generator)
    return out.latents if hasattr(out, "latents") else out.latent


class LatentCodec:
    """Encode images to model latents and decode them back, with the autoencoder's scale and shift.

    Args:
        autoencoder: a diffusers ``AutoencoderKL`` (or ``AutoencoderTiny``) used for encoding and decoding unless
            ``encoder`` / ``decoder`` replace it.
        decoder: optional cheaper autoencoder used for :meth:`decode` (e.g. TAESD3); it must share the latent
            channels and downsampling factor of ``autoencoder``.
        encoder: optional cheaper autoencoder used for :meth:`encode`, with the same requirements.

    Neither method touches gradient mode: they are differentiable when the caller enables gradients.
    """

    def __init__(self, autoencoder, decoder=None, encoder=None):
        self.autoencoder = autoencoder
        self.decoder = autoencoder if decoder is None else decoder
        self.encoder = autoencoder if encoder is None else encoder
        self.spatial_factor = autoencoder_spatial_factor(autoencoder)
        self.latent_channels = autoencoder_latent_channels(autoencoder)
        config = autoencoder.config
        self.image_channels = int(getattr(config, "in_channels", None) or getattr(config, "input_channels", 3))
        for role, module in (("decoder", decoder), ("encoder", encoder)):
            if module is None:
                continue
            channels = autoencoder_latent_channels(module)
            if channels != self.latent_channels:
                raise ValueError(
                    f"{role} has {channels} latent channels but the model's autoencoder has "
                    f"{self.latent_channels}; use an autoencoder made for this model (e.g. TAESD3 for SD3)"
                )
            if autoencoder_spatial_factor(module) != self.spatial_factor:
                raise ValueError(
                    f"{role} scales by {autoencoder_spatial_factor(module)} but the model's autoencoder by "
                    f"{self.spatial_factor}; use an autoencoder made for this model"
                )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LatentCodec":
        """Move / cast the autoencoder and a separate decoder / encoder in place (the tensors they make follow);
        returns self."""
        moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if moves:
            for module in self.modules():
                module.to(**moves)
        return self

    def modules(self) -> list[torch.nn.Module]:
        """The autoencoder and, when separate, the decoder and the encoder."""
        return list(dict.fromkeys((self.autoencoder, self.decoder, self.encoder)))

    def enable_tiling(self, tile_size: int | None = None, overlap: float | None = None) -> None:
        """Encode and decode on overlapping tiles (see :func:`set_tiling`), with every autoencoder in use."""
        for module in self.modules():
            set_tiling(module, tile_size, overlap)

    def disable_tiling(self) -> None:
        """Encode and decode whole images again."""
        for module in self.modules():
            if hasattr(module, "disable_tiling"):
                module.disable_tiling()

    def check_image(self, image: torch.Tensor) -> None:
        """Raise a ValueError unless ``image`` is (B, image_channels, H, W)."""
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != self.image_channels:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(
                f"encode expects images of shape (B, {self.image_channels}, H, W) in [-1, 1], got {shape}; "
                f"convert grayscale/RGBA images to {self.image_channels} channels first"
            )

    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = (E(x) - b) * a; a posterior sample drawn with ``generator``, or its mean when it is None."""
        self.check_image(image)
        module = self.encoder
        device, dtype = execution_placement(module)
        out = module.encode(image.to(device=device, dtype=dtype))
        scale, shift = autoencoder_scale_shift(module)
        return (encoder_output(out, generator).float() - shift) * scale

    def check_latent(self, latent: torch.Tensor) -> None:
        """Raise a ValueError unless ``latent`` is (B, latent_channels, h, w)."""
        if latent.ndim != 4 or latent.shape[1] != self.latent_channels:
            raise ValueError(
                f"decode expects latents of shape (B, {self.latent_channels}, h, w), got {tuple(latent.shape)}"
            )

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """x = D(z / a + b), float32, in about [-1, 1] (not clamped)."""
        self.check_latent(latent)
        return self.decode_scaled(latent)

    def decode_scaled(self, latent: torch.Tensor) -> torch.Tensor:
        """x = D(z / a + b) of a latent in the decoder's own layout, with its config's scale a and shift b."""
        module = self.decoder
        scale, shift = autoencoder_scale_shift(module)
        z = latent.float() / scale + shift
        device, dtype = execution_placement(module)
        return module.decode(z.to(device=device, dtype=dtype)).sample.float()
