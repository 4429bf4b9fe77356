"""The backbones the speed table measures (``BACKBONES``): the tests' random-weight miniatures, flowsteer's default
model and, on a CUDA GPU only, full-size architectures with random weights (:mod:`tasks.random_models`), each
opened with the run's decoder, compilation and VAE tiling, and its text condition encoded once."""

from __future__ import annotations

from typing import Any

import torch

from .settings import CellSkipped, Settings, _first_line

__all__ = ["BACKBONES", "FULL_SIZE", "SIZE_MULTIPLES", "open_backbone", "unavailable"]

BACKBONES = {
    "tiny-sd3": "random-weight SD3 miniature (the tests' architecture), CFG w = 7 as one batched call",
    "tiny-flux": "random-weight FLUX.1-dev miniature (guidance embedding 3.5)",
    "tiny-flux2-klein": "random-weight FLUX.2 [klein] miniature (step-distilled, no CFG)",
    "tiny-qwen-image": "random-weight Qwen-Image miniature (true CFG 4 as one batched call)",
    "default": "flowsteer's embedded default model (trained weights, no text)",
    "tiny-pixel": "random-weight pixel-space UNet miniature (no autoencoder: the pixel-space solvers' setting)",
    "pnp-flow-unet": "the pixel-space network of PnP-Flow's and Flower's experiments (UNet, 34.5M parameters, "
                     "random weights, no autoencoder)",
    "sd3.5-medium": "SD3.5-medium architecture, random weights, CFG w = 7 as one batched call (GPU only)",
    "flux-dev": "FLUX.1-dev architecture, random weights, guidance embedding 3.5 (GPU only)",
    "flux2-klein-4b": "FLUX.2 [klein] 4B architecture (step-distilled, no CFG), random weights, full VAE (GPU only)",
    "flux2-klein-9b": "FLUX.2 [klein] 9B architecture (step-distilled, no CFG), random weights, full VAE (GPU only)",
    "qwen-image": "Qwen-Image 20B architecture, random weights, true CFG 4 as one batched call, full VAE (GPU only)",
}
FULL_SIZE = ("sd3.5-medium", "flux-dev", "flux2-klein-4b", "flux2-klein-9b", "qwen-image")
#: image sides each backbone takes are multiples of these (the latent factor times the transformer's patch)
SIZE_MULTIPLES = {"tiny-sd3": 8, "tiny-flux": 16, "default": 16, "tiny-pixel": 2, "pnp-flow-unet": 8,
                  "sd3.5-medium": 16, "flux-dev": 16,
                  "tiny-flux2-klein": 16, "flux2-klein-4b": 16, "flux2-klein-9b": 16, "tiny-qwen-image": 16, "qwen-image": 16}


def unavailable(name: str, settings: Settings) -> str | None:
    """Why a backbone cannot run here (None when it can), without building it."""
    if name in FULL_SIZE and not settings.cuda:
        return f"{name} needs a CUDA GPU (full-size random-weight architectures are timed on a GPU only)"
    if name == "default":
        from guidance.backbones.default import DefaultModelError, check_default_model

        try:
            check_default_model()
        except DefaultModelError as error:
            return f"the default model is not installed ({_first_line(error)})"
    return None


def _placed(components: dict, device: str, dtype: torch.dtype) -> dict:
    """The tiny components (built in float32 on the CPU) moved to ``device`` and cast to ``dtype``."""
    if torch.device(device) == torch.device("cpu") and dtype == torch.float32:
        return components
    return {k: v.to(device=device, dtype=dtype) if isinstance(v, torch.nn.Module) else v
            for k, v in components.items()}


def _tiny_decoder(settings: Settings, scale: float, shift: float, latent_channels: int, width: float | None = 1.0,
                  factor: int = 8):
    """A random-weight TAESD-style decoder reading latents with the VAE's ``scale`` and ``shift``: TAESD3 / TAEF1's
    architecture at ``width`` (a fraction of its 64 channels) for a VAE of factor ``factor``, or the tests'
    4-channel one when ``width`` is None."""
    from tasks.random_models.common import taesd16, tiny_taesd

    dtype = getattr(torch, settings.dtype)
    if width is None:
        return _placed({"decoder": tiny_taesd(latent_channels, scale, shift)}, settings.device, dtype)["decoder"]
    return taesd16(scale, shift, width, settings.device, dtype, latent_channels=latent_channels,
                   spatial_factor=factor)


def open_backbone(name: str, settings: Settings) -> tuple[Any, Any, dict]:
    """(model, condition, description) of a backbone with the settings' decoder, compilation and tiling applied.
    The condition is encoded here, once: every cell reuses it (and the adapter caches it)."""
    from tasks.random_models import common as random_common, flux as random_flux, sd3 as random_sd3

    reason = unavailable(name, settings)
    if reason:
        raise CellSkipped(reason, "backbone")
    dtype, device, tiny = getattr(torch, settings.dtype), settings.device, settings.decoder == "tiny"
    if name in ("tiny-sd3", "sd3.5-medium"):
        from guidance.backbones.sd3 import SD3Model

        if name == "tiny-sd3":
            components = _placed(random_sd3.sd3_components(), device, dtype)
        else:
            components = random_sd3.sd35_medium_components(1.0, device, dtype)
        decoder = _tiny_decoder(settings, random_common.SD3_VAE_SCALE, random_common.SD3_VAE_SHIFT,
                                components["vae"].config.latent_channels, None if name == "tiny-sd3" else 1.0) \
            if tiny else None
        model = SD3Model.from_components(decoder=decoder, **components)
        cond = model.condition(random_common.PROMPT, random_common.NEGATIVE, 7.0)
        condition = "prompt and negative prompt encoded once; CFG w = 7 as one batched call"
    elif name in ("tiny-flux", "flux-dev"):
        from guidance.backbones.flux import FluxModel

        if name == "tiny-flux":
            components = _placed(random_flux.flux_components(dev=True), device, dtype)
        else:
            components = random_flux.flux_dev_components(1.0, device, dtype)
        decoder = _tiny_decoder(settings, random_common.FLUX_VAE_SCALE, random_common.FLUX_VAE_SHIFT,
                                components["vae"].config.latent_channels, None if name == "tiny-flux" else 1.0) \
            if tiny else None
        model = FluxModel.from_components(decoder=decoder, **components)
        cond = model.condition(random_common.PROMPT, guidance_scale=3.5)
        condition = "prompt encoded once; guidance embedding 3.5 (no CFG batch)"
    elif name in ("tiny-flux2-klein", "flux2-klein-4b", "flux2-klein-9b"):
        from guidance.backbones.flux2 import Flux2Model

        from tasks.random_models.flux2 import flux2_klein_components, tiny_flux2_components

        components = _placed(tiny_flux2_components("klein"), device, dtype) if name.startswith("tiny") \
            else flux2_klein_components(name.rsplit("-", 1)[1], 1.0, device, dtype)
        model = Flux2Model.from_components(is_distilled=True, **components)
        cond = model.condition(random_common.PROMPT)
        condition = "prompt encoded once; step-distilled, no CFG batch; the full FLUX.2 VAE decodes"
    elif name in ("tiny-qwen-image", "qwen-image"):
        from guidance.backbones.qwen_image import QwenImageModel

        from tasks.random_models.qwen_image import qwen_image_components, tiny_qwen_image_components

        components = _placed(tiny_qwen_image_components(), device, dtype) if name.startswith("tiny") \
            else qwen_image_components(1.0, device, dtype)
        model = QwenImageModel.from_components(**components)
        cond = model.condition(random_common.PROMPT, random_common.NEGATIVE, true_cfg_scale=4.0)
        condition = "prompt and negative prompt encoded once; true CFG 4 as one batched call; the full VAE decodes"
    elif name in ("tiny-pixel", "pnp-flow-unet"):
        from tasks.random_models.generic import pixel_flow_model, pnp_flow_unet, tiny_pixel_unet

        network = _placed({"unet": tiny_pixel_unet()}, device, dtype)["unet"] if name == "tiny-pixel" \
            else pnp_flow_unet(128, device, dtype)
        model = pixel_flow_model(network)
        cond = None
        condition = "no text (unconditional); pixel space, no decoder"
    elif name == "default":
        from guidance import load_model
        from guidance.backbones.autoencoder import LatentCodec, autoencoder_scale_shift

        model = load_model("default", device=device, dtype=dtype)
        if tiny:
            if getattr(model, "codec", None) is None:
                raise CellSkipped("the default model works in pixel space: no decoder to swap; use --decoder full",
                                  "backbone")
            vae = model.codec.autoencoder
            scale, shift = autoencoder_scale_shift(vae)
            narrowest = min(getattr(vae.config, "block_out_channels", None) or (64,))
            width = min(1.0, narrowest / 64)  # never wider than the VAE's own narrowest level
            try:
                decoder = _tiny_decoder(settings, scale, shift, model.codec.latent_channels, width,
                                        model.codec.spatial_factor)
                model.codec = LatentCodec(vae, decoder)
            except ValueError as error:
                raise CellSkipped(f"no TAESD-style decoder fits the default model ({_first_line(error)}); use "
                                  f"--decoder full", "backbone") from None
        cond = None
        condition = "no text (unconditional)"
    else:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    if settings.memory is not None:  # the profile places (offloads, quantises) the weights before compiling
        from guidance.memory_profiles import apply_profile

        model = apply_profile(model, settings.memory, device)
    compiled = _compile(model, settings.compile, settings.compile_backend)
    if settings.vae_tiling:
        if not hasattr(model, "enable_vae_tiling"):
            raise CellSkipped(f"{type(model).__name__} has no VAE tiling switch; drop --vae-tiling", "backbone")
        model.enable_vae_tiling()
    network = getattr(model, "transformer", None)
    network = getattr(model, "network", None) if network is None else network
    parameters = sum(p.numel() for p in network.parameters()) if isinstance(network, torch.nn.Module) else None
    codec = getattr(model, "codec", None)
    decoder_name = "none (pixel model)" if codec is None else (
        f"{type(codec.decoder).__name__} ({'tiny' if codec.decoder is not codec.autoencoder else 'full VAE'})")
    info = {"backbone": name, "adapter": type(model).__name__, "network_parameters": parameters,
            "dtype": settings.dtype, "device": str(device), "decoder": decoder_name, "compile": compiled,
            "vae_tiling": settings.vae_tiling, "memory": settings.memory, "condition": condition, "description": BACKBONES[name]}
    return model, cond, info


def _compile(model, mode: str, backend: str | None = None) -> str:
    """Apply ``--compile`` (with ``--compile-backend``, torch.compile's default inductor when None) and say what
    was compiled."""
    if mode == "off":
        return "off"
    options = {} if backend is None else {"backend": backend}
    suffix = "" if backend is None else f", backend {backend}"
    if hasattr(model, "compile"):
        model.compile(regional=mode == "regional", **options)
        return f"{mode} (torch.compile{suffix})"
    network = getattr(model, "network", None)
    if isinstance(network, torch.nn.Module):
        network.compile(**options)
        return f"full network (torch.compile{suffix}; no repeated blocks to compile one by one)"
    raise CellSkipped(f"{type(model).__name__} has nothing torch.compile can take; drop --compile", "backbone")
