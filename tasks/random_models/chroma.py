"""Randomly initialised Chroma components built from config, fully offline.

* **tiny** (:func:`tiny_chroma_components`, :func:`tiny_chroma_pipeline`): ChromaTransformer2DModel in miniature
  (one double- and one single-stream block, a one-layer approximator), the small T5 encoder and word-level T5
  tokenizer of :mod:`tasks.random_models.common`, a 4-channel VAE (f = 8) with FLUX.1's scale and shift, and a
  FLUX.1-dev-like scheduler (dynamic shift), so that :class:`~guidance.backbones.chroma.ChromaModel` is checked
  against ``ChromaPipeline`` on the code paths the released model takes;
* **full size** (:func:`chroma_hd_components`): Chroma1-HD's transformer (19 + 38 blocks, 24 heads of 128, the
  5-layer 5120-wide approximator) and FLUX.1's 16-channel VAE with random weights, and a one-layer T5 of the real
  width 4096, for time and memory figures on a GPU without a checkpoint. ``scale`` < 1 builds a miniature of the
  same architecture that runs on a CPU; scale 1 is built on a CUDA device only (or on "meta").

Nothing is downloaded: the tokenizer is a word-level vocabulary built with the ``tokenizers`` library.
"""

from __future__ import annotations

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel

from .common import (
    FLUX_VAE_SCALE,
    FLUX_VAE_SHIFT,
    T5_WIDTH,
    buffers_to,
    full_size_device,
    building,
    check_scale,
    scaled_count,
    scaled_width,
    tiny_t5,
    tiny_vae,
    vae16,
    word_tokenizer,
)
from .flux import flux_scheduler

__all__ = [
    "CHROMA_HD_TRANSFORMER", "chroma_hd_components", "chroma_hd_config", "chroma_hd_transformer",
    "tiny_chroma_components", "tiny_chroma_pipeline",
]

#: Chroma1-HD's transformer (diffusers' ChromaTransformer2DModel defaults): FLUX.1-schnell's 19 double-stream and
#: 38 single-stream blocks, with the modulation of every block computed by the distilled-guidance approximator.
CHROMA_HD_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56), approximator_num_channels=64,
    approximator_hidden_dim=5120, approximator_layers=5,
)
_PARAMETERS = "8.9B"


def _eval(components: dict) -> dict:
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return components


def tiny_chroma_components(num_layers: int = 1, num_single_layers: int = 1) -> dict:
    """Components of a tiny ChromaPipeline, float32 on the CPU, in eval mode.

    The VAE has 4 latent channels, packed 2x2 into 16 transformer input channels (16 -> 64 in the real model); T5
    is 32 wide, the transformer's joint_attention_dim.
    """
    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 4, 8),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    return _eval({
        "transformer": transformer,
        "scheduler": flux_scheduler(dev=True),
        "vae": tiny_vae(4, FLUX_VAE_SCALE, FLUX_VAE_SHIFT),
        "text_encoder": tiny_t5(32),
        "tokenizer": word_tokenizer("t5"),
    })


def tiny_chroma_pipeline(num_layers: int = 1, num_single_layers: int = 1) -> ChromaPipeline:
    """A tiny float32 CPU ChromaPipeline in eval mode (32x32 and 64x64 images work), progress bar off."""
    pipe = ChromaPipeline(**tiny_chroma_components(num_layers, num_single_layers))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- full-size architecture with random weights ---------------------------------------------------------------
def chroma_hd_config(scale: float = 1.0) -> dict:
    """The Chroma1-HD transformer config at ``scale``: both block counts, the heads and the approximator's layers
    and width times ``scale`` (head width 128 and its rotary axes kept), T5's width of
    :func:`~tasks.random_models.common.text_widths`."""
    scale = check_scale(scale)
    base = CHROMA_HD_TRANSFORMER
    return {**base,
            "num_layers": scaled_count(base["num_layers"], scale),
            "num_single_layers": scaled_count(base["num_single_layers"], scale),
            "num_attention_heads": scaled_count(base["num_attention_heads"], scale),
            "joint_attention_dim": scaled_width(T5_WIDTH, scale),
            "approximator_hidden_dim": scaled_width(base["approximator_hidden_dim"], scale),
            "approximator_layers": scaled_count(base["approximator_layers"], scale)}


def chroma_hd_transformer(scale: float = 1.0, device="cuda", dtype: torch.dtype = torch.bfloat16):
    """ChromaTransformer2DModel with Chroma1-HD's architecture (:func:`chroma_hd_config`) and random weights."""
    scale = check_scale(scale)
    device = full_size_device(scale, device, "Chroma1-HD", _PARAMETERS)
    torch.manual_seed(0)
    with building(device, dtype):
        return buffers_to(ChromaTransformer2DModel(**chroma_hd_config(scale)).eval(), dtype)


def chroma_hd_components(scale: float = 1.0, device="cuda", dtype: torch.dtype = torch.bfloat16) -> dict:
    """Components of a ChromaPipeline with Chroma1-HD's transformer, FLUX.1's VAE and a one-layer T5 of the real
    width, random weights, a FLUX.1-dev-like scheduler (dynamic shift)."""
    scale = check_scale(scale)
    transformer = chroma_hd_transformer(scale, device, dtype)
    torch.manual_seed(1)
    with building(device, dtype):
        t5 = tiny_t5(scaled_width(T5_WIDTH, scale), layers=1)
    return _eval({
        "transformer": transformer,
        "scheduler": flux_scheduler(dev=True),
        "vae": vae16(FLUX_VAE_SCALE, FLUX_VAE_SHIFT, scale, device, dtype),
        "text_encoder": t5,
        "tokenizer": word_tokenizer("t5"),
    })

