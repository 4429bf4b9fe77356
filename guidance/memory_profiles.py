"""Memory profiles: named ways of placing a model's weights so that a run fits a smaller device, picked by card size.

    load_model("black-forest-labs/FLUX.1-dev", dtype="bf16", device="cuda", memory="low")
    load_model(pipe, device="cuda", memory="auto")      # the lightest profile the planner fits in the free memory

:data:`PROFILES` lists them lightest first (the least saving and the fastest first); :func:`apply_profile` applies
one to a loaded model. The planner (:mod:`guidance.memory_estimate`) estimates the peak of a run under each, before
any weight loads. Results: offloading gives the "none" profile's numbers, and gradient checkpointing too up to
float32 rounding of the recomputed graph (on the CPU: identical without gradients through the network, within 1e-5
with them); VAE tiling changes a decoded image only near the tile seams of images larger than a tile (512 pixels);
the quantised profiles change the transformer's weights, within the tolerance their tests state (1e-2 on a decoded
tiny image).

Offloading moves components between the CPU and an accelerator. On a machine without one, ``device="cpu"`` runs the
same machinery on the CPU itself: every profile works there, and only the quantised ones save memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AUTO", "BLOCKS", "Int8Linear", "MemoryProfile", "PROFILES", "TILE_SIZE", "apply_profile", "check_profile",
           "profile_unavailable", "quantize_int8", "quantizable_linears"]

#: the name that asks the planner for the lightest profile that fits
AUTO = "auto"
#: the side in pixels of the VAE tiles of the profiles that tile (the autoencoder's own tile when smaller)
TILE_SIZE = 512


@dataclass(frozen=True)
class MemoryProfile:
    """One way of placing a model's weights.

    Attributes:
        name: what ``load_model(memory=...)`` and ``--memory`` take.
        description: one line for listings.
        targets: the cards it is meant for, by family (the planner's figures at 1024², bf16).
        placement: ``"device"`` (every component stays on the device), ``"text_swap"`` (the text encoders wait
            on the CPU and visit the device only to encode a new prompt, the transformer stepping out meanwhile),
            ``"model_offload"`` (diffusers' model CPU offload: each component on the device only while it runs) or
            ``"sequential_offload"`` (diffusers' sequential offload: each submodule only while it runs).
        quantize: None, ``"int8"`` (weight-only, one scale per output channel, :class:`Int8Linear`) or ``"nf4"``
            (bitsandbytes 4-bit NormalFloat, CUDA only) for the linear layers of the transformer's blocks.
        vae_slicing: decode and encode a batch one image at a time, on tiles of :data:`TILE_SIZE` pixels.
        checkpointing: gradient checkpointing of the transformer (recomputes activations in backward passes; only
            methods that backpropagate through the network notice it).
    """

    name: str
    description: str
    targets: str
    placement: str = "device"
    quantize: str | None = None
    vae_slicing: bool = False
    checkpointing: bool = False


#: Every profile, lightest first. The targets are the planner's peaks at 1024², bf16, for unguided sampling and for
#: guidance whose pixel losses go through the tiny decoder (``flowsteer memory --table``): a full-VAE decoder graph
#: adds about 12 GiB (a card fits when the peak is at most 90 % of it).
PROFILES: dict[str, MemoryProfile] = {p.name: p for p in (
    MemoryProfile("none", "everything on the device (the default)",
                  "24 GB: SD3.5-medium, FLUX.2 klein 4B; 48 GB: SD3.5-large, FLUX.1-dev, klein 9B; 80 GB: Qwen-Image"),
    MemoryProfile("balanced", "text encoders on the CPU except while encoding a new prompt; VAE slicing and "
                              "512-pixel tiles",
                  "12 GB: SD3.5-medium, FLUX.2 klein 4B; 24 GB: SD3.5-large, klein 9B; 48 GB: FLUX.1-dev, Qwen-Image",
                  placement="text_swap", vae_slicing=True),
    MemoryProfile("low", "model CPU offload (each component on the device only while it runs), VAE slicing and "
                         "tiling, gradient checkpointing",
                  "as balanced; the final decode also runs with the transformer on the CPU",
                  placement="model_offload", vae_slicing=True, checkpointing=True),
    MemoryProfile("8bit", "low, with the transformer blocks' linear weights in int8",
                  "12 GB: SD3.5-large; 16 GB: FLUX.1-dev; 24 GB: FLUX.2 klein 9B, Qwen-Image",
                  placement="model_offload", quantize="int8", vae_slicing=True, checkpointing=True),
    MemoryProfile("4bit", "low, with the transformer blocks' linear weights in NF4 (bitsandbytes, CUDA only)",
                  "12 GB: FLUX.1-dev; 24 GB: Qwen-Image",
                  placement="model_offload", quantize="nf4", vae_slicing=True, checkpointing=True),
    MemoryProfile("minimal", "sequential CPU offload (each layer on the device only while it runs) with int8 "
                             "blocks: the least memory, the slowest", "under 12 GB for every family",
                  placement="sequential_offload", quantize="int8", vae_slicing=True, checkpointing=True),
)}


def check_profile(name, allow_auto: bool = True) -> str:
    """``name`` as a profile name (``"auto"`` too where ``allow_auto``); otherwise a ValueError listing them."""
    names = list(PROFILES) + ([AUTO] if allow_auto else [])
    if not isinstance(name, str) or name.strip().lower() not in names:
        raise ValueError(f"memory profile {name!r} is not one of {', '.join(names)} (flowsteer memory --help "
                         f"describes them)")
    return name.strip().lower()


def profile_unavailable(name: str, device: torch.device | str | None = None) -> str | None:
    """Why the profile ``name`` cannot run on ``device`` here (None when it can): NF4 needs bitsandbytes and CUDA."""
    if PROFILES[name].quantize != "nf4":
        return None
    device = torch.device(device) if device is not None else None
    from importlib.util import find_spec

    on_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
    if find_spec("bitsandbytes") is None or not on_cuda:
        return f"the memory profile {name!r} needs bitsandbytes and a CUDA GPU; use '8bit' or 'minimal' instead"
    return None


class Int8Linear(torch.nn.Module):
    """A linear layer whose weight is stored in int8 with one scale per output channel (symmetric: the row's
    largest magnitude maps to 127) and dequantized to the input's dtype at each call: weight-only quantisation,
    a quarter of float32's bytes and half of bfloat16's. The int8 weight and its scales are frozen parameters, so
    that offloading moves them as it moves any weight."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        scale = weight.float().abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
        quantized = torch.round(weight.float() / scale).clamp_(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_int8 = torch.nn.Parameter(quantized, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale.to(weight.dtype), requires_grad=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


#: attributes of a denoiser that hold its repeated blocks (the layers quantisation replaces)
BLOCKS = ("transformer_blocks", "single_transformer_blocks", "layers", "blocks", "down_blocks", "mid_block",
          "up_blocks")


def quantizable_linears(network: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """(parent, attribute, layer) of every ``nn.Linear`` inside the network's repeated blocks (:data:`BLOCKS`); the
    embedders and the output projection keep their precision."""
    found = []
    for attribute in BLOCKS:
        blocks = getattr(network, attribute, None)
        if not isinstance(blocks, torch.nn.Module):
            continue
        for parent in blocks.modules():
            for name, child in parent.named_children():
                if type(child) is torch.nn.Linear:
                    found.append((parent, name, child))
    return found


def quantize_int8(network: torch.nn.Module) -> int:
    """Replace the linear layers of the network's blocks by :class:`Int8Linear` in place; returns how many."""
    layers = quantizable_linears(network)
    for parent, name, layer in layers:
        setattr(parent, name, Int8Linear(layer))
    return len(layers)


def _quantize_nf4(network: torch.nn.Module, dtype: torch.dtype) -> int:
    """Replace the linear layers of the network's blocks by bitsandbytes' ``Linear4bit`` (NF4); the weights are
    quantised when they first move to the GPU."""
    import bitsandbytes as bnb

    layers = quantizable_linears(network)
    for parent, name, layer in layers:
        replacement = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                        compute_dtype=dtype, quant_type="nf4", device=layer.weight.device)
        replacement.weight = bnb.nn.Params4bit(layer.weight.detach(), requires_grad=False, quant_type="nf4")
        if layer.bias is not None:
            replacement.bias = torch.nn.Parameter(layer.bias.detach(), requires_grad=False)
        setattr(parent, name, replacement)
    return len(layers)


def _network(model) -> torch.nn.Module | None:
    """The model's denoiser (``transformer``, else ``network`` or ``unet``)."""
    for name in ("transformer", "network", "unet"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def _text_encoders(model) -> list[torch.nn.Module]:
    components = getattr(getattr(model, "pipeline", None), "components", None) or {}
    return [module for name, module in components.items()
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)]


def _swap_text_encoders(model, device: torch.device) -> None:
    """The "text_swap" placement: the VAE (and a separate decoder / encoder) move to ``device`` for good; the text
    encoders and the transformer wait on the CPU and each moves to ``device`` when it runs, sending the one before
    it in the ring text encoders -> transformer -> first text encoder back to the CPU (accelerate's offload hooks).
    Sampling calls only the transformer, which then stays; a new prompt brings the encoders back one by one."""
    from accelerate import cpu_offload_with_hook

    ring = [*_text_encoders(model), model.transformer]
    for module in model.pipeline.components.values():
        if isinstance(module, torch.nn.Module) and not any(module is m for m in ring):
            module.to(device)
    if model.codec is not None:
        model.codec.to(device=device)
    hooks = []
    for module in ring:
        hooks.append(cpu_offload_with_hook(module, device, prev_module_hook=hooks[-1] if hooks else None)[1])
    if len(hooks) > 1:
        hooks[0].hook.prev_module_hook = hooks[-1]


def _refuse(name: str, model, what: str) -> ValueError:
    return ValueError(f"the memory profile {name!r} {what}, which {type(model).__name__} does not have; use "
                      f"memory='none' or 'balanced'")


def apply_profile(model, name: str, device: torch.device | str | None = None):
    """Apply the profile ``name`` (a key of :data:`PROFILES`) to a loaded flow model, in place, and return it; the
    model remembers it as ``model.memory_profile``. ``device`` is where the model runs (default: CUDA when available,
    else the CPU); "none" moves the model there, the offloading profiles keep the weights on the CPU and move each
    part there while it runs. Cached text conditions are dropped where components move."""
    from .loading.devices import check_device

    name = check_profile(name, allow_auto=False)
    profile = PROFILES[name]
    device = check_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:  # the hooks compare devices, and weights sit on cuda:N
        device = torch.device("cuda", torch.cuda.current_device())
    reason = profile_unavailable(name, device)
    if reason:
        raise ValueError(reason)
    network = _network(model)
    pipeline = getattr(model, "pipeline", None)
    if profile.placement in ("model_offload", "sequential_offload") and pipeline is None:
        raise _refuse(name, model, "offloads through the model's diffusers pipeline")
    if profile.quantize and (network is None or not quantizable_linears(network)):
        raise _refuse(name, model, "quantises the linear layers of the transformer's blocks")
    codec = getattr(model, "codec", None)
    if profile.quantize == "int8":
        quantize_int8(network)
    elif profile.quantize == "nf4":
        _quantize_nf4(network, getattr(model, "dtype", torch.bfloat16))
    if profile.vae_slicing and codec is not None:
        model.enable_vae_slicing()
        own = [getattr(m, "tile_sample_min_size", None) or getattr(m, "tile_sample_min_height", None)
               for m in codec.modules()]
        own = [size[0] if isinstance(size, (tuple, list)) else size for size in own if size]
        # at least 8 latent pixels a tile, so that the overlap covers one latent pixel (a tiny test autoencoder's own
        # tile can be smaller)
        codec.enable_tiling(max(8 * int(getattr(codec, "spatial_factor", 8)), min([TILE_SIZE, *own])))
    if profile.checkpointing and getattr(network, "_supports_gradient_checkpointing", False):
        network.enable_gradient_checkpointing()
    if profile.placement == "device" or (profile.placement == "text_swap" and pipeline is None):
        model.to(device)
    elif profile.placement == "text_swap":
        _swap_text_encoders(model, device)
        model._conditions.clear()
    elif profile.placement == "model_offload" or device.type == "cpu":
        # accelerate's sequential offload cannot load weights onto a CPU execution device (its tied-weight map
        # hands back plain tensors there); on a CPU both offloads keep every weight in the same memory anyway
        model.enable_model_cpu_offload(device=str(device))
    else:
        model.enable_sequential_cpu_offload(device=str(device))
    if profile.placement != "device" and codec is not None:
        for module in codec.modules():  # a separate decoder / encoder (TAESD) is not part of the pipeline
            if pipeline is None or not any(module is m for m in pipeline.components.values()):
                module.to(device)
    model.memory_profile = name
    return model
