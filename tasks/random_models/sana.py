"""Randomly initialised SANA components built from config, fully offline (SANA-Sprint, which shares them, builds
on them in ``sana_sprint.py``).

The real architectures in miniature, so that the adapters are checked against the diffusers pipelines on the code
paths the released checkpoints take:

* ``SanaTransformer2DModel`` (linear-attention DiT, patch 1, no position table at 1024 px); SANA-Sprint's adds the
  guidance embedding and RMS qk-norm across heads;
* ``AutoencoderDC`` with six levels (32x downsampling like DC-AE f32c32): ResBlocks in the first three levels,
  EfficientViT blocks (multi-scale linear attention) in the last three, batch norm + ReLU then RMS norm + SiLU in
  the decoder, the released ``scaling_factor`` 0.41407;
* a one-layer ``Gemma2Model`` text encoder with a word-level tokenizer carrying Gemma's special tokens (pad 0,
  eos 1, bos 2, unk 3; ``<bos>`` prepended, as Gemma's tokenizer does);
* schedulers as released: SANA's ``DPMSolverMultistepScheduler`` (flow prediction, flow sigmas, shift 3) or a
  ``FlowMatchEulerDiscreteScheduler`` of the same shift; SANA-Sprint's ``SCMScheduler`` (TrigFlow, sigma_data 0.5).

Configs follow ``scripts/convert_sana_to_diffusers.py`` and the DC-AE configs of the diffusers repository.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderDC,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaPipeline,
    SanaTransformer2DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

from .common import word_tokenizer

__all__ = [
    "SANA_FLOW_SHIFT", "SANA_VAE_SCALE", "gemma_tokenizer", "sana_scheduler", "tiny_dc_ae", "tiny_gemma",
    "tiny_sana_components", "tiny_sana_pipeline", "tiny_sana_transformer",
]

#: DC-AE f32c32's latent scaling factor and the flow shift of the released 512 / 1024 / 2048 px SANA schedulers.
SANA_VAE_SCALE = 0.41407
SANA_FLOW_SHIFT = 3.0
#: Gemma's special tokens, in Gemma's id order.
_GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def gemma_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Gemma's special ids (pad 0, eos 1, bos 2, unk 3) that prepends ``<bos>``; the
    words are those of :func:`tasks.random_models.common.word_tokenizer`."""
    words = [w for w in word_tokenizer("t5").get_vocab() if not w.startswith("<") and w != "</s>"]
    vocab = {token: i for i, token in enumerate(_GEMMA_SPECIALS + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=8192)


def tiny_gemma(hidden_size: int = 16, vocab_size: int | None = None) -> Gemma2Model:
    """A one-layer Gemma-2 decoder (the text encoder of SANA is Gemma-2-2B-it's decoder, 2304 wide)."""
    vocab_size = vocab_size or len(gemma_tokenizer())
    torch.manual_seed(1)
    config = Gemma2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="eager",
    )
    return Gemma2Model(config).eval()


def tiny_dc_ae(latent_channels: int = 8, levels: int = 6, scaling_factor: float = SANA_VAE_SCALE) -> AutoencoderDC:
    """AutoencoderDC with ``levels`` levels (2 ** (levels - 1) downsampling, 32x at six like DC-AE f32c32) and
    8 channels per level: ResBlocks in the first half, EfficientViT blocks in the second, as released."""
    res = levels // 2
    blocks = ("ResBlock",) * res + ("EfficientViTBlock",) * (levels - res)
    torch.manual_seed(0)
    return AutoencoderDC(
        in_channels=3,
        latent_channels=latent_channels,
        attention_head_dim=4,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_block_out_channels=(8,) * levels,
        decoder_block_out_channels=(8,) * levels,
        encoder_layers_per_block=(1,) * levels,
        decoder_layers_per_block=(1,) * levels,
        encoder_qkv_multiscales=((),) * res + ((5,),) * (levels - res),
        decoder_qkv_multiscales=((),) * res + ((5,),) * (levels - res),
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types=("batch_norm",) * res + ("rms_norm",) * (levels - res),
        decoder_act_fns=("relu",) * res + ("silu",) * (levels - res),
        scaling_factor=scaling_factor,
    ).eval()


def tiny_sana_transformer(in_channels: int = 8, caption_channels: int = 16, sprint: bool = False,
                          num_layers: int = 2) -> SanaTransformer2DModel:
    """SanaTransformer2DModel, 16 wide; ``sprint``: SANA-Sprint's guidance embedding and qk-norm.
    ``sample_size`` 32 (the 1024 px models' default latent size)."""
    torch.manual_seed(0)
    return SanaTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=num_layers,
        num_attention_heads=2,
        attention_head_dim=8,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=caption_channels,
        mlp_ratio=2.5,
        sample_size=32,
        qk_norm="rms_norm_across_heads" if sprint else None,
        guidance_embeds=sprint,
    ).eval()


def sana_scheduler(kind: str = "dpm", shift: float = SANA_FLOW_SHIFT):
    """The released SANA scheduler (``"dpm"``: DPM-Solver++ on flow sigmas with ``flow_shift``) or an Euler
    flow-matching scheduler with the same shift (``"euler"``)."""
    if kind == "dpm":
        return DPMSolverMultistepScheduler(flow_shift=shift, use_flow_sigmas=True, prediction_type="flow_prediction")
    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=shift)
    raise ValueError(f"kind must be 'dpm' or 'euler', got {kind!r}")


def _eval(components: dict) -> dict:
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return components


def tiny_sana_components(scheduler: str = "dpm", latent_channels: int = 8, levels: int = 6) -> dict:
    """Components of a tiny SanaPipeline (``scheduler``: see :func:`sana_scheduler`)."""
    tokenizer = gemma_tokenizer()
    return _eval({
        "tokenizer": tokenizer,
        "text_encoder": tiny_gemma(16, len(tokenizer)),
        "vae": tiny_dc_ae(latent_channels, levels),
        "transformer": tiny_sana_transformer(latent_channels, 16),
        "scheduler": sana_scheduler(scheduler),
    })


def tiny_sana_pipeline(scheduler: str = "dpm", latent_channels: int = 8, levels: int = 6) -> SanaPipeline:
    """A float32 CPU SanaPipeline in eval mode with tiny random components (32x downsampling: 64 px images have
    2x2 latents)."""
    pipe = SanaPipeline(**tiny_sana_components(scheduler, latent_channels, levels))
    pipe.set_progress_bar_config(disable=True)
    return pipe
