"""Randomly initialised Lumina-Image 2.0 components built from config, fully offline.

A tiny ``Lumina2Pipeline`` (``tiny_lumina2_pipeline``): the real architecture in miniature, the Unified
Next-DiT (``Lumina2Transformer2DModel``: caption and noise refiners, joint layers, 2x2 patches, 3-axis rotary
positions) over the 16-channel FLUX.1-style VAE (f = 8, as the pipeline assumes), a two-layer ``Gemma2Model`` text
encoder and a Gemma-style word-level tokenizer (``<bos>`` first, right padding) whose vocabulary holds the words of
the pipeline's system prompt, so that its own ``encode_prompt`` (system prompt prefix, ``max_length`` padding,
attention mask, ``hidden_states[-2]``) runs unchanged. The outputs mean nothing.

Nothing is downloaded: the tokenizer is a word-level vocabulary built with the ``tokenizers`` library.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
from tokenizers import pre_tokenizers
from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

from .common import FLUX_VAE_SCALE, FLUX_VAE_SHIFT, tiny_vae
from .z_image import chat_tokenizer

__all__ = ["LUMINA2_SYSTEM_PROMPT", "gemma_tokenizer", "lumina2_scheduler", "tiny_gemma2", "tiny_lumina2_components",
           "tiny_lumina2_pipeline"]

#: The system prompt ``Lumina2Pipeline`` puts before every prompt (with " <Prompt Start> ").
LUMINA2_SYSTEM_PROMPT = ("You are an assistant designed to generate superior images with the superior degree of "
                         "image-text alignment based on textual prompts or user prompts. <Prompt Start>")


def gemma_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma's special ids (pad 0, eos 1, bos 2; ``<bos>`` starts every sequence) over the test words and the words
    of the system prompt."""
    words = tuple(w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(LUMINA2_SYSTEM_PROMPT))
    return chat_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>"], words, bos="<bos>", eos="<eos>", pad="<pad>")


def tiny_gemma2(hidden_size: int = 8, layers: int = 2, vocab_size: int = 128) -> Gemma2Model:
    """A ``Gemma2Model`` whose hidden states have width ``hidden_size`` (the transformer's ``cap_feat_dim``)."""
    torch.manual_seed(0)
    config = Gemma2Config(head_dim=4, hidden_size=hidden_size, intermediate_size=hidden_size, num_attention_heads=2,
                          num_hidden_layers=layers, num_key_value_heads=2, sliding_window=4, vocab_size=vocab_size,
                          pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return Gemma2Model(config).eval()


def lumina2_scheduler(dynamic_shift: bool = True) -> FlowMatchEulerDiscreteScheduler:
    """Lumina-Image 2.0's scheduler (static shift 6) or, with ``dynamic_shift``, the shift the pipeline's ``mu``
    drives (FLUX.1's line through (256, 0.5) and (4096, 1.15))."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0, use_dynamic_shifting=dynamic_shift,
                                           base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                           max_shift=1.15)


def tiny_lumina2_components(dynamic_shift: bool = True) -> dict:
    """Components of a tiny Lumina2Pipeline: 16 latent channels (as the released VAE), 2x2 patches, a 32-wide
    DiT (one refiner layer each, two joint layers), native size 64 px (``sample_size`` 8), Gemma2 features of
    width 8."""
    torch.manual_seed(0)
    transformer = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, hidden_size=32, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5,
        scaling_factor=1.0, axes_dim_rope=(8, 4, 4), axes_lens=(300, 512, 512), cap_feat_dim=8,
    )
    tokenizer = gemma_tokenizer()
    return {
        "transformer": transformer.eval(),
        "vae": tiny_vae(16, FLUX_VAE_SCALE, FLUX_VAE_SHIFT),
        "scheduler": lumina2_scheduler(dynamic_shift),
        "text_encoder": tiny_gemma2(8, vocab_size=len(tokenizer)),
        "tokenizer": tokenizer,
    }


def tiny_lumina2_pipeline(dynamic_shift: bool = True) -> Lumina2Pipeline:
    """A float32 CPU Lumina2Pipeline in eval mode with tiny random components (default 64 px images)."""
    pipe = Lumina2Pipeline(**tiny_lumina2_components(dynamic_shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe
