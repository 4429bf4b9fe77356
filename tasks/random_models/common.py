"""What the random-weight builders of every family share, fully offline (the families' own builders are the
sibling files, one per family: sd3.py, flux.py, ...).

* tiny parts: word-level tokenizers (``word_tokenizer``; nothing is downloaded, the vocabularies are built with
  the ``tokenizers`` library), an 8x-downsampling ``AutoencoderKL`` (``tiny_vae``) and TAESD-style decoder
  (``tiny_taesd``), a T5 encoder (``tiny_t5``), a small UNet velocity network (``tiny_unet``); the released VAE
  constants of SD3 and FLUX.1, the prompts the tests use;
* full-size parts: the 16-channel VAE of SD3 / FLUX.1 and its TAESD-style tiny decoder (``vae16``, ``taesd16``),
  one-layer text encoders with the real output widths (CLIP-L 768, CLIP-G 1280, T5-XXL 4096: embeddings are
  computed once per prompt, so the encoders' size does not enter a sampling loop), and the rules of a
  miniature: ``scale`` < 1 builds the same architecture with layers, heads and widths times ``scale`` on a CPU;
  scale 1 is built on a CUDA device only (or on "meta", to count parameters), directly in the requested dtype.
  The cost of a forward pass does not depend on the weights, so full-size models give real time and memory
  figures on a GPU without a checkpoint (their outputs mean nothing).
"""

from __future__ import annotations

import contextlib

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

__all__ = [
    "CLIP_G_WIDTH", "CLIP_L_WIDTH", "FLUX_VAE_SCALE", "FLUX_VAE_SHIFT", "FULL_SIZE_PARAMETERS", "full_size_device",
    "NEGATIVE", "PROMPT", "SD3_VAE_SCALE", "SD3_VAE_SHIFT", "T5_WIDTH", "TAESD16", "VAE16", "buffers_to", "building",
    "check_scale", "parameter_count", "scaled_count", "scaled_width", "taesd16", "text_widths", "tiny_t5",
    "tiny_taesd", "tiny_unet", "tiny_vae", "vae16", "word_tokenizer",
]

PROMPT = "a photo of a red fox sitting in the snow"
NEGATIVE = "blurry low quality painting"

_WORDS = (
    "a an the of in on at with and photo painting portrait picture image red green blue white black fox cat dog "
    "sitting standing running snow grass forest city street high low quality blurry sharp detailed face bird "
    "house tree sky sun night day beautiful ugly deformed"
).split()

# Real checkpoint VAE constants (SD3 and FLUX.1); the tiny VAEs use them so the (un)scaling is exercised.
SD3_VAE_SCALE, SD3_VAE_SHIFT = 1.5305, 0.0609
FLUX_VAE_SCALE, FLUX_VAE_SHIFT = 0.3611, 0.1159


def word_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with CLIP (bos 0, pad 1, eos 2, 77 tokens) or T5 (pad 0, eos 1, 512) ids."""
    if kind == "clip":
        specials = ["<|startoftext|>", "<pad>", "<|endoftext|>", "<unk>"]
        max_length = 77
    elif kind == "t5":
        specials = ["<pad>", "</s>", "<unk>"]
        max_length = 512
    else:
        raise ValueError(f"kind must be 'clip' or 't5', got {kind!r}")
    vocab = {token: i for i, token in enumerate(specials + list(dict.fromkeys(_WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "clip":
        backend.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>",
            special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 2)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            pad_token="<pad>",
            unk_token="<unk>",
            model_max_length=max_length,
        )
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=max_length
    )


def tiny_vae(latent_channels: int = 4, scaling_factor: float = SD3_VAE_SCALE, shift_factor: float = SD3_VAE_SHIFT):
    """AutoencoderKL with four levels (8x downsampling, like the real ones) and a few channels."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def tiny_taesd(latent_channels: int = 4, scaling_factor: float = SD3_VAE_SCALE, shift_factor: float = SD3_VAE_SHIFT):
    """AutoencoderTiny (TAESD-style) with 8x downsampling, a cheap stand-in decoder."""
    torch.manual_seed(0)
    return AutoencoderTiny(
        encoder_block_out_channels=(4, 4, 4, 4),
        decoder_block_out_channels=(4, 4, 4, 4),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=latent_channels,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def _eval(components: dict) -> dict:
    """Modules built from config start in training mode (T5 has dropout); loaded checkpoints are in eval mode."""
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return components


def _clip_config(hidden_size: int, heads: int, projection_dim: int, layers: int = 3) -> CLIPTextConfig:
    """A CLIP text encoder of width ``hidden_size`` over the word tokenizer's ids (77 positions)."""
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        vocab_size=1000,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        projection_dim=projection_dim,
        max_position_embeddings=77,
    )


def tiny_t5(d_model: int = 32, layers: int = 2) -> T5EncoderModel:
    """A T5 encoder whose output width is ``d_model`` (all that the transformers it feeds depend on)."""
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=1000,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def tiny_unet(channels: int = 4) -> UNet2DModel:
    """A small unconditional UNet2DModel used as a generic velocity network."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


# -- full-size architectures with random weights ----------------------------------------------------------------
#: The 16-channel VAE of SD3 and FLUX.1 (f = 8); the two differ only in their scale and shift.
VAE16 = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, act_fn="silu", use_quant_conv=False,
    use_post_quant_conv=False,
)
#: TAESD3 / TAEF1: the tiny autoencoder (AutoencoderTiny) for the 16-channel latents.
TAESD16 = dict(
    encoder_block_out_channels=(64,) * 4, decoder_block_out_channels=(64,) * 4, num_encoder_blocks=(1, 3, 3, 3),
    num_decoder_blocks=(3, 3, 3, 1), latent_channels=16, act_fn="relu", upsample_fn="nearest",
)
#: Output widths of the text encoders: CLIP-L, CLIP-G (SD3 pools 768 + 1280 = 2048) and T5-XXL.
CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 768, 1280, 4096
#: Parameters of the full-size transformers, for messages.
FULL_SIZE_PARAMETERS = {"SD3.5-medium": "2.2B", "FLUX.1-dev": "11.9B"}


def check_scale(scale: float) -> float:
    """A miniature factor must be a number in (0, 1]; 1 is the full-size architecture."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1:
        raise ValueError(f"scale must be a number in (0, 1] (1: the full-size architecture), got {scale!r}")
    return float(scale)


def scaled_count(n: int, scale: float) -> int:
    """Layers or heads of a miniature: round(n * scale), at least 1 (n itself at scale 1)."""
    return max(1, round(n * scale))


def scaled_width(n: int, scale: float, multiple: int = 16) -> int:
    """A channel width of a miniature: n * scale rounded to a multiple of ``multiple``, at least one multiple
    (n itself at scale 1 when n is a multiple)."""
    return max(multiple, round(n * scale / multiple) * multiple)


def text_widths(scale: float = 1.0) -> tuple[int, int, int]:
    """(CLIP-L, CLIP-G, T5) output widths at ``scale``: (768, 1280, 4096) at full size."""
    return tuple(scaled_width(n, check_scale(scale)) for n in (CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH))


def full_size_device(scale: float, device, what: str, parameters: str | None = None) -> torch.device:
    """``device`` as a torch.device; a full-size (``scale`` 1) architecture of ``parameters`` parameters is built on a
    CUDA GPU (or the meta device, to count them) only."""
    device = torch.device(device)
    if scale == 1 and device.type not in ("cuda", "meta"):
        parameters = FULL_SIZE_PARAMETERS.get(what) if parameters is None else parameters
        raise ValueError(
            f"the full-size {what} architecture ({parameters} parameters) is built with random "
            f"weights on a CUDA GPU only, not on {device.type!r}: run on a machine with a GPU, or pass scale < 1 "
            f"for a miniature of the same architecture"
        )
    return device


@contextlib.contextmanager
def building(device, dtype: torch.dtype):
    """Create modules' parameters directly on ``device`` in ``dtype`` (no float32 copy first): torch's default
    device and dtype inside the block."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def buffers_to(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Floating buffers computed at construction in float32 (SD3's 384 x 384 position-embedding table) cast to
    ``dtype``, as a checkpoint loaded in that dtype holds them."""
    for sub in module.modules():
        for name, buffer in sub._buffers.items():
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                sub._buffers[name] = buffer.to(dtype)
    return module


def vae16(scaling_factor: float, shift_factor: float, scale: float = 1.0, device="cpu",
          dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """The 16-channel AutoencoderKL of SD3 / FLUX.1 (f = 8) with random weights; at ``scale`` < 1 its widths and
    norm groups shrink together (128-256-512-512 with 32 groups at full size)."""
    scale = check_scale(scale)
    groups = scaled_count(VAE16["norm_num_groups"], scale)
    widths = tuple(max(groups, round(c * scale / groups) * groups) for c in VAE16["block_out_channels"])
    torch.manual_seed(0)
    with building(device, dtype):
        return AutoencoderKL(**{**VAE16, "block_out_channels": widths, "norm_num_groups": groups},
                             scaling_factor=scaling_factor, shift_factor=shift_factor).eval()


def taesd16(scaling_factor: float, shift_factor: float, scale: float = 1.0, device="cpu",
            dtype: torch.dtype = torch.float32, latent_channels: int = 16, spatial_factor: int = 8) -> AutoencoderTiny:
    """A TAESD3 / TAEF1-style tiny autoencoder (64 channels at full size) with random weights, applied with the
    full VAE's scale and shift so that it reads the same latents. ``spatial_factor`` f (a power of two) sets the
    levels, log2(f) + 1, with TAESD's block counts (encoder 1, 3, ..., 3; decoder 3, ..., 3, 1)."""
    scale = check_scale(scale)
    levels = spatial_factor.bit_length()
    if isinstance(spatial_factor, bool) or not isinstance(spatial_factor, int) or spatial_factor < 2 \
            or spatial_factor != 1 << (levels - 1):
        raise ValueError(f"spatial_factor must be a power of two >= 2, got {spatial_factor!r}")
    width = scaled_width(64, scale, 4)
    torch.manual_seed(0)
    with building(device, dtype):
        return AutoencoderTiny(**{**TAESD16, "encoder_block_out_channels": (width,) * levels,
                                  "decoder_block_out_channels": (width,) * levels,
                                  "num_encoder_blocks": (1,) + (3,) * (levels - 1),
                                  "num_decoder_blocks": (3,) * (levels - 1) + (1,), "latent_channels": latent_channels},
                               scaling_factor=scaling_factor, shift_factor=shift_factor).eval()


def _clip_heads(width: int) -> int:
    """Heads of 64 channels where the width allows it (12 for CLIP-L, 20 for CLIP-G), else one."""
    heads = max(1, width // 64)
    return heads if width % heads == 0 else 1


def _text_encoders(kinds, scale: float, device, dtype) -> list:
    """One-layer CLIP ("clip_l", "clip_g": with projection; "clip": pooled only) and T5 encoders with the real
    output widths at ``scale``."""
    clip_l, clip_g, t5 = text_widths(scale)
    built = []
    with building(device, dtype):
        for seed, kind in enumerate(kinds, start=1):
            torch.manual_seed(seed)
            if kind == "t5":
                built.append(tiny_t5(t5, layers=1))
                continue
            width = clip_g if kind == "clip_g" else clip_l
            config = _clip_config(width, _clip_heads(width), width, layers=1)
            built.append((CLIPTextModel if kind == "clip" else CLIPTextModelWithProjection)(config))
    return built


def parameter_count(module: torch.nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
