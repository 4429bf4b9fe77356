"""The memory planner: a run's peak memory by component, from the model's configs, before any weight loads.

    from guidance.memory_estimate import plan
    p = plan("stabilityai/stable-diffusion-3.5-medium", "dps", 1024, 1024, profile="low", dtype="bf16")
    print(p.table())          # weights, activations and method extras in GiB, the peak and the phase it falls in
    p.fits(24)                # whether it fits a 24 GB card

**Weights** are counted, not guessed: for a hub id or folder each component's ``config.json`` (from the local cache
when offline) builds the module on the ``meta`` device, which allocates nothing; a loaded model or pipeline is
counted as it is. Bytes follow the run's dtype, and a quantising profile (:mod:`guidance.memory_profiles`) stores the
linear layers of the transformer's blocks in 1 (int8) or about 0.56 (NF4) bytes per weight.

**Activations** follow measured per-family constants (:data:`FAMILIES`, :data:`AUTOENCODERS`): the peak of one
network call, the graph a backward pass through the network keeps (whole, or with gradient checkpointing), and the
autoencoder's decode, decode graph and encode, in bytes per image token (or pixel) and channel, fitted to the exact
tensor peak (:class:`guidance.memory.TensorPeak`) of random-weight miniatures of the released architectures on the
CPU (``flowsteer memory --check`` measures them again beside the estimate).

**Methods** (:data:`METHODS`) add what they hold: a graph through the network (DPS, PSLD, OT-ODE, D-Flow, ICTM),
a graph through the decoder for pixel-space losses (FlowChef, FLAIR, FlowDPS, PnP-Flow, DPS), a population run as
one batch (particles, best-of-N). The **profile** decides which weights are on the device in each phase (encoding
the prompt, sampling, the final decode): the peak is the largest phase. On a CPU device every weight stays in the
same memory, so only quantisation lowers a CPU estimate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

import torch

from .memory_profiles import BLOCKS, PROFILES, TILE_SIZE, check_profile, profile_unavailable

__all__ = ["AUTOENCODERS", "CARDS_GB", "FAMILIES", "METHODS", "ComponentSpec", "FamilyActivations", "MethodNeeds",
           "ModelSpec", "Plan", "lightest_fitting", "model_spec", "plan", "spec_from_configs", "with_decoder"]

GIB = 2**30
#: card sizes (GB, as sold) the planner reports fits for
CARDS_GB = (12, 16, 24, 48, 80)
#: the share of a device's memory a run may plan to use (the rest: the CUDA context, the allocator's slack)
HEADROOM = 0.9
#: float32 tensors of the latent size a sampling loop holds at once (state, velocity, clean estimate, update)
LATENT_COPIES = 4
#: float32 tensors of the image size a run holds at once (decoded image, clamped copy, output)
IMAGE_COPIES = 3
#: bytes per weight of the int8 and NF4 linear layers (NF4: 4 bits plus a float32 absolute maximum per 64 weights)
QUANTIZED_BYTES = {"int8": 1.0, "nf4": 0.5 + 4 / 64}


@dataclass(frozen=True)
class FamilyActivations:
    """Activation constants of a denoiser family, in bytes per (image token or text token) x channel x byte of the
    dtype x image of the network's batch (CFG doubles it); channels are the transformer's width (heads x head
    width) and, for UNets, the first level's channels per latent pixel.

    Attributes:
        forward: (per image token, per text token): the peak of one call without autograd.
        graph: the same per block for the graph a backward pass keeps (no checkpointing).
        checkpointed: per block with gradient checkpointing (the block inputs kept); one block's graph comes on top.
        text_tokens: the text tokens the transformer attends to (the pipelines pad to them).
        cfg: whether the family's default guidance runs the network on a CFG batch of two.
        measured: False for families whose constants are the mean of the measured transformers.
    """

    forward: tuple[float, float]
    graph: tuple[float, float]
    checkpointed: tuple[float, float]
    text_tokens: int = 0
    cfg: bool = False
    measured: bool = True


_FLUX = FamilyActivations((15.5, 16.8), (22.6, 22.7), (1.34, 1.46), 512, False)
_MEAN = FamilyActivations((16.6, 18.0), (26.9, 25.1), (2.0, 2.1), 256, True, measured=False)
#: Measured constants per family (float32 on the CPU; see the module docstring).
FAMILIES: dict[str, FamilyActivations] = {
    "sd3": FamilyActivations((11.9, 12.6), (31.1, 23.3), (2.37, 2.24), 333, True),
    "flux": _FLUX,
    "chroma": FamilyActivations(_FLUX.forward, _FLUX.graph, _FLUX.checkpointed, 512, True),  # FLUX.1's blocks
    "flux2": FamilyActivations((21.8, 25.4), (28.3, 28.7), (2.99, 3.33), 512, False),
    "qwen_image": FamilyActivations((17.1, 17.1), (25.7, 25.7), (1.43, 1.43), 128, True),  # unpadded: a long prompt
}
#: UNets (the generic adapter's networks): the forward peak per latent pixel x first-level channel (x byte x image),
#: the graphs per latent pixel x level-weighted channels (sum over levels of channels / 4^level x (resnets per level
#: + 1)), measured on flowsteer's default model, the tiny pixel UNet and PnP-Flow's UNet
UNET = FamilyActivations((15.5, 0.0), (16.5, 0.0), (9.0, 0.0))
#: 16-bit activations hold some float32 tensors (norm statistics, attention's log-sum-exp): the half-precision
#: graphs measured 1.2x half of the float32 ones (forward passes: 1x)
HALF_GRAPH_FACTOR = 1.2


@dataclass(frozen=True)
class AutoencoderActivations:
    """Activation constants of an autoencoder class, in bytes per image pixel x first-level channel x byte of the
    dtype: (decode peak, decode graph, encode peak); the graph's also per level-weighted depth (the sum over
    levels of channels / 4^level x the decoder's resnets per level, over the first level's channels: 5.4 for the
    SD3 / FLUX VAE)."""

    decode: float
    decode_graph: float
    encode: float


#: Measured constants per autoencoder class (the fallback: AutoencoderKL's).
AUTOENCODERS: dict[str, AutoencoderActivations] = {
    "AutoencoderKL": AutoencoderActivations(6.0, 8.44, 5.0),
    "AutoencoderKLFlux2": AutoencoderActivations(6.0, 8.44, 5.0),
    "AutoencoderKLQwenImage": AutoencoderActivations(18.1, 17.0, 10.3),
    "AutoencoderTiny": AutoencoderActivations(3.0, 11.0, 3.4),
}


@dataclass(frozen=True)
class MethodNeeds:
    """What a method holds beside one network call.

    Attributes:
        network_graph: None, ``"graph"`` (one backward pass through the network per step; checkpointed when the
            method's ``gradient_checkpointing`` option or the profile says so), ``"second_order"`` (a gradient of a
            vector-Jacobian product: three graphs) or ``"trajectory"`` (D-Flow: the midpoint rule's two calls per
            step under per-step checkpointing, the states of every step, L-BFGS's history).
        decoder_graph: a pixel-space objective's gradient through the decoder (latent models).
        encoder: None, ``"forward"`` (the measurement or source image is encoded once) or ``"graph"`` (PSLD's
            gluing term differentiates through the encoder).
        population: the option that multiplies the batch the network runs on (particles, candidates).
        checkpoint_option: the method's own switch of gradient checkpointing (default on).
        scores: the objective scores the whole population's decoded images at once (no gradient).
    """

    network_graph: str | None = None
    decoder_graph: bool = False
    encoder: str | None = None
    population: str | None = None
    checkpoint_option: bool = False
    scores: bool = False


#: Every registered image method's needs (read from each method's docstring; ``straight_through`` guides simplex
#: flows over sequences, which the planner does not cover).
METHODS: dict[str, MethodNeeds] = {
    "unguided": MethodNeeds(),
    "pseudo_inverse": MethodNeeds(),
    "flowchef": MethodNeeds(decoder_graph=True),
    "flowchef_edit": MethodNeeds(encoder="forward"),
    "flair": MethodNeeds(decoder_graph=True, encoder="forward"),
    "dps": MethodNeeds("graph", True, checkpoint_option=True),
    "pnp_flow": MethodNeeds(decoder_graph=True),
    "best_of_n": MethodNeeds(population="candidates", scores=True),
    "particles": MethodNeeds(population="particles", scores=True),
    "flowdps": MethodNeeds(decoder_graph=True, encoder="forward"),
    "psld": MethodNeeds("graph", True, "graph", checkpoint_option=True),
    "ot_ode": MethodNeeds("graph"),
    "d_flow": MethodNeeds("trajectory", True, "forward"),
    "ictm": MethodNeeds("second_order"),
    "flower": MethodNeeds(),
    "flowedit": MethodNeeds(encoder="forward"),
    "inversion_edit": MethodNeeds(decoder_graph=True, encoder="forward"),
    "rf_inversion": MethodNeeds(encoder="forward"),
    "rf_solver_edit": MethodNeeds(encoder="forward"),
}
#: L-BFGS history pairs D-Flow keeps (two latent-sized vectors each)
LBFGS_HISTORY = 100


# -- what a model is made of ---------------------------------------------------------------------------------------
@dataclass
class ComponentSpec:
    """One component's size: ``parameters`` weights (floating parameters and buffers), of which ``linear`` sit in
    the linear layers a quantising profile replaces (``linear_rows`` output rows, one scale each); its largest leaf
    module and largest repeated block (what sequential offloading holds at once); ``width``: a text encoder's
    hidden width."""

    role: str
    class_name: str
    parameters: int
    linear: int = 0
    linear_rows: int = 0
    largest_leaf: int = 0
    largest_block: int = 0
    width: int = 0
    quantized: str | None = None


@dataclass
class ModelSpec:
    """What the planner reads from a model: its family, components (``{name: ComponentSpec}``), the denoiser's
    width and blocks, the pixels per image token side, the autoencoder's first-level channels and class, and the
    family's default size."""

    name: str
    family: str
    components: dict[str, ComponentSpec]
    width: int
    blocks: float
    token_side: int
    latent_channels: int
    latent_factor: int
    vae_channels: int = 0
    vae_class: str = ""
    decoder_channels: int = 0
    decoder_depth: float = 1.0
    decoder_peak: float = 1.0
    decoder_class: str = ""
    default_size: int | None = None
    text_tokens: int = 0
    cfg: bool = False
    unet: bool = False
    profile: str | None = None
    measured_gib_per_megapixel: float | None = None

    @property
    def pipeline(self) -> bool:
        """Whether the model is a diffusers pipeline (text encoders: the offloading profiles go through it)."""
        return any(c.role == "text_encoder" for c in self.components.values())

    def refusal(self, profile: str) -> str | None:
        """Why ``profile`` does not apply to this model (None when it does): offloading goes through a pipeline,
        quantisation needs a transformer's blocks (see :func:`guidance.memory_profiles.apply_profile`)."""
        chosen = PROFILES[profile]
        if chosen.placement in ("model_offload", "sequential_offload") and not self.pipeline:
            return (f"the memory profile {profile!r} offloads through a diffusers pipeline, which {self.name} is "
                    f"not; use 'none' or 'balanced'")
        network = next(c for c in self.components.values() if c.role in ("transformer", "unet"))
        if chosen.quantize and not network.linear:
            return (f"the memory profile {profile!r} quantises a transformer's blocks, which {self.name} has not; "
                    f"use 'none', 'balanced' or 'low'")
        return None


def _elements(module: torch.nn.Module, recurse: bool = True) -> int:
    """Weights of a module as float elements: floating parameters and buffers (each tensor once), the int8 weights
    of :class:`~guidance.memory_profiles.Int8Linear`, two per stored byte of a bitsandbytes 4-bit weight."""
    total, seen = 0, set()
    for owner in (module.modules() if recurse else (module,)):
        int8 = type(owner).__name__ == "Int8Linear"
        for t in [*owner._parameters.values(), *owner._buffers.values()]:
            if t is None or id(t) in seen:  # tied weights (T5's embeddings, a tied LM head) are stored once
                continue
            seen.add(id(t))
            if type(t).__name__ == "Params4bit" and not t.is_floating_point():
                total += 2 * t.numel()
            elif t.is_floating_point() or (int8 and t.dtype == torch.int8):
                total += t.numel()
    return total


def _count(module: torch.nn.Module, role: str) -> ComponentSpec:
    """A module's ComponentSpec (meta or real tensors); quantised layers count as the float layers they replace."""
    from .memory_profiles import quantizable_linears

    spec = ComponentSpec(role, type(module).__name__, _elements(module))
    if role in ("transformer", "unet"):
        plain = [layer for _, _, layer in quantizable_linears(module)]
        quantized = [m for m in module.modules() if type(m).__name__ in ("Int8Linear", "Linear4bit")]
        spec.linear = sum(m.in_features * m.out_features for m in plain + quantized)
        spec.linear_rows = sum(m.out_features for m in plain + quantized)
        if quantized:
            int8 = [m for m in quantized if type(m).__name__ == "Int8Linear"]
            spec.quantized = "int8" if int8 else "nf4"
            spec.parameters -= sum(m.out_features for m in int8)  # the scales: stored bytes, not float weights
        blocks = []
        for attribute in BLOCKS:
            found = getattr(module, attribute, None)
            blocks += list(found) if isinstance(found, torch.nn.ModuleList) else \
                [found] if isinstance(found, torch.nn.Module) else []
        spec.largest_block = max((_elements(b) for b in blocks), default=spec.parameters)
    spec.largest_leaf = max((_elements(m, recurse=False) for m in module.modules()), default=0)
    config = getattr(module, "config", None)
    spec.width = int(_first(config, "hidden_size", "d_model", "text_config.hidden_size") or 0)
    return spec


def _first(config, *keys):
    """The first of ``keys`` (dotted: nested) that ``config`` (a dict or a config object) has, else None."""
    for key in keys:
        value = config
        for part in key.split("."):
            if value is None:
                break
            value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
        if value is not None:
            return value
    return None


def _latent_factor(config) -> int:
    """An autoencoder's downsampling factor from its config (AutoencoderKL / Tiny / Flux2: 2^(levels - 1); DC-AE:
    the encoder's levels; the Qwen-Image 3D VAE: 2^len(temporal flags))."""
    for key in ("block_out_channels", "encoder_block_out_channels"):
        levels = _first(config, key)
        if levels:
            return 2 ** (len(levels) - 1)
    flags = _first(config, "temperal_downsample")
    return 2 ** len(flags) if flags else 8


def _depth(config) -> float:
    """An autoencoder decoder's level-weighted depth (see :class:`AutoencoderActivations`); 1 for the tiny
    autoencoders, whose constants are per first-level channel."""
    levels = _first(config, "block_out_channels")
    resnets = _first(config, "layers_per_block", "num_res_blocks")
    if not levels and _first(config, "base_dim"):
        levels = [int(_first(config, "base_dim")) * m for m in (_first(config, "dim_mult") or (1, 2, 4, 4))]
    if not levels or resnets is None:
        return 1.0
    return sum(int(c) / 4**level for level, c in enumerate(levels)) * (int(resnets) + 1) / int(levels[0])


def _first_channels(config) -> int:
    """An autoencoder's first-level width (the full-resolution channels its activations scale with)."""
    for key in ("block_out_channels", "decoder_block_out_channels", "encoder_block_out_channels"):
        levels = _first(config, key)
        if levels:
            return int(levels[0])
    return int(_first(config, "base_dim") or 128)


def _decode_peak(config) -> float:
    """An AutoencoderKL-style decoder's full-resolution peak relative to the SD3 / FLUX VAE's, for which the decode
    constants were measured: its last up block holds the second level's channels and the first level's at full
    resolution, (c₁ + c₀) / (3 c₀), 1 for channels (128, 256, ...); 1 where the config names no levels."""
    levels = _first(config, "block_out_channels") or _first(config, "decoder_block_out_channels")
    if not levels or len(levels) < 2:
        return 1.0
    return (int(levels[1]) + int(levels[0])) / (3 * int(levels[0]))


def _network_shape(config) -> tuple[int, float, bool]:
    """(width, blocks, is_unet) of a denoiser config; a UNet's "blocks" are its level-weighted channels over its
    first level's (see :data:`UNET`)."""
    levels = _first(config, "block_out_channels")
    if levels is not None:
        resnets = int(_first(config, "layers_per_block") or 1) + 1
        weighted = sum(int(c) / 4**level for level, c in enumerate(levels)) * resnets
        return int(levels[0]), weighted / int(levels[0]), True
    heads, head = _first(config, "num_attention_heads", "n_heads"), _first(config, "attention_head_dim")
    width = int(heads) * int(head) if heads and head else int(_first(config, "hidden_size", "dim", "inner_dim") or 0)
    blocks = int(_first(config, "num_layers", "n_layers") or 1) + int(_first(config, "num_single_layers") or 0)
    return width, blocks, False


def _token_side(config, factor: int, latent_channels: int) -> int:
    """Pixels per side of one image token: the autoencoder's factor times the transformer's patch (a 2x2 packing
    where the transformer takes four latents' channels)."""
    patch = _first(config, "patch_size", "all_patch_size")
    patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch or 1)
    packed = 2 if int(_first(config, "in_channels") or 0) == 4 * latent_channels else 1
    return factor * max(patch, packed)


def spec_from_configs(name: str, family: str, modules: dict[str, tuple[str, torch.nn.Module]],
                      default_size: int | None = None, cfg: bool | None = None) -> ModelSpec:
    """A ModelSpec from built modules (meta or real): ``modules`` maps component names to (role, module), roles
    ``"transformer"``, ``"unet"``, ``"text_encoder"``, ``"vae"``, ``"decoder"``."""
    components = {key: _count(module, role) for key, (role, module) in modules.items()}
    configs = {key: getattr(module, "config", {}) for key, (_, module) in modules.items()}
    network = next(key for key, (role, _) in modules.items() if role in ("transformer", "unet"))
    vae = next((key for key, (role, _) in modules.items() if role == "vae"), None)
    decoder = next((key for key, (role, _) in modules.items() if role == "decoder"), vae)
    width, blocks, unet = _network_shape(configs[network])
    if vae is not None:
        factor = _latent_factor(configs[vae])
        channels = int(_first(configs[vae], "latent_channels", "z_dim") or 4)
    else:
        factor, channels = 1, int(_first(configs[network], "in_channels") or 3)
    constants = UNET if unet else FAMILIES.get(family, _MEAN)
    return ModelSpec(
        name=name, family=family, components=components, width=width, blocks=blocks,
        token_side=factor if unet else _token_side(configs[network], factor, channels),
        latent_channels=channels, latent_factor=factor,
        vae_channels=_first_channels(configs[vae]) if vae else 0, vae_class=components[vae].class_name if vae else "",
        decoder_channels=_first_channels(configs[decoder]) if decoder else 0,
        decoder_depth=_depth(configs[decoder]) if decoder else 1.0,
        decoder_peak=_decode_peak(configs[decoder]) if decoder else 1.0,
        decoder_class=components[decoder].class_name if decoder else "", default_size=default_size,
        text_tokens=constants.text_tokens if any(c.role == "text_encoder" for c in components.values()) else 0,
        cfg=constants.cfg if cfg is None else bool(cfg), unet=unet)


def _role(key: str) -> str | None:
    """The planner's role of a pipeline component (None: not counted, e.g. the scheduler and tokenizers)."""
    if key in ("transformer", "unet", "vae"):
        return key
    return "text_encoder" if key.startswith("text_encoder") else None


def _config_modules(source: str, index: dict, local_files_only: bool) -> dict[str, tuple[str, torch.nn.Module]]:
    """Each component of a folder or hub repository built on the meta device from its config.json."""
    from .loading.sources import hub_errors, hub_offline, not_found

    offline = local_files_only or hub_offline()
    built = {}
    for key, entry in index.items():
        role = _role(key)
        if role is None or not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[0] is None:
            continue
        library, class_name = entry
        if library not in ("diffusers", "transformers"):
            raise ValueError(f"component {key!r} of {source!r} is {library}.{class_name}; the planner reads "
                             f"diffusers and transformers components only")
        cls = getattr(import_module(library), class_name)
        try:
            if library == "diffusers":
                config = cls.load_config(source, subfolder=key, local_files_only=offline)
                with torch.device("meta"):
                    module = cls.from_config(config)
            else:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(source, subfolder=key, local_files_only=offline)
                with torch.device("meta"):
                    module = cls._from_config(config)
        except hub_errors() as error:
            raise not_found(source, error, offline) from None
        built[key] = (role, module)
    return built


def _loaded_modules(model) -> dict[str, tuple[str, torch.nn.Module]]:
    """The components of a loaded flow model (its pipeline's, or its network and autoencoder) and a separate
    decoder."""
    pipeline = getattr(model, "pipeline", None)
    modules = {}
    if pipeline is not None:
        for key, module in pipeline.components.items():
            if isinstance(module, torch.nn.Module) and _role(key):
                modules[key] = (_role(key), module)
    else:
        network = getattr(model, "network", None)
        if not isinstance(network, torch.nn.Module):
            raise ValueError(f"the planner reads diffusers pipelines and networks; {type(model).__name__} has "
                             f"neither")
        unet = _first(getattr(network, "config", {}), "block_out_channels") is not None
        modules["unet" if unet else "transformer"] = ("unet" if unet else "transformer", network)
        codec = getattr(model, "codec", None)
        if codec is not None:
            modules["vae"] = ("vae", codec.autoencoder)
    codec = getattr(model, "codec", None)
    if codec is not None and codec.decoder is not codec.autoencoder:
        modules["decoder"] = ("decoder", codec.decoder)
    return modules


def model_spec(source: Any, *, local_files_only: bool = False, cfg: bool | None = None) -> ModelSpec:
    """The ModelSpec of a hub id or local folder (configs only: nothing is downloaded but the configs, nothing is
    allocated), a diffusers pipeline object, a loaded flow model, or a ModelSpec (returned as it is)."""
    from .backbones.base import FlowModel
    from .backbones.registry import family_for_pipeline, get_backbone

    if isinstance(source, ModelSpec):
        return source
    if isinstance(source, FlowModel):
        pipeline = getattr(source, "pipeline", None)
        family = family_for_pipeline(pipeline) if pipeline is not None else None
        size = getattr(source, "default_size", None)
        spec = spec_from_configs(str(getattr(source, "name_or_path", None) or type(source).__name__),
                                 family.name if family else "generic", _loaded_modules(source),
                                 int(size[0]) if size else None, cfg)
        spec.token_side = int(getattr(source, "size_multiple", None) or spec.token_side)
        spec.profile = getattr(source, "memory_profile", None)
        spec.measured_gib_per_megapixel = getattr(source, "memory_gib_per_megapixel", None)
        return spec
    if type(source).__name__.endswith("Pipeline") and hasattr(source, "components"):
        family = family_for_pipeline(source)
        modules = {key: (_role(key), m) for key, m in source.components.items()
                   if isinstance(m, torch.nn.Module) and _role(key)}
        name = family.name if family else "generic"
        return spec_from_configs(type(source).__name__, name, modules, family.default_size if family else None, cfg)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"the planner takes a hub id, a local folder, a diffusers pipeline or a flow model, not "
                         f"{type(source).__name__}")
    from .loading.sources import classify_index, read_index

    source = os.fspath(source)
    if source == "default":
        from .backbones.default import check_default_model

        source = str(check_default_model(verify=False))
    folder = Path(source).expanduser()
    index = read_index(str(folder) if folder.is_dir() else source, local_files_only)
    family, _ = classify_index(index)
    default = get_backbone(family).default_size if family != "generic" else None
    if cfg is None and family == "flux2":  # klein base runs CFG; dev and the step-distilled klein do not
        cfg = "Klein" in str(index.get("_class_name")) and not index.get("is_distilled", False)
    modules = _config_modules(str(folder) if folder.is_dir() else source, index, local_files_only)
    if family == "generic":  # GenericFlowModel's default: its settings' sample_size, else the network's, in pixels
        network = next(m for role, m in modules.values() if role in ("transformer", "unet"))
        side = (index.get("flowsteer") or {}).get("sample_size")
        if side is None and _first(network.config, "sample_size"):
            side = _first(network.config, "sample_size")
            side = int(side[0] if isinstance(side, (list, tuple)) else side) * (
                _latent_factor(modules["vae"][1].config) if "vae" in modules else 1)
        default = int(side) if side else None
    spec = spec_from_configs(source, family, modules, default, cfg)
    spec.measured_gib_per_megapixel = (index.get("flowsteer") or {}).get("memory_gib_per_megapixel")
    return spec


def with_decoder(spec: ModelSpec, decoder: Any, local_files_only: bool = False) -> ModelSpec:
    """A copy of ``spec`` whose pixel-space losses and final decode go through ``decoder`` (a module, meta or real,
    or a hub id or folder of a diffusers autoencoder, e.g. "madebyollin/taesd3"), as ``load_model(decoder=...)``
    swaps it in."""
    from dataclasses import replace

    if isinstance(decoder, (str, os.PathLike)):
        import diffusers

        from .loading.sources import hub_errors, hub_offline, not_found

        offline = local_files_only or hub_offline()
        try:
            config = diffusers.AutoencoderTiny.load_config(os.fspath(decoder), local_files_only=offline)
        except hub_errors() as error:
            raise not_found(os.fspath(decoder), error, offline) from None
        cls = getattr(diffusers, str(config.get("_class_name", "AutoencoderTiny")), diffusers.AutoencoderTiny)
        with torch.device("meta"):
            decoder = cls.from_config(config)
    config = getattr(decoder, "config", {})
    return replace(spec, components={**{k: c for k, c in spec.components.items() if c.role != "decoder"},
                                     "decoder": _count(decoder, "decoder")},
                   decoder_channels=_first_channels(config), decoder_class=type(decoder).__name__,
                   decoder_depth=_depth(config), decoder_peak=_decode_peak(config))


# -- the plan ------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """A run's estimated memory. ``weights``: bytes of each component as stored under the profile; ``resident``:
    the components on the device in each phase ("encode", "sample", "decode"); ``activations``: bytes of each
    activation term; ``phases``: each phase's total (weights on the device plus its activations); ``peak``: the
    largest. ``notes``: how it was estimated where that is not the measured default."""

    model: str
    family: str
    method: str
    height: int
    width: int
    batch: int
    profile: str
    dtype: str
    device: str
    weights: dict[str, float]
    resident: dict[str, dict[str, float]]
    activations: dict[str, float]
    phase_activations: dict[str, list[str]]
    phases: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def fits(self, gb: float) -> bool:
        """Whether the peak fits ``HEADROOM`` of a card of ``gb`` GB (sold sizes are GiB, as CUDA reports them)."""
        return self.peak <= HEADROOM * gb * GIB

    def as_dict(self) -> dict:
        gib = lambda d: {k: round(v / GIB, 3) for k, v in d.items()}  # noqa: E731
        return {"model": self.model, "family": self.family, "method": self.method, "height": self.height,
                "width": self.width, "batch": self.batch, "profile": self.profile, "dtype": self.dtype,
                "device": self.device, "weights_gib": gib(self.weights),
                "resident_gib": {phase: gib(d) for phase, d in self.resident.items()},
                "activations_gib": gib(self.activations), "phases_gib": gib(self.phases),
                "peak_gib": round(self.peak_gib, 3), "peak_phase": self.peak_phase,
                "fits_gb": {str(card): self.fits(card) for card in CARDS_GB}, "notes": list(self.notes)}

    def table(self) -> str:
        """The breakdown as text: one line per component and activation term, the phases, the peak and the cards."""
        def size(value: float) -> str:
            return f"{value / GIB:8.2f} GiB" if value >= GIB / 10 else f"{value / 2**20:8.1f} MiB"

        lines = [f"{self.model} [{self.family}], {self.method}, {self.height}x{self.width}, batch {self.batch}, "
                 f"profile {self.profile}, {self.dtype} on {self.device}", "",
                 f"{'component':<34} {'size':>12}  on the device while"]
        for name, value in self.weights.items():
            phases = [p for p, d in self.resident.items() if name in d]
            held = ", ".join(phases) if phases else "never (the CPU holds it)"
            lines.append(f"{name + ' weights':<34} {size(value)}  {held}")
        for name, value in self.activations.items():
            phases = [p for p, names in self.phase_activations.items() if name in names]
            lines.append(f"{name:<34} {size(value)}  {', '.join(phases)}")
        lines.append("")
        for phase, total in self.phases.items():
            lines.append(f"{'phase ' + phase:<34} {size(total)}")
        lines.append(f"{'peak (' + self.peak_phase + ')':<34} {size(self.peak)}")
        lines.append("fits: " + ", ".join(f"{card} GB {'yes' if self.fits(card) else 'no'}" for card in CARDS_GB)
                     + f" (a card fits when the peak is at most {HEADROOM:.0%} of it)")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _dtype(dtype, device: torch.device) -> torch.dtype:
    from .loading.devices import check_dtype

    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return check_dtype(dtype)


#: The defaults of the method options that change a run's memory (the methods' own; a test keeps them equal), so
#: that the planner, below the methods, reads no method
OPTION_DEFAULTS = {"particles": {"particles": 8}, "best_of_n": {"candidates": 8},
                   "dps": {"gradient_checkpointing": True}, "psld": {"gradient_checkpointing": True}}
#: Registered methods that guide simplex flows over sequences, which the planner does not cover
SEQUENCE_METHODS = ("straight_through",)


def _option(options: dict, name: str, method: str, default):
    if name in options:
        return options[name]
    return OPTION_DEFAULTS.get(method, {}).get(name, default)


def plan(source: Any, method: str = "unguided", height: int | None = None, width: int | None = None,
         batch: int = 1, profile: str | None = None, *, device: torch.device | str | None = None, dtype=None,
         space: str = "pixel", cfg: bool | None = None, options: dict | None = None, decoder: Any = None,
         local_files_only: bool = False) -> Plan:
    """Estimate the peak memory of running ``method`` on ``batch`` images of ``height`` x ``width`` pixels (default:
    the family's size) with ``source`` (anything :func:`model_spec` takes) under the memory ``profile`` (default:
    the loaded model's, else "none") on ``device`` (default: CUDA) in ``dtype`` (default: bfloat16 on CUDA,
    float32 on the CPU; a loaded model: its own). ``space`` is the objective's ("pixel": through the decoder),
    ``cfg`` whether the network runs a CFG batch of two (default: the family's default guidance), ``options`` the
    method's options that change its memory (``particles``, ``candidates``, ``gradient_checkpointing``,
    ``num_steps`` of D-Flow), ``decoder`` a cheaper autoencoder that decodes in place of the VAE
    (:func:`with_decoder`)."""
    from operators.checks import check_int

    if method not in METHODS:
        if method in SEQUENCE_METHODS:
            raise ValueError(f"the planner covers image methods; {method!r} guides simplex flows over sequences")
        raise ValueError(f"unknown method {method!r}; the planner knows {', '.join(METHODS)}")
    if space not in ("pixel", "latent"):
        raise ValueError(f"space must be 'pixel' or 'latent', got {space!r}")
    check_int(batch, "batch", 1, None)
    options = dict(options or {})
    spec = model_spec(source, local_files_only=local_files_only, cfg=cfg)
    if decoder is not None:
        spec = with_decoder(spec, decoder, local_files_only)
    if cfg is not None and spec.cfg != bool(cfg):
        from dataclasses import replace

        spec = replace(spec, cfg=bool(cfg))
    profile = check_profile(profile or spec.profile or "none", allow_auto=False)
    refusal = spec.refusal(profile)
    if refusal:
        raise ValueError(refusal)
    device = torch.device(device) if device is not None else torch.device("cuda")
    loaded = getattr(source, "dtype", None) if not isinstance(source, (str, os.PathLike, ModelSpec)) else None
    run_dtype = _dtype(dtype if dtype is not None else (loaded if isinstance(loaded, torch.dtype) else None), device)
    size = spec.default_size
    height, width = height or size, width or size
    if not height or not width:
        raise ValueError(f"{spec.name} has no default size; give height and width")
    check_int(height, "height", 1, None)
    check_int(width, "width", 1, None)
    return _plan(spec, method, height, width, batch, profile, device, run_dtype, space, options)


def _plan(spec: ModelSpec, method: str, height: int, width: int, batch: int, profile_name: str,
          device: torch.device, dtype: torch.dtype, space: str, options: dict) -> Plan:
    profile, needs = PROFILES[profile_name], METHODS[method]
    e = torch.tensor([], dtype=dtype).element_size()
    half = HALF_GRAPH_FACTOR if e < 4 else 1.0
    notes = []
    constants = UNET if spec.unet else FAMILIES.get(spec.family, _MEAN)
    if not constants.measured:
        notes.append(f"no measured activation constants for the family {spec.family!r}: the mean of the measured "
                     f"transformer families")

    # weights as stored under the profile
    weights = {}
    for key, component in spec.components.items():
        quantize = profile.quantize if component.role in ("transformer", "unet") else None
        quantize = quantize or component.quantized
        stored = component.parameters * e
        if quantize:
            stored += component.linear * (QUANTIZED_BYTES[quantize] - e) + component.linear_rows * e
        weights[key] = float(stored)
    network = next(k for k, c in spec.components.items() if c.role in ("transformer", "unet"))
    texts = sorted((k for k, c in spec.components.items() if c.role == "text_encoder"), key=weights.get,
                   reverse=True)
    autoencoders = [k for k, c in spec.components.items() if c.role in ("vae", "decoder")]

    # the batch the network runs on
    population = int(_option(options, needs.population, method, 1)) if needs.population else 1
    images = batch * population
    calls = images * (2 if spec.cfg else 1)
    tokens = (height // spec.token_side) * (width // spec.token_side)
    latent = spec.latent_channels * (height // spec.latent_factor) * (width // spec.latent_factor)

    def tokens_times(pair: tuple[float, float], per_block: bool = False) -> float:
        count = pair[0] * tokens + pair[1] * spec.text_tokens
        return count * spec.width * e * calls * (spec.blocks if per_block else 1)

    forward = tokens_times(constants.forward)
    full = tokens_times(constants.graph, per_block=True) * half
    stored = tokens_times(constants.checkpointed, per_block=True) * half
    one_block = 0.0 if spec.unet else full / spec.blocks
    checkpointed = profile.checkpointing or (needs.checkpoint_option
                                             and bool(_option(options, "gradient_checkpointing", method, True)))
    graph = stored + one_block if checkpointed else full
    pixel_loss = needs.decoder_graph and space == "pixel" and spec.vae_class != ""

    activations: dict[str, float] = {}
    phase_terms: dict[str, list[str]] = {"encode": [], "sample": [], "decode": []}

    def add(name: str, size: float, *phases: str) -> None:
        if size > 0:
            activations[name] = float(size)
            for phase in phases:
                phase_terms[phase].append(name)

    # the solver's latents in every phase; float32 images while sampling only where the loop decodes (a pixel-space
    # loss, scored populations) or holds a source image, and at the final decode
    holds_images = pixel_loss or needs.scores or needs.encoder is not None
    add("latents", 4 * images * LATENT_COPIES * latent, "sample", "decode")
    add("images", 4 * images * IMAGE_COPIES * 3 * height * width, *(("sample", "decode") if holds_images
                                                                     else ("decode",)))
    if texts:
        widest = max(spec.components[k].width for k in texts) or 4096
        add("text encoding", 16 * spec.text_tokens * widest * e * (2 if spec.cfg else 1), "encode")
    decoder = AUTOENCODERS.get(spec.decoder_class, AUTOENCODERS["AutoencoderKL"])
    vae = AUTOENCODERS.get(spec.vae_class, AUTOENCODERS["AutoencoderKL"])
    for cls in {spec.decoder_class, spec.vae_class} - {""} - set(AUTOENCODERS):
        notes.append(f"no measured activation constants for {cls}: AutoencoderKL's")
    per_image = height * width * e
    tile = min(height, width, TILE_SIZE) if profile.vae_slicing else None
    if spec.vae_class:
        decode_images = 1 if profile.vae_slicing else images
        area = tile * tile if tile else height * width
        add("decode", decoder.decode * spec.decoder_peak * area * spec.decoder_channels * e * decode_images
            + (2 * 3 * per_image * images if tile else 0), "decode")
    sample_options = {"denoiser forward": forward}
    if needs.network_graph:
        factor = {"graph": 1, "second_order": 3, "trajectory": 2}[needs.network_graph]
        sample_options["network graph"] = factor * graph
        if needs.network_graph == "trajectory":
            steps = int(_option(options, "num_steps", method, 5))
            add("trajectory states and L-BFGS history", 4 * images * latent * (steps + 2 * LBFGS_HISTORY), "sample")
    if needs.scores and space == "pixel" and spec.vae_class:
        sample_options["scoring decode"] = decoder.decode * spec.decoder_peak * (tile * tile if tile else height * width) \
            * spec.decoder_channels * e * (1 if profile.vae_slicing else images)
    if pixel_loss:
        sample_options["decoder graph"] = decoder.decode_graph * spec.decoder_depth * per_image \
            * spec.decoder_channels * images * half
    if needs.encoder and spec.vae_class:
        encode = vae.encode * (tile * tile if tile else height * width) * spec.vae_channels * e
        sample_options["encoder graph" if needs.encoder == "graph" else "encode"] = \
            (vae.decode_graph * spec.decoder_depth / vae.encode * half if needs.encoder == "graph" else 1) * encode \
            * (1 if profile.vae_slicing else images)
    # the network's graph and the decoder's coexist (the network's is kept until the backward pass); otherwise the
    # terms follow one another and the largest sets the peak
    together = [k for k in ("network graph", "decoder graph", "encoder graph") if k in sample_options]
    for name, size in sample_options.items():
        add(name, size, "sample")
    alone = max([sample_options[k] for k in sample_options if k not in together], default=0.0)
    coexisting = sum(sample_options[k] for k in together)
    if checkpointed and needs.network_graph == "graph" and len(together) > 1:
        # checkpointed: the block inputs stay while the decoder's (and encoder's) graph is walked back; a block's
        # recomputed graph comes after those are freed
        others = coexisting - sample_options["network graph"]
        coexisting = max(stored + others, stored + one_block)
    sample_total = max(alone, coexisting)

    # weights on the device in each phase
    placement = profile.placement if device.type != "cpu" else "device"
    if placement == "device":
        resident = {phase: dict(weights) for phase in phase_terms}
    elif placement == "sequential_offload":
        def leaves(keys, block=False):
            return {k: (spec.components[k].largest_block if block else 2 * spec.components[k].largest_leaf)
                    * e for k in keys}
        grad = needs.network_graph is not None
        resident = {"encode": leaves(texts[:1]), "sample": leaves([network], block=grad),
                    "decode": leaves(autoencoders)}
        if pixel_loss or needs.encoder:
            resident["sample"].update(leaves(autoencoders))
    else:
        kept = {k: weights[k] for k in autoencoders}
        on_demand = {k: weights[k] for k in texts[:2]}
        resident = {"encode": {**on_demand, **(kept if placement == "text_swap" else {})},
                    "sample": {**kept, network: weights[network]},
                    "decode": {**kept, **({network: weights[network]} if placement == "text_swap" else {})}}

    def total(phase: str, extra: float) -> float:
        return sum(resident[phase].values()) + extra + sum(activations[k] for k in phase_terms[phase]
                                                           if k not in sample_options)

    phases = {"encode": total("encode", 0.0) if texts else 0.0, "sample": total("sample", sample_total),
              "decode": total("decode", 0.0)}
    phases = {k: v for k, v in phases.items() if v > 0}
    if device.type == "cpu" and profile.placement != "device":
        notes.append("on a CPU device offloading keeps every weight in the same memory: only quantisation and VAE "
                     "tiling save")
    return Plan(spec.name, spec.family, method, height, width, batch, profile_name,
                str(dtype).replace("torch.", ""), str(device), weights, resident, activations, phase_terms, phases,
                notes)


def lightest_fitting(source: Any, method: str, height: int | None, width: int | None, batch: int,
                     free_bytes: float, device: torch.device | str, **kwargs) -> tuple[str | None, dict[str, Plan]]:
    """(the lightest profile whose plan fits ``HEADROOM`` of ``free_bytes`` on ``device``, or None; every
    profile's plan), skipping profiles that cannot run there (NF4 without bitsandbytes and CUDA)."""
    spec = model_spec(source, local_files_only=kwargs.pop("local_files_only", False), cfg=kwargs.get("cfg"))
    plans = {}
    for name in PROFILES:
        if profile_unavailable(name, device) or spec.refusal(name):
            continue
        plans[name] = plan(spec, method, height, width, batch, name, device=device, **kwargs)
        if plans[name].peak <= HEADROOM * free_bytes:
            return name, plans
    return None, plans

