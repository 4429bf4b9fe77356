"""Randomly initialised Qwen-Image components built from config, fully offline.

Two builds of the same architecture:

* a **tiny** pipeline (:func:`tiny_qwen_image_pipeline`, :func:`tiny_qwen_image_components`): a two-block
  ``QwenImageTransformer2DModel`` over 16-channel latents packed 2x2 (64 input channels, as released), a small
  ``AutoencoderKLQwenImage`` with the released 8x downsampling and per-channel latent statistics, a two-layer
  ``Qwen2_5_VLForConditionalGeneration`` text encoder and the released scheduler config (dynamic exponential
  shift up to 8192 tokens, ``shift_terminal`` 0.02), so the adapter is checked against ``QwenImagePipeline`` on
  the code paths the real model takes;
* the **full-size** architecture with random weights (:func:`qwen_image_components`): the released 20B
  MMDiT (60 blocks, 24 heads of 128, text width 3584) and the released VAE (base width 96, f = 8, z = 16), with a
  one-layer Qwen2.5-VL text encoder of the real output width 3584. A forward pass costs the same whatever the
  weights, so this gives real time and memory figures on a GPU without a checkpoint (its outputs mean nothing);
  ``scale`` < 1 builds a miniature of the same architecture that runs on a CPU. Scale 1 is built on a CUDA
  device only (or on "meta", for counting parameters), directly in the requested dtype.

The tokenizer is a word-level vocabulary built with the ``tokenizers`` library. It splits words, punctuation and
line breaks into single tokens and keeps ``<|im_start|>`` / ``<|im_end|>`` whole, so the pipeline's prompt
template prefix is exactly 34 tokens, as with the real Qwen2 tokenizer, and the pipeline's
``prompt_template_encode_start_idx = 34`` drops exactly the template's system part.

Architecture references: Qwen-Image Technical Report (Wu et al., 2025, arXiv:2508.02324),
https://github.com/QwenLM/Qwen-Image, and diffusers' ``transformer_qwenimage.py`` / ``autoencoder_kl_qwenimage.py``
(whose constructor defaults are the released configs).
"""

from __future__ import annotations

import math

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from .common import (NEGATIVE, PROMPT, building, buffers_to, check_scale, full_size_device, parameter_count,
                               scaled_count, scaled_width)

__all__ = [
    "DECODER_GAIN", "NEGATIVE", "PROMPT", "QWEN_IMAGE_PARAMETERS", "QWEN_IMAGE_SCHEDULER", "QWEN_IMAGE_TRANSFORMER",
    "QWEN_IMAGE_VAE", "QWEN_TEXT_WIDTH", "full_size_parameter_count", "qwen_image_components", "qwen_image_config",
    "qwen_image_scheduler", "qwen_image_transformer", "qwen_image_vae", "qwen_text_encoder", "qwen_text_width",
    "qwen_tokenizer", "tiny_qwen_image_components", "tiny_qwen_image_pipeline",
]

#: The released Qwen-Image transformer (diffusers' QwenImageTransformer2DModel defaults): 60 dual-stream blocks.
QWEN_IMAGE_TRANSFORMER = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)
#: The released Qwen-Image VAE (a Wan-2.1-style causal 3D VAE, f = 8, 16 latent channels with per-channel stats).
QWEN_IMAGE_VAE = dict(
    base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
    temperal_downsample=(False, True, True), dropout=0.0, input_channels=3,
)
#: scheduler/scheduler_config.json of Qwen/Qwen-Image.
QWEN_IMAGE_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
    base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
)
#: Output width of Qwen2.5-VL-7B's language model (the transformer's joint_attention_dim).
QWEN_TEXT_WIDTH = 3584
#: Factor on the tiny VAE decoder's output layer: decoded images of std ~0.5 instead of ~0.18.
DECODER_GAIN = 3.0
#: Parameters of the full-size transformer (counted on the meta device), for messages.
QWEN_IMAGE_PARAMETERS = "20.4B"

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
_TEMPLATE_WORDS = (
    "system user assistant Describe the image by detailing color shape size texture quantity text spatial "
    "relationships of objects and background"
).split()
_WORDS = (
    "a an in on at with photo painting portrait picture red green blue white black fox cat dog sitting standing "
    "running snow grass forest city street high low quality blurry sharp detailed face bird house tree sky sun "
    "night day beautiful ugly deformed"
).split()


def qwen_tokenizer(max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A word-level tokenizer in Qwen2's layout: pad ``<|endoftext|>``, ``<|im_start|>`` / ``<|im_end|>`` kept
    whole, one token per word, punctuation mark or line break (the template prefix is 34 tokens, as in Qwen2)."""
    vocab = {t: i for i, t in enumerate(dict.fromkeys(_SPECIALS + ["\n", ",", ":", "."] + _TEMPLATE_WORDS + _WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="removed", invert=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=max_length,
    )


def qwen_image_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The released Qwen-Image scheduler: exponential dynamic shift (0.5 at 256 tokens, 0.9 at 8192), then the
    schedule stretched so that it ends at ``shift_terminal`` = 0.02."""
    return FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)


def qwen_text_encoder(width: int, layers: int = 1, head_dim: int = 128, intermediate: int | None = None,
                      vocab_size: int = 128) -> Qwen2_5_VLForConditionalGeneration:
    """A Qwen2.5-VL model whose language model outputs ``width`` channels (``width / head_dim`` heads, multimodal
    rotary sections (16, 24, 24) scaled to ``head_dim``), with a one-block vision tower (unused for text)."""
    heads = width // head_dim
    if heads < 1 or width % head_dim:
        raise ValueError(f"width must be a positive multiple of head_dim={head_dim}, got {width}")
    quarter = head_dim // 8
    sections = [quarter, (head_dim // 2 - quarter) // 2, head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2]
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": width, "intermediate_size": intermediate or width, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": math.gcd(heads, 4), "vocab_size": vocab_size,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 2,
            "rope_scaling": {"mrope_section": sections, "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": width},
        vocab_size=vocab_size, bos_token_id=0, eos_token_id=2, vision_start_token_id=vocab_size - 3,
        vision_end_token_id=vocab_size - 2, image_token_id=vocab_size - 1, video_token_id=vocab_size - 1,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image_components(num_layers: int = 2, guidance_embeds: bool = False) -> dict:
    """Components of a tiny QwenImagePipeline (float32, CPU, eval mode).

    Transformer: 2 blocks, 2 heads of 16, rotary axes (4, 6, 6), text width 32, 64 packed input channels
    (16 latent channels x 2x2). VAE: base width 8, widths 8-16-32-32, f = 8, the released per-channel
    ``latents_mean`` / ``latents_std``, its output layer scaled by :data:`DECODER_GAIN` so that random latents
    decode to images spread like real ones (a pixel-space loss then moves the latents as it would on the real
    model). Text encoder: 2 layers of width 32 (two heads of 16).
    """
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
    )
    with torch.no_grad():  # spread the decoded images over [-1, 1] (std ~0.5, as real ones; default init: ~0.18)
        vae.decoder.conv_out.weight.mul_(DECODER_GAIN)
        vae.decoder.conv_out.bias.mul_(DECODER_GAIN)
    torch.manual_seed(0)
    text_encoder = qwen_text_encoder(32, layers=2, head_dim=16, intermediate=37)
    components = {
        "transformer": transformer,
        "vae": vae,
        "scheduler": qwen_image_scheduler(),
        "text_encoder": text_encoder,
        "tokenizer": qwen_tokenizer(),
    }
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return components


def tiny_qwen_image_pipeline(**kwargs) -> QwenImagePipeline:
    """A float32 CPU QwenImagePipeline with tiny random components (:func:`tiny_qwen_image_components`); its
    default call works at 32x32 or 64x64 pixels (sides must be multiples of 16)."""
    pipe = QwenImagePipeline(**tiny_qwen_image_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- full-size architecture with random weights -----------------------------------------------------------------
def qwen_image_config(scale: float = 1.0) -> dict:
    """The Qwen-Image transformer config at ``scale``: blocks and heads times ``scale`` (head width 128 and its
    rotary axes kept), text width of :func:`qwen_text_width`."""
    scale = check_scale(scale)
    return {**QWEN_IMAGE_TRANSFORMER,
            "num_layers": scaled_count(QWEN_IMAGE_TRANSFORMER["num_layers"], scale),
            "num_attention_heads": scaled_count(QWEN_IMAGE_TRANSFORMER["num_attention_heads"], scale),
            "joint_attention_dim": qwen_text_width(scale)}


def qwen_text_width(scale: float = 1.0) -> int:
    """The text encoder's output width at ``scale``: 3584 (28 heads of 128) at full size, a multiple of 128."""
    return scaled_width(QWEN_TEXT_WIDTH, check_scale(scale), 128)


def qwen_image_transformer(scale: float = 1.0, device="cuda", dtype: torch.dtype = torch.bfloat16):
    """QwenImageTransformer2DModel with Qwen-Image's architecture (:func:`qwen_image_config`), random weights."""
    scale = check_scale(scale)
    device = full_size_device(scale, device, "Qwen-Image", QWEN_IMAGE_PARAMETERS)
    torch.manual_seed(0)
    with building(device, dtype):
        return buffers_to(QwenImageTransformer2DModel(**qwen_image_config(scale)).eval(), dtype)


def qwen_image_vae(scale: float = 1.0, device="cpu", dtype: torch.dtype = torch.float32) -> AutoencoderKLQwenImage:
    """The Qwen-Image VAE (base width 96, f = 8, 16 latent channels, released latent statistics) with random
    weights; at ``scale`` < 1 its base width shrinks (a multiple of 8)."""
    scale = check_scale(scale)
    base = scaled_width(QWEN_IMAGE_VAE["base_dim"], scale, 8) if scale < 1 else QWEN_IMAGE_VAE["base_dim"]
    torch.manual_seed(0)
    with building(device, dtype):
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in QWEN_IMAGE_VAE.items()}
        return AutoencoderKLQwenImage(**{**config, "base_dim": base}).eval()


def qwen_image_components(scale: float = 1.0, device="cuda", dtype: torch.dtype = torch.bfloat16) -> dict:
    """Components of a QwenImagePipeline with Qwen-Image's transformer and VAE and a one-layer Qwen2.5-VL text
    encoder of the real output width (3584 at full size), random weights, the released scheduler."""
    scale = check_scale(scale)
    transformer = qwen_image_transformer(scale, device, dtype)
    torch.manual_seed(1)
    with building(device, dtype):
        text_encoder = qwen_text_encoder(qwen_text_width(scale))
    return {
        "transformer": transformer,
        "vae": qwen_image_vae(scale, device, dtype),
        "scheduler": qwen_image_scheduler(),
        "text_encoder": text_encoder,
        "tokenizer": qwen_tokenizer(),
    }


def full_size_parameter_count() -> int:
    """Parameters of the full-size Qwen-Image transformer, counted on the meta device."""
    return parameter_count(qwen_image_transformer(1.0, device="meta"))
