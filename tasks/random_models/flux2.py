"""Randomly initialised FLUX.2 components built from config, fully offline.

Two kinds, built by the same code:

* **tiny** pipelines (``tiny_flux2_pipeline``): the real architectures in miniature, so that the adapter
  (:mod:`guidance.backbones.flux2`) is checked against diffusers' ``Flux2Pipeline`` (FLUX.2 [dev]: Mistral-3 text
  encoder with its Pixtral processor, guidance embedding) and ``Flux2KleinPipeline`` (FLUX.2 [klein]: Qwen3 text
  encoder, true CFG, or none for the step-distilled checkpoints) on the code paths the released models take: a
  ``Flux2Transformer2DModel`` with 4-axis rotary ids, an ``AutoencoderKLFlux2`` with 8x downsampling, quant convs,
  a 2x2 patchify and batch-norm running statistics (set to random values, so that the normalisation is exercised),
  text encoders deep enough for the pipelines' default hidden-state layers ((10, 20, 30) and (9, 18, 27)), and the
  released scheduler config. Tokenizers are word-level vocabularies with the chat templates the pipelines apply;
* **full-size** FLUX.2 [klein] 4B / 9B architectures with random weights (``flux2_klein_components``): the released
  transformer configs (``scripts/convert_flux2_to_diffusers.py`` in diffusers) and the FLUX.2 VAE (the
  ``AutoencoderKLFlux2`` defaults), with a Qwen3-shaped text encoder of the real output width (3 x 2560 = 7680 for
  the 4B model, 3 x 4096 = 12288 for the 9B one) but one narrow attention head and a small MLP per layer: embeddings
  are computed once per prompt, so the encoder's size does not enter a sampling loop. ``scale`` < 1 builds a
  miniature of the same architecture that runs on a CPU; scale 1 is built on a CUDA device or on "meta" only
  (for counting parameters: transformer 3.88B (4B) / 9.08B (9B), VAE 84.0M).

Nothing is downloaded.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralImageProcessor,
    PixtralProcessor,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from .common import (
    NEGATIVE, PROMPT, buffers_to, building, check_scale, full_size_device, scaled_count, scaled_width,
)
from .flux import flux_scheduler

__all__ = [
    "FLUX2_KLEIN_TRANSFORMERS", "FLUX2_VAE", "QWEN3_WIDTHS", "flux2_klein_components", "flux2_klein_config",
    "flux2_klein_transformer", "flux2_vae", "mistral_processor", "qwen_tokenizer", "tiny_flux2_components",
    "tiny_flux2_pipeline",
]

#: The tiny text encoders' width; the transformer reads three stacked hidden states, 3 x 16 = 48 channels.
TEXT_WIDTH = 16
#: Latent channels of the tiny VAE (32 in the released one), patchified 2x2 into the transformer's 16 (128) channels.
TINY_LATENT_CHANNELS = 4

_EXTRA_WORDS = "a the of dog cat tree house sky photo image green blue you are an ai that reasons about descriptions ."

# Qwen3's chat template as far as the klein pipeline uses it (a user turn, the generation prompt, thinking disabled).
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# Mistral-Small-3.1's template as far as the dev pipeline uses it (a system prompt, then user text parts).
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}[IMG]{% endif %}{% endfor %}[/INST]{% endif %}{% endfor %}"
)


def _word_level(specials: list[str]) -> Tokenizer:
    """A whitespace word-level tokenizer over the shared test vocabulary with ``specials`` as whole tokens."""
    words = list(dict.fromkeys(f"{PROMPT} {NEGATIVE} {_EXTRA_WORDS}".split()))
    vocab = {token: i for i, token in enumerate(specials + ["<unk>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    return backend


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A Qwen3-style tokenizer: ``<|endoftext|>`` pads, ``<|im_start|>`` / ``<|im_end|>`` / ``<think>`` are
    special tokens, and the chat template renders a user turn and the assistant prompt as Qwen3's does."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    return PreTrainedTokenizerFast(tokenizer_object=_word_level(specials), pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", unk_token="<unk>", model_max_length=512,
                                   chat_template=_QWEN_TEMPLATE)


def mistral_processor() -> PixtralProcessor:
    """A Pixtral processor (the class of Mistral-Small-3.1's) over a word-level tokenizer with Mistral's special
    tokens (bos ``<s>`` 1, eos ``</s>`` 2, pad 11 as in Tekken) and a chat template with the system prompt."""
    specials = ["<unk0>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                "[IMG_BREAK]", "[IMG_END]", "<image>", "<pad>"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_word_level(specials), bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", model_max_length=512)
    image_processor = PixtralImageProcessor(size={"longest_edge": 32}, patch_size={"height": 8, "width": 8})
    return PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                            chat_template=_MISTRAL_TEMPLATE)


def _qwen3(width: int, layers: int = 28, heads: int = 2, head_dim: int = 8, mlp: int = 32) -> Qwen3ForCausalLM:
    """A Qwen3 language model of hidden width ``width`` with ``layers`` layers (the klein pipeline stacks hidden
    states 9, 18 and 27, so 27 layers at least)."""
    config = Qwen3Config(vocab_size=128, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=1, head_dim=head_dim,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    return Qwen3ForCausalLM(config)


def _mistral3(width: int, layers: int = 31) -> Mistral3ForConditionalGeneration:
    """A Mistral-3 (text + Pixtral vision tower) model whose language model has ``layers`` layers (the dev pipeline
    stacks hidden states 10, 20 and 30) of width ``width``."""
    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": 128, "hidden_size": width, "intermediate_size": 32,
                     "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "head_dim": 8, "max_position_embeddings": 1024, "sliding_window": None,
                     "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 32, "image_size": 32, "patch_size": 8,
                       "num_channels": 3},
        image_token_index=7, spatial_merge_size=1, vision_feature_layer=-1,
    )
    return Mistral3ForConditionalGeneration(config)


def _tiny_vae() -> AutoencoderKLFlux2:
    """AutoencoderKLFlux2 with four levels (8x, like the released one), quant convs, 4 latent channels, and random
    batch-norm running statistics over the 16 patchified channels."""
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=TINY_LATENT_CHANNELS,
                             norm_num_groups=2, sample_size=32)
    generator = torch.Generator().manual_seed(3)
    channels = vae.bn.num_features
    vae.bn.running_mean.copy_(0.2 * torch.randn(channels, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
    return vae.eval()


def tiny_flux2_components(variant: str = "dev") -> dict:
    """Components of a tiny ``Flux2Pipeline`` (``variant="dev"``: Mistral-3 text encoder, guidance embedding) or
    ``Flux2KleinPipeline`` (``"klein"``: Qwen3 text encoder, no guidance embedding)."""
    if variant not in ("dev", "klein"):
        raise ValueError(f"variant must be 'dev' or 'klein', got {variant!r}")
    dev = variant == "dev"
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * TINY_LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * TEXT_WIDTH, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=dev,
    )
    torch.manual_seed(1)
    text_encoder = _mistral3(TEXT_WIDTH) if dev else _qwen3(TEXT_WIDTH)
    components = {
        "transformer": transformer,
        "scheduler": flux_scheduler(dev=True),  # the released FLUX.2 schedulers are FLUX.1-dev's (dynamic shift)
        "vae": _tiny_vae(),
        "text_encoder": text_encoder,
        "tokenizer": mistral_processor() if dev else qwen_tokenizer(),
    }
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return components


def tiny_flux2_pipeline(variant: str = "dev", distilled: bool = False) -> Flux2Pipeline | Flux2KleinPipeline:
    """A float32 CPU ``Flux2Pipeline`` (``variant="dev"``) or ``Flux2KleinPipeline`` (``"klein"``; ``distilled``:
    the step-distilled checkpoints' ``is_distilled`` flag, no CFG) in eval mode, for 32 x 32 or 64 x 64 images."""
    components = tiny_flux2_components(variant)
    if variant == "dev":
        if distilled:
            raise ValueError("distilled applies to klein only; FLUX.2 [dev] is guidance-distilled by construction")
        pipe = Flux2Pipeline(**components)
    else:
        pipe = Flux2KleinPipeline(**components, is_distilled=distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- full-size FLUX.2 [klein] with random weights ---------------------------------------------------------------
#: The released klein transformers (``get_flux2_transformer_config`` in diffusers'
#: scripts/convert_flux2_to_diffusers.py).
FLUX2_KLEIN_TRANSFORMERS = {
    "4b": dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
               axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False),
    "9b": dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
               num_attention_heads=32, joint_attention_dim=12288, timestep_guidance_channels=256, mlp_ratio=3.0,
               axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False),
}
#: Hidden widths of the klein text encoders (Qwen3-4B, Qwen3-8B); the transformer reads three layers stacked.
QWEN3_WIDTHS = {"4b": 2560, "9b": 4096}
#: The FLUX.2 VAE (AutoencoderKLFlux2's defaults: f = 8, 32 latent channels, quant convs, batch norm over 128).
FLUX2_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=32, norm_num_groups=32,
                 sample_size=1024, use_quant_conv=True, use_post_quant_conv=True)
_FULL_SIZE = {"4b": ("FLUX.2-klein-4B", "3.9B"), "9b": ("FLUX.2-klein-9B", "9.1B")}


def _check_size(size: str) -> str:
    if size not in FLUX2_KLEIN_TRANSFORMERS:
        raise ValueError(f"size must be '4b' or '9b' (FLUX.2 [klein] 4B / 9B), got {size!r}")
    return size


def _text_width(size: str, scale: float) -> int:
    return scaled_width(QWEN3_WIDTHS[size], scale)


def flux2_klein_config(size: str = "4b", scale: float = 1.0) -> dict:
    """The klein transformer config at ``scale``: both block counts and the heads times ``scale`` (head width 128
    and its four rotary axes kept), ``joint_attention_dim`` three text widths."""
    scale = check_scale(scale)
    base = FLUX2_KLEIN_TRANSFORMERS[_check_size(size)]
    return {**base, "num_layers": scaled_count(base["num_layers"], scale),
            "num_single_layers": scaled_count(base["num_single_layers"], scale),
            "num_attention_heads": scaled_count(base["num_attention_heads"], scale),
            "joint_attention_dim": 3 * _text_width(size, scale)}


def flux2_klein_transformer(size: str = "4b", scale: float = 1.0, device="cuda", dtype: torch.dtype = torch.bfloat16):
    """Flux2Transformer2DModel with the klein architecture (:func:`flux2_klein_config`) and random weights."""
    scale = check_scale(scale)
    device = full_size_device(scale, device, *_FULL_SIZE[_check_size(size)])
    torch.manual_seed(0)
    with building(device, dtype):
        return buffers_to(Flux2Transformer2DModel(**flux2_klein_config(size, scale)).eval(), dtype)


def flux2_vae(scale: float = 1.0, device="cpu", dtype: torch.dtype = torch.float32) -> AutoencoderKLFlux2:
    """The FLUX.2 AutoencoderKLFlux2 with random weights; at ``scale`` < 1 its widths and norm groups shrink
    together (128-256-512-512 with 32 groups at full size). Batch-norm statistics stay at (0, 1)."""
    scale = check_scale(scale)
    groups = scaled_count(FLUX2_VAE["norm_num_groups"], scale)
    widths = tuple(max(groups, round(c * scale / groups) * groups) for c in FLUX2_VAE["block_out_channels"])
    torch.manual_seed(0)
    with building(device, dtype):
        return AutoencoderKLFlux2(**{**FLUX2_VAE, "block_out_channels": widths, "norm_num_groups": groups}).eval()


def flux2_klein_components(size: str = "4b", scale: float = 1.0, device="cuda",
                           dtype: torch.dtype = torch.bfloat16) -> dict:
    """Components of a ``Flux2KleinPipeline`` (pass them with ``is_distilled``) with the klein transformer and the
    FLUX.2 VAE, random weights, the FLUX.1-dev scheduler config the released checkpoints use, and a 28-layer
    Qwen3-shaped text encoder of the real width (one 128-wide attention head, MLP width 64 per layer)."""
    scale = check_scale(scale)
    transformer = flux2_klein_transformer(size, scale, device, dtype)
    torch.manual_seed(1)
    with building(device, dtype):
        text_encoder = _qwen3(_text_width(size, scale), heads=1, head_dim=128 if scale == 1 else 16, mlp=64).eval()
    return {
        "transformer": transformer,
        "scheduler": flux_scheduler(dev=True),
        "vae": flux2_vae(scale, device, dtype),
        "text_encoder": text_encoder,
        "tokenizer": qwen_tokenizer(),
    }
