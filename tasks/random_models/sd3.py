"""Random-weight SD3 / SD3.5 builders (the family of ``guidance/backbones/sd3.py``), fully offline.

* tiny: ``sd3_components`` / ``sd3_pipeline``, the real architecture in miniature (CLIP-L/CLIP-G-like pair plus
  T5, static-shift scheduler as released), for the tests and demos;
* full size: ``sd35_medium_components`` (SD3.5-medium's transformer and 16-channel VAE, small text encoders of the
  real widths), for ``flowsteer speed``; ``scale`` < 1 builds a CPU-sized miniature of the same architecture.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection

from .common import (SD3_VAE_SCALE, SD3_VAE_SHIFT, _clip_config, _eval, _text_encoders, buffers_to, building,
                     check_scale, full_size_device, scaled_count, text_widths, tiny_t5, tiny_vae, vae16,
                     word_tokenizer)

__all__ = ["SD35_MEDIUM_TRANSFORMER", "sd35_medium_components", "sd35_medium_config", "sd35_medium_transformer",
           "sd3_components", "sd3_pipeline"]


def sd3_components(t5: bool = True, sd35: bool | str = False, patch_size: int = 1) -> dict:
    """Components of a tiny StableDiffusion3Pipeline.

    CLIP-L-like (hidden 8) and CLIP-G-like (hidden 16) hidden states concatenate to 24 < 32 and are zero-padded
    to T5's width (the transformer's joint_attention_dim), as 768 + 1280 are padded to 4096 in the real model;
    their projections (24 + 40) concatenate to the pooled width 64. ``sd35`` (True or "medium") adds SD3.5-medium's
    dual attention and RMS qk-norm; ``sd35="large"`` SD3.5-large's RMS qk-norm without dual attention. The
    scheduler is configured like the released checkpoints (static shift 3).
    """
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=patch_size,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        dual_attention_layers=(0,) if sd35 in (True, "medium") else (),
        qk_norm="rms_norm" if sd35 else None,
    )
    torch.manual_seed(1)
    text_encoder = CLIPTextModelWithProjection(_clip_config(8, 2, 24))
    torch.manual_seed(2)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(16, 4, 40))
    return _eval({
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        "vae": tiny_vae(4, SD3_VAE_SCALE, SD3_VAE_SHIFT),
        "text_encoder": text_encoder,
        "tokenizer": word_tokenizer("clip"),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": word_tokenizer("clip"),
        "text_encoder_3": tiny_t5(32) if t5 else None,
        "tokenizer_3": word_tokenizer("t5") if t5 else None,
    })


def sd3_pipeline(**kwargs) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline(**sd3_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- full size -------------------------------------------------------------------------------------------------------
#: SD3.5-medium's transformer (MMDiT-X: dual attention in the first 13 of 24 blocks, RMS qk-norm).
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)


def sd35_medium_config(scale: float = 1.0) -> dict:
    """The SD3.5-medium transformer config at ``scale``: layers and heads times ``scale`` (head width 64 kept,
    caption projection = heads x 64), dual attention in the first 13/24 of the blocks, text widths of
    :func:`text_widths`."""
    scale = check_scale(scale)
    clip_l, clip_g, t5 = text_widths(scale)
    layers = scaled_count(SD35_MEDIUM_TRANSFORMER["num_layers"], scale)
    heads = scaled_count(SD35_MEDIUM_TRANSFORMER["num_attention_heads"], scale)
    dual = min(layers, scaled_count(len(SD35_MEDIUM_TRANSFORMER["dual_attention_layers"]), scale))
    return {**SD35_MEDIUM_TRANSFORMER, "num_layers": layers, "num_attention_heads": heads,
            "caption_projection_dim": heads * SD35_MEDIUM_TRANSFORMER["attention_head_dim"],
            "joint_attention_dim": t5, "pooled_projection_dim": clip_l + clip_g,
            "dual_attention_layers": tuple(range(dual))}


def sd35_medium_transformer(scale: float = 1.0, device="cuda", dtype: torch.dtype = torch.bfloat16):
    """SD3Transformer2DModel with SD3.5-medium's architecture (:func:`sd35_medium_config`) and random weights."""
    scale = check_scale(scale)
    device = full_size_device(scale, device, "SD3.5-medium")
    torch.manual_seed(0)
    with building(device, dtype):
        return buffers_to(SD3Transformer2DModel(**sd35_medium_config(scale)).eval(), dtype)


def sd35_medium_components(scale: float = 1.0, device="cuda", dtype: torch.dtype = torch.bfloat16) -> dict:
    """Components of a StableDiffusion3Pipeline with SD3.5-medium's transformer and VAE and small text encoders
    of the real widths, random weights, the released scheduler (static shift 3)."""
    scale = check_scale(scale)
    transformer = sd35_medium_transformer(scale, device, dtype)
    clip_l, clip_g, t5 = _text_encoders(("clip_l", "clip_g", "t5"), scale, device, dtype)
    return _eval({
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        "vae": vae16(SD3_VAE_SCALE, SD3_VAE_SHIFT, scale, device, dtype),
        "text_encoder": clip_l,
        "tokenizer": word_tokenizer("clip"),
        "text_encoder_2": clip_g,
        "tokenizer_2": word_tokenizer("clip"),
        "text_encoder_3": t5,
        "tokenizer_3": word_tokenizer("t5"),
    })
