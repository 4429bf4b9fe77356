"""``flowsteer memory``: a run's estimated peak memory by component and the cards it fits, before any weight loads.

    flowsteer memory --model sd3.5-medium --method dps --size 1024
    flowsteer memory --model black-forest-labs/FLUX.1-dev --method flair --memory 8bit --json
    flowsteer memory --table      # the README's table: architecture x method x profile, peak GiB at 1024²
    flowsteer memory --check      # the estimate beside the exact tensor peak of runs on random-weight miniatures

MODEL is what the other commands take (a hub id, a local folder, ``default``) or a full-size architecture of
``flowsteer speed`` (:data:`ARCHITECTURES`: the released configs, with the released text encoders), so that
models can be planned without their weights. A known hub id whose configs are not on this machine is planned from
its architecture.
"""

from __future__ import annotations

import argparse
import json
from functools import lru_cache

import torch

__all__ = ["ARCHITECTURES", "CHECK_BACKBONES", "HUB_ARCHITECTURES", "architecture_spec",
           "check_rows", "measure_run", "readme_table", "resolve_model"]

#: name -> (family, description, CFG batch of two by default)
ARCHITECTURES = {
    "sd3.5-medium": ("sd3", "SD3.5-medium: 2.2B MMDiT-X, CLIP-L + CLIP-G + T5-XXL, 16-channel VAE", True),
    "sd3.5-large": ("sd3", "SD3.5-large: 8.1B MMDiT, CLIP-L + CLIP-G + T5-XXL, 16-channel VAE", True),
    "flux-dev": ("flux", "FLUX.1-dev: 11.9B, CLIP-L + T5-XXL, 16-channel VAE, guidance-distilled (no CFG batch)",
                 False),
    "flux2-klein-4b": ("flux2", "FLUX.2 [klein] 4B: Qwen3-4B text encoder, FLUX.2 VAE, step-distilled (no CFG)",
                       False),
    "flux2-klein-9b": ("flux2", "FLUX.2 [klein] 9B: Qwen3-8B text encoder, FLUX.2 VAE, step-distilled (no CFG)",
                       False),
    "qwen-image": ("qwen_image", "Qwen-Image: 20.4B MMDiT, Qwen2.5-VL-7B text encoder, 3D VAE, true CFG batch",
                   True),
}
#: the checkpoints of those architectures, planned from the architecture when their configs are not here
HUB_ARCHITECTURES = {
    "stabilityai/stable-diffusion-3.5-medium": "sd3.5-medium",
    "stabilityai/stable-diffusion-3.5-large": "sd3.5-large",
    "black-forest-labs/FLUX.1-dev": "flux-dev",
    "black-forest-labs/FLUX.2-klein-4B": "flux2-klein-4b",
    "black-forest-labs/FLUX.2-klein-9B": "flux2-klein-9b",
    "Qwen/Qwen-Image": "qwen-image",
}
#: SD3.5-large's transformer (stabilityai/stable-diffusion-3.5-large, transformer/config.json)
SD35_LARGE_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm",
)
#: The released text encoders' configs (CLIP ViT-L/14 and OpenCLIP bigG text towers, T5 v1.1 XXL's encoder,
#: Qwen2.5-VL-7B-Instruct, Qwen3-4B / Qwen3-8B).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
              vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
QWEN25_VL_7B = dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                     rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], in_chans=3),
    vocab_size=152064)
QWEN3 = {"4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
         "9b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False)}


def _meta(cls, config):
    """A module built on the meta device (nothing allocated): diffusers from a config dict, transformers from its
    config object."""
    with torch.device("meta"):
        return cls(**config) if isinstance(config, dict) else cls._from_config(config)


@lru_cache(maxsize=None)
def architecture_spec(name: str):
    """The planner's ModelSpec of a full-size architecture of :data:`ARCHITECTURES`, built on the meta device."""
    import diffusers
    import transformers

    from guidance.memory_estimate import spec_from_configs
    from tasks.random_models.common import VAE16
    from tasks.random_models.flux import FLUX_DEV_TRANSFORMER
    from tasks.random_models.flux2 import FLUX2_KLEIN_TRANSFORMERS, FLUX2_VAE
    from tasks.random_models.qwen_image import QWEN_IMAGE_TRANSFORMER, QWEN_IMAGE_VAE
    from tasks.random_models.sd3 import SD35_MEDIUM_TRANSFORMER

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}")
    family, _, cfg = ARCHITECTURES[name]
    clip = lambda cls, config: _meta(getattr(transformers, cls), transformers.CLIPTextConfig(**config))  # noqa: E731
    t5 = lambda: _meta(transformers.T5EncoderModel, transformers.T5Config(**T5_XXL))  # noqa: E731
    if family == "sd3":
        config = SD35_MEDIUM_TRANSFORMER if name == "sd3.5-medium" else SD35_LARGE_TRANSFORMER
        modules = {"transformer": ("transformer", _meta(diffusers.SD3Transformer2DModel, config)),
                   "text_encoder": ("text_encoder", clip("CLIPTextModelWithProjection", CLIP_L)),
                   "text_encoder_2": ("text_encoder", clip("CLIPTextModelWithProjection", CLIP_G)),
                   "text_encoder_3": ("text_encoder", t5()),
                   "vae": ("vae", _meta(diffusers.AutoencoderKL, VAE16))}
    elif family == "flux":
        modules = {"transformer": ("transformer", _meta(diffusers.FluxTransformer2DModel, FLUX_DEV_TRANSFORMER)),
                   "text_encoder": ("text_encoder", clip("CLIPTextModel", CLIP_L)),
                   "text_encoder_2": ("text_encoder", t5()),
                   "vae": ("vae", _meta(diffusers.AutoencoderKL, VAE16))}
    elif family == "flux2":
        size = name.rsplit("-", 1)[1]
        modules = {"transformer": ("transformer", _meta(diffusers.Flux2Transformer2DModel,
                                                        FLUX2_KLEIN_TRANSFORMERS[size])),
                   "text_encoder": ("text_encoder", _meta(transformers.Qwen3ForCausalLM,
                                                          transformers.Qwen3Config(**QWEN3[size]))),
                   "vae": ("vae", _meta(diffusers.AutoencoderKLFlux2, FLUX2_VAE))}
    else:
        vae = {k: list(v) if isinstance(v, tuple) else v for k, v in QWEN_IMAGE_VAE.items()}
        modules = {"transformer": ("transformer", _meta(diffusers.QwenImageTransformer2DModel,
                                                        QWEN_IMAGE_TRANSFORMER)),
                   "text_encoder": ("text_encoder", _meta(transformers.Qwen2_5_VLForConditionalGeneration,
                                                          transformers.Qwen2_5_VLConfig(**QWEN25_VL_7B))),
                   "vae": ("vae", _meta(diffusers.AutoencoderKLQwenImage, vae))}
    return spec_from_configs(name, family, modules, 1024, cfg)


def resolve_model(model: str, local_files_only: bool = False):
    """What the planner takes for MODEL: an architecture's ModelSpec, else the hub id or folder itself; a known hub
    id whose configs are not on this machine falls back to its architecture."""
    from guidance.loading.models import ModelNotFoundError
    from guidance.memory_estimate import model_spec

    if model in ARCHITECTURES:
        return architecture_spec(model)
    try:
        return model_spec(model, local_files_only=local_files_only)
    except ModelNotFoundError:
        if model not in HUB_ARCHITECTURES:
            raise
        spec = architecture_spec(HUB_ARCHITECTURES[model])
        return spec


def tiny_decoder(spec):
    """TAESD3 / TAEF1's architecture (AutoencoderTiny, 2.4M parameters) on the meta device, for a spec with the
    16-channel latents it reads."""
    from diffusers import AutoencoderTiny

    from tasks.random_models.common import TAESD16

    if spec.latent_channels != 16 or spec.latent_factor != 8:
        raise ValueError(f"the tiny decoder (TAESD3 / TAEF1's architecture) reads 16-channel latents of factor 8; "
                         f"{spec.name} has {spec.latent_channels} channels of factor {spec.latent_factor}: give "
                         f"--decoder a hub id or folder of one made for it")
    return _meta(AutoencoderTiny, TAESD16)


def _options(values: list[str] | None) -> dict:
    from .restore import parse_options

    return parse_options(values)


def _cfg(value: str | None) -> bool | None:
    return None if value in (None, "auto") else value == "on"


def readme_table(architectures=None, methods=("unguided", "flowchef", "flair", "dps"), size: int = 1024,
                 profiles=None) -> str:
    """The markdown table of the README's Memory section: estimated peak GiB per architecture x method (bf16 on a
    CUDA device, batch 1, ``size`` pixels square, the family's default guidance) under each profile; pixel-space
    losses through the full VAE, and for the 16-channel families also through the tiny decoder."""
    from guidance.memory_estimate import METHODS, plan
    from guidance.memory_profiles import PROFILES

    architectures = list(architectures or ARCHITECTURES)
    profiles = list(profiles or PROFILES)
    from guidance.memory_estimate import with_decoder

    lines = ["| model | method | " + " | ".join(profiles) + " |", "|---|---|" + "---|" * len(profiles)]
    for name in architectures:
        spec = architecture_spec(name)
        rows = [(method, spec) for method in methods]
        if spec.latent_channels == 16 and spec.latent_factor == 8 and spec.family != "qwen_image":
            tiny = with_decoder(spec, tiny_decoder(spec))
            rows += [(f"{method}, tiny decoder", tiny) for method in methods if METHODS[method].decoder_graph]
        for label, source in rows:
            method = label.split(",")[0]
            peaks = [plan(source, method, size, size, 1, profile, device="cuda", dtype=torch.bfloat16).peak_gib
                     for profile in profiles]
            lines.append(f"| {name} | {label} | " + " | ".join(f"{p:.1f}" for p in peaks) + " |")
    return "\n".join(lines)


# -- estimate vs measured ----------------------------------------------------------------------------------------
#: the miniatures ``--check`` measures: the tests' tiny SD3 and FLUX.1 and the speed command's SD3.5-medium and
#: FLUX.1-dev architectures at an eighth of their layers and widths (random weights, float32 on the CPU)
CHECK_BACKBONES = ("tiny-sd3", "tiny-flux", "sd3.5-medium/8", "flux-dev/8")
CHECK_METHODS = ("unguided", "flowchef", "dps", "flair")
CHECK_SIZES = (128, 256)


def _check_backbone(name: str):
    """(model, condition) of a ``--check`` backbone."""
    from guidance.backbones.flux import FluxModel
    from guidance.backbones.sd3 import SD3Model
    from tasks.random_models import common, flux, sd3

    if name == "tiny-sd3":
        model = SD3Model.from_components(**sd3.sd3_components())
    elif name == "tiny-flux":
        model = FluxModel.from_components(**flux.flux_components(dev=True))
    elif name == "sd3.5-medium/8":
        model = SD3Model.from_components(**sd3.sd35_medium_components(0.125, "cpu", torch.float32))
    elif name == "flux-dev/8":
        model = FluxModel.from_components(**flux.flux_dev_components(0.125, "cpu", torch.float32))
    else:
        raise ValueError(f"unknown check backbone {name!r}; choose from {', '.join(CHECK_BACKBONES)}")
    sd3_family = isinstance(model, SD3Model)
    cond = model.condition(common.PROMPT, common.NEGATIVE, 7.0) if sd3_family else \
        model.condition(common.PROMPT, guidance_scale=3.5)
    return model, cond


def measure_run(model, cond, method: str, size: int, num_steps: int = 2, seed: int = 0) -> tuple[int, object]:
    """(the exact peak of tensor memory on the CPU, weights included, of ``method`` restoring an SR x2 measurement
    of a random ``size`` x ``size`` image in ``num_steps`` steps on ``model``; the planner's Plan of the run).
    FLAIR runs 2 data steps with the default weight table; DPS with its default checkpointing."""
    from guidance import MeasurementFidelity, get_method
    from guidance.features.calibration import DEFAULT_CRW
    from guidance.memory import TensorPeak
    from guidance.memory_estimate import plan
    from operators import make_operator

    options = {"crw": DEFAULT_CRW, "data_steps": 2} if method == "flair" else {}
    generator = torch.Generator().manual_seed(seed)
    clean = torch.rand(1, 3, size, size, generator=generator) * 2 - 1
    operator = make_operator("sr:factor=2")
    objective = MeasurementFidelity(operator, operator(clean))
    modules = [m for m in model.pipeline.components.values() if isinstance(m, torch.nn.Module)]
    run = get_method(method, **options)
    estimate = plan(model, method, size, size, 1, device="cpu", options=options)
    with torch.no_grad(), TensorPeak(*modules, clean, device="cpu") as measured:
        run(model, objective, num_steps=num_steps, cond=cond, height=size, width=size, generator=generator,
            progress=False)
    return measured.peak, estimate


def check_rows(backbones=CHECK_BACKBONES, methods=CHECK_METHODS, sizes=CHECK_SIZES) -> list[dict]:
    """Estimate vs measured for every backbone x method x size: the run's phases (sampling, decoding) against the
    exact CPU tensor peak, in MiB, with their ratio."""
    rows = []
    for name in backbones:
        model, cond = _check_backbone(name)
        for size in sizes:
            for method in methods:
                measured, estimate = measure_run(model, cond, method, size)
                planned = max(v for k, v in estimate.phases.items() if k != "encode")
                rows.append({"backbone": name, "method": method, "size": size, "measured_mib": measured / 2**20,
                             "estimated_mib": planned / 2**20, "weights_mib": sum(estimate.weights.values()) / 2**20,
                             "ratio": planned / measured})
    return rows


def _check_markdown(rows: list[dict]) -> str:
    lines = ["| backbone | method | size | weights MiB | measured peak MiB | estimated MiB | estimate / measured |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['backbone']} | {r['method']} | {r['size']} | {r['weights_mib']:.1f} | {r['measured_mib']:.1f} "
              f"| {r['estimated_mib']:.1f} | {r['ratio']:.2f} |" for r in rows]
    return "\n".join(lines)


# -- the command ---------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Print the plan (or the README table, or the check against measured peaks)."""
    from guidance.memory_estimate import CARDS_GB, lightest_fitting, plan, with_decoder
    from guidance.memory_profiles import AUTO, PROFILES, check_profile

    from .generate import parse_size

    if args.table:
        print(readme_table(size=(parse_size(args.size) or (1024,))[0]))
        return 0
    if args.check:
        rows = check_rows()
        print(json.dumps(rows, indent=2) if args.json else _check_markdown(rows))
        return 0
    if args.model is None:
        raise ValueError("--model is required (a hub id, a folder, 'default' or an architecture: "
                         f"{', '.join(ARCHITECTURES)}), unless --table or --check")
    size = parse_size(args.size)
    height, width = size if size else (None, None)
    profile = check_profile(args.memory or "none")
    source = resolve_model(args.model)
    if args.decoder is not None:
        source = with_decoder(source, tiny_decoder(source) if args.decoder == "tiny" else args.decoder)
    device = torch.device(args.device or "cuda")
    settings = dict(dtype=args.dtype, space=args.space, cfg=_cfg(args.cfg), options=_options(args.option))
    if profile == AUTO:
        from guidance.memory import free_memory_gib

        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--memory auto picks the lightest profile that fits the free memory of --device, but "
                             "there is no CUDA device here; give a profile, or --device cpu")
        free = free_memory_gib(device)
        profile, _ = lightest_fitting(source, args.method, height, width, args.batch, (free or 0) * 2**30, device,
                                      **settings)
        if profile is None:
            raise ValueError(f"no memory profile fits the {free:.1f} GiB free on {device}: use a smaller --size")
    chosen = plan(source, args.method, height, width, args.batch, profile, device=device, **settings)
    others = {name: plan(source, args.method, height, width, args.batch, name, device=device, **settings)
              for name in PROFILES if not source.refusal(name)}
    if args.json:
        print(json.dumps({**chosen.as_dict(), "profiles": {k: {"peak_gib": round(p.peak_gib, 3),
                                                               "fits_gb": {str(c): p.fits(c) for c in CARDS_GB}}
                                                           for k, p in others.items()}}, indent=2))
        return 0
    print(chosen.table())
    print("\nevery profile (peak GiB; cards it fits):")
    for name, other in others.items():
        cards = ", ".join(str(c) for c in CARDS_GB if other.fits(c)) or "none"
        print(f"  {name:<9} {other.peak_gib:>8.2f}  {cards} GB   {PROFILES[name].description}")
    return 0


def add_parser(commands) -> None:
    from guidance.memory_estimate import METHODS
    from guidance.memory_profiles import PROFILES

    parser = commands.add_parser(
        "memory", help="estimated peak memory of a run by component, and which cards it fits (no weights loaded)",
        description="Estimate, from the model's configs only, the peak memory of a run (weights, activations, the "
                    "method's extras) under a memory profile, and which 12 / 16 / 24 / 48 / 80 GB cards it fits. "
                    "Profiles: " + "; ".join(f"{k}: {p.description}" for k, p in PROFILES.items()) + ".")
    parser.add_argument("--model", help="hub id, local folder, 'default' or a full-size architecture: "
                                        f"{', '.join(ARCHITECTURES)}")
    parser.add_argument("--method", default="unguided", choices=list(METHODS), metavar="NAME",
                        help="the guidance method (default unguided; flowsteer methods lists them)")
    parser.add_argument("--size", type=int, nargs="+", metavar=("N", "W"),
                        help="image size: N for N x N, or H W (default: the model's, 1024 for the architectures)")
    parser.add_argument("--batch", type=int, default=1, help="images per run (default 1)")
    parser.add_argument("--memory", metavar="PROFILE",
                        help=f"memory profile: {', '.join(PROFILES)}, or auto (the lightest that fits the free "
                             f"memory of --device) (default none)")
    parser.add_argument("--device", help="the device to plan for: cuda (default) or cpu (offloading saves nothing "
                                         "there)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--space", choices=("pixel", "latent"), default="pixel",
                        help="where the objective lives: pixel (through the decoder, the default) or latent")
    parser.add_argument("--cfg", choices=("auto", "on", "off"), default="auto",
                        help="the network runs a CFG batch of two: on, off, or the family's default (auto)")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="a method option that changes its memory, e.g. --option particles=16 (repeatable)")
    parser.add_argument("--decoder", metavar="ID",
                        help="an autoencoder that decodes in place of the VAE, as the other commands' --decoder (a "
                             "hub id or folder), or 'tiny' for TAESD3 / TAEF1's architecture")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--table", action="store_true",
                        help="print the README's table: each architecture x unguided, flowchef, flair, dps x profile "
                             "at --size (default 1024)")
    parser.add_argument("--check", action="store_true",
                        help="measure the exact tensor peak of runs on random-weight miniatures on the CPU and print "
                             "it beside the estimate (about a minute on two CPU cores)")
    parser.set_defaults(run=run)
