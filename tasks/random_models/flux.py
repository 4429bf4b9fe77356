"""Random-weight FLUX.1 builders (the family of ``guidance/backbones/flux.py``), fully offline.

* tiny: ``flux_components`` / ``flux_pipeline``, dev-like (guidance embedding, dynamic shift) or schnell-like, for
  the tests and demos; ``flux_scheduler``, the released schedulers (Chroma and FLUX.2 reuse it);
* full size: ``flux_dev_components`` (FLUX.1-dev's transformer and 16-channel VAE, small text encoders of the real
  widths), for ``flowsteer speed``; ``scale`` < 1 builds a CPU-sized miniature of the same architecture.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel

from .common import (FLUX_VAE_SCALE, FLUX_VAE_SHIFT, _clip_config, _eval, _text_encoders, buffers_to, building,
                     check_scale, full_size_device, scaled_count, text_widths, tiny_t5, tiny_vae, vae16,
                     word_tokenizer)

__all__ = ["FLUX_DEV_TRANSFORMER", "flux_components", "flux_dev_components", "flux_dev_config",
           "flux_dev_transformer", "flux_pipeline", "flux_scheduler"]


def flux_scheduler(dev: bool) -> FlowMatchEulerDiscreteScheduler:
    """The released FLUX.1 scheduler configs: dev shifts with the image size, schnell does not shift."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0 if dev else 1.0,
        use_dynamic_shifting=dev,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )


def flux_components(dev: bool = True) -> dict:
    """Components of a tiny FluxPipeline: dev-like (guidance embedding, dynamic shift) or schnell-like.

    The VAE has 4 latent channels, packed 2x2 into 16 transformer input channels (16 -> 64 in the real model).
    """
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=dev,
        axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(_clip_config(32, 4, 32))
    return _eval({
        "transformer": transformer,
        "scheduler": flux_scheduler(dev),
        "vae": tiny_vae(4, FLUX_VAE_SCALE, FLUX_VAE_SHIFT),
        "text_encoder": text_encoder,
        "tokenizer": word_tokenizer("clip"),
        "text_encoder_2": tiny_t5(32),
        "tokenizer_2": word_tokenizer("t5"),
    })


def flux_pipeline(dev: bool = True) -> FluxPipeline:
    pipe = FluxPipeline(**flux_components(dev))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- full size -------------------------------------------------------------------------------------------------------
#: FLUX.1-dev's transformer (19 double-stream and 38 single-stream blocks, guidance embedding).
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def flux_dev_config(scale: float = 1.0) -> dict:
    """The FLUX.1-dev transformer config at ``scale``: both block counts and the heads times ``scale`` (head width
    128 and its rotary axes kept), text widths of :func:`text_widths`."""
    scale = check_scale(scale)
    clip_l, _, t5 = text_widths(scale)
    return {**FLUX_DEV_TRANSFORMER,
            "num_layers": scaled_count(FLUX_DEV_TRANSFORMER["num_layers"], scale),
            "num_single_layers": scaled_count(FLUX_DEV_TRANSFORMER["num_single_layers"], scale),
            "num_attention_heads": scaled_count(FLUX_DEV_TRANSFORMER["num_attention_heads"], scale),
            "joint_attention_dim": t5, "pooled_projection_dim": clip_l}


def flux_dev_transformer(scale: float = 1.0, device="cuda", dtype: torch.dtype = torch.bfloat16):
    """FluxTransformer2DModel with FLUX.1-dev's architecture (:func:`flux_dev_config`) and random weights."""
    scale = check_scale(scale)
    device = full_size_device(scale, device, "FLUX.1-dev")
    torch.manual_seed(0)
    with building(device, dtype):
        return buffers_to(FluxTransformer2DModel(**flux_dev_config(scale)).eval(), dtype)


def flux_dev_components(scale: float = 1.0, device="cuda", dtype: torch.dtype = torch.bfloat16) -> dict:
    """Components of a FluxPipeline with FLUX.1-dev's transformer and VAE and small text encoders of the real
    widths, random weights, the released dev scheduler (dynamic shift)."""
    scale = check_scale(scale)
    transformer = flux_dev_transformer(scale, device, dtype)
    clip, t5 = _text_encoders(("clip", "t5"), scale, device, dtype)
    return _eval({
        "transformer": transformer,
        "scheduler": flux_scheduler(dev=True),
        "vae": vae16(FLUX_VAE_SCALE, FLUX_VAE_SHIFT, scale, device, dtype),
        "text_encoder": clip,
        "tokenizer": word_tokenizer("clip"),
        "text_encoder_2": t5,
        "tokenizer_2": word_tokenizer("t5"),
    })
